"""The bidirectional transformer encoder of ViT, CLIP, SigLIP and BERT.

One block, two residual orders:
  pre-LN (ViT, CLIP, SigLIP):  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
  post-LN (BERT):               x = ln1(x + attn(x));  x = ln2(x + mlp(x))
Attention and the MLP are the shared `nn` blocks; parameter names follow CLIP's Hugging Face
layout (`self_attn.{q,k,v}_proj`, `layer_norm1`, `mlp.fc1`, ...). Families with other names
(CLIP's `out_proj`, BERT's `attention.self.query`) map them with their key-map tables.
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.norm_first:
            x = x + self.self_attn(self.layer_norm1(x), mask=mask, is_causal=is_causal)
            return x + self.mlp(self.layer_norm2(x))
        x = self.layer_norm1(x + self.self_attn(x, mask=mask, is_causal=is_causal))
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
                *, num_layers: int | None = None, hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run the first `num_layers` layers (all by default). If `hidden_states` is a list, the
        input and every layer's output are appended to it (Hugging Face's `hidden_states` order)."""
        if hidden_states is not None:
            hidden_states.append(x)
        for layer in self.layers[:num_layers]:
            x = checkpointing.call(self, layer, x, mask, is_causal)
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
