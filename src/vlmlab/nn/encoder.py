"""The bidirectional transformer encoder of ViT, CLIP, SigLIP and BERT.

One block, two residual orders:
  pre-LN (ViT, CLIP, SigLIP):  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
  post-LN (BERT):               x = ln1(x + attn(x));  x = ln2(x + mlp(x))
Attention and the MLP are the shared `nn` blocks; parameter names follow CLIP's Hugging Face
layout (`self_attn.{q,k,v}_proj`, `layer_norm1`, `mlp.fc1`, ...). Families with other names
(CLIP's `out_proj`, BERT's `attention.self.query`) map them with their key-map tables.

Pooling reads one position of the last layer (CLIP's [class] and end-of-text tokens, SigLIP's last
text position), so an embedding needs only that position's row of the last layer: `keep` makes the
last layer compute its queries, residuals and MLP there alone (its keys and values still come from
every position). Same numbers, a layer's worth of work less per pooled embedding: about 1/12 of a
12-layer tower, 1/4 of a 4-layer one. `length_groups` cuts a padded batch into groups of similar
length for towers in which padding never reaches the pooled position (causal CLIP text).
"""

from __future__ import annotations

import torch
from torch import nn

from vlmlab.nn import checkpointing
from vlmlab.nn.attention import Attention
from vlmlab.nn.mlp import MLP


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str = "gelu", eps: float = 1e-5,
                 *, norm_first: bool = True, bias: bool = True):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(dim, num_heads, qkv_bias=bias, o_bias=bias)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act, bias=bias)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep: (batch, k) positions: compute the output at those positions only, (batch, k, dim)."""
        if keep is None:
            if self.norm_first:
                x = x + self.self_attn(self.layer_norm1(x), mask=mask, is_causal=is_causal)
                return x + self.mlp(self.layer_norm2(x))
            x = self.layer_norm1(x + self.self_attn(x, mask=mask, is_causal=is_causal))
            return self.layer_norm2(x + self.mlp(x))
        mask = query_rows(mask, is_causal, keep, x.shape[1])
        rows = keep[..., None].expand(-1, -1, x.shape[-1])
        if self.norm_first:
            h = self.layer_norm1(x)
            x = x.gather(1, rows) + self.self_attn(h.gather(1, rows), context=h, mask=mask)
            return x + self.mlp(self.layer_norm2(x))
        x = self.layer_norm1(x.gather(1, rows) + self.self_attn(x.gather(1, rows), context=x, mask=mask))
        return self.layer_norm2(x + self.mlp(x))


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s. `layers` can be cut short: a VLM that reads the penultimate
    layer (LLaVA) runs only the layers it needs."""

    def __init__(self, num_layers: int, dim: int, num_heads: int, mlp_dim: int, act: str = "gelu",
                 eps: float = 1e-5, *, norm_first: bool = True, bias: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, mlp_dim, act, eps, norm_first=norm_first, bias=bias) for _ in range(num_layers)
        )
        self.gradient_checkpointing = False  # nn/checkpointing.py

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False,
                *, num_layers: int | None = None, hidden_states: list[torch.Tensor] | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run the first `num_layers` layers (all by default). If `hidden_states` is a list, the
        input and every layer's output are appended to it (Hugging Face's `hidden_states` order).
        keep: (batch, k) positions: the last layer runs only there and the output is (batch, k, dim)."""
        layers = self.layers[:num_layers]
        if hidden_states is not None:
            hidden_states.append(x)
        for i, layer in enumerate(layers):
            last = keep if i == len(layers) - 1 else None
            x = checkpointing.call(self, layer, x, mask, is_causal, last)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


def padding_mask(attention_mask: torch.Tensor | None, causal: bool = False) -> tuple[torch.Tensor | None, bool]:
    """SDPA mask for a (batch, seq) 1/0 padding mask, optionally causal: (mask, is_causal)."""
    if attention_mask is None:
        return None, causal
    keep = attention_mask.bool()[:, None, None, :]  # (b, 1, 1, seq): keys a query may see
    if causal:
        n = attention_mask.shape[-1]
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()
    # A query with no visible key (a padded query under a causal mask) attends everywhere: no
    # NaNs; its output is never read.
    return keep | ~keep.any(-1, keepdim=True), False


def query_rows(mask: torch.Tensor | None, is_causal: bool, keep: torch.Tensor, n: int) -> torch.Tensor | None:
    """The SDPA mask of the queries at positions `keep` (batch, k) among `n` keys, from the mask
    (or causal flag) of all `n` queries."""
    if mask is None:
        if not is_causal:
            return None
        return torch.arange(n, device=keep.device) <= keep[:, None, :, None]  # (b, 1, k, n)
    if mask.shape[-2] == 1:  # the same keys for every query
        return mask
    index = keep[:, None, :, None].expand(mask.shape[0], mask.shape[1], -1, mask.shape[-1])
    return mask.gather(-2, index)


def length_groups(lengths: torch.Tensor, overhead: int = 64) -> list[tuple[torch.Tensor, int]]:
    """Split a batch into groups of rows run separately, each cut to its longest row: [(row
    indices, length)]. The split minimises the positions computed (rows x length, summed over
    groups) plus `overhead` positions per group (a group's pass of kernel calls), over the cuts of
    the rows sorted by length; optimal cuts fall between distinct lengths, so the search is
    quadratic in those (at most the model's positions), not in the batch."""
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    ends = [i + 1 for i in range(len(sorted_lengths))
            if i + 1 == len(sorted_lengths) or sorted_lengths[i + 1] != sorted_lengths[i]]
    # best[j]: the cost of the rows before ends[j - 1] (best[0]: no rows); cut[j]: where its last group starts
    best, cut = [0] + [float("inf")] * len(ends), [0] * (len(ends) + 1)
    starts = [0] + ends
    for j, end in enumerate(ends, 1):
        for i in range(j):
            cost = best[i] + (end - starts[i]) * sorted_lengths[end - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(ends)
    while j:
        i = cut[j]
        groups.append((order[starts[i]:ends[j - 1]], int(sorted_lengths[ends[j - 1] - 1])))
        j = i
    return groups[::-1]
