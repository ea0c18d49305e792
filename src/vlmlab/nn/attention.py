"""Multi-head attention on `F.scaled_dot_product_attention`: grouped-query heads, self- and
cross-attention, causal / bidirectional / custom masks, and a preallocated KV cache.

Masks follow SDPA's convention: a boolean mask is True where a query may attend to a key; a
float mask is added to the scores. Shapes broadcast to (batch, heads, q_len, kv_len).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import PromptTooLongError
from vlmlab.nn.packed import packed_call
from vlmlab.nn.rope import apply_rotary


class KVCache:
    """Keys and values of every layer, preallocated to `capacity` positions.

    Buffers are (batch, kv_heads, capacity, head_dim), allocated on a layer's first update on the
    device of its keys, in `dtype` (default: the keys' dtype). Attention runs in the cache's dtype,
    so a float32 cache makes a bfloat16 model attend in float32 (faster on CPUs, see
    `infer.generate.cache_dtype`). `length` counts positions written; the model advances it once
    per forward after all layers have written, so every layer sees the same offset.
    """

    def __init__(self, num_layers: int, capacity: int, dtype: torch.dtype | None = None):
        self.capacity = capacity
        self.dtype = dtype
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # (batch,) added to each row's 1D decoding positions: M-RoPE prompts (nn/rope.py) end at
        # another position id than their length. None: no offsets.
        self.rope_offsets: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (batch, kv_heads, n, head_dim); return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise PromptTooLongError(
                f"KV cache holds {self.capacity} positions but {end} were needed; "
                "ask for fewer new tokens or a shorter prompt"
            )
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            dtype = self.dtype or k.dtype
            self.keys[layer] = k.new_empty(b, h, self.capacity, d, dtype=dtype)
            self.values[layer] = v.new_empty(b, h, self.capacity, v.shape[-1], dtype=dtype)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    # ---- a batch whose rows come and go (continuous batching, infer/batching.py) -------------

    @classmethod
    def merge(cls, caches: list["KVCache"], capacity: int) -> "KVCache":
        """One cache holding the rows of `caches` in order, each right-aligned to the longest:
        a shorter cache's rows get zeros in front (the caller masks them out as padding)."""
        length = max(c.length for c in caches)
        if capacity < length:
            raise ValueError(f"capacity {capacity} is below the merged length {length}")
        merged = cls(len(caches[0].keys), capacity, caches[0].dtype)
        merged.length = length
        for layer in range(len(merged.keys)):
            for name in ("keys", "values"):
                parts = [getattr(c, name)[layer] for c in caches]
                first = parts[0]
                out = first.new_zeros(sum(p.shape[0] for p in parts), first.shape[1], capacity, first.shape[3])
                row = 0
                for c, p in zip(caches, parts):
                    out[row:row + p.shape[0], :, length - c.length:length] = p[:, :, :c.length]
                    row += p.shape[0]
                getattr(merged, name)[layer] = out
        if any(c.rope_offsets is not None for c in caches):
            merged.rope_offsets = torch.cat([c.rope_offsets if c.rope_offsets is not None else
                                             torch.zeros(c.keys[0].shape[0], dtype=torch.long, device=c.keys[0].device)
                                             for c in caches])
        return merged

    def select(self, rows: torch.Tensor, drop_front: int = 0) -> None:
        """Keep only `rows` (indices along the batch), and drop the first `drop_front` positions
        (padding that every kept row has) to keep attention short."""
        for buffers in (self.keys, self.values):
            for layer, buf in enumerate(buffers):
                kept = buf.index_select(0, rows)  # the one copy; dropping the front is a view of it
                buffers[layer] = kept[:, :, drop_front:] if drop_front else kept
        if self.rope_offsets is not None:
            self.rope_offsets = self.rope_offsets.index_select(0, rows.to(self.rope_offsets.device))
        self.length -= drop_front
        self.capacity -= drop_front

    def reserve(self, capacity: int) -> None:
        """Grow every layer's buffers to hold at least `capacity` positions."""
        if capacity <= self.capacity:
            return
        for buffers in (self.keys, self.values):
            for layer, buf in enumerate(buffers):
                if buf is not None:
                    grown = buf.new_zeros(*buf.shape[:2], capacity, buf.shape[3])
                    grown[:, :, :self.length] = buf[:, :, :self.length]
                    buffers[layer] = grown
        self.capacity = capacity


def make_attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = True,
    padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Build the SDPA mask for queries that are the last `q_len` of `kv_len` positions.

    padding_mask: (batch, kv_len), True/1 for real tokens, False/0 for padding.
    Returns (mask, is_causal): mask is None when SDPA's own `is_causal` flag (or no mask at all)
    expresses the pattern, which lets SDPA pick its fastest kernel.
    """
    if padding_mask is None and sliding_window is None:
        if not causal or q_len == 1:
            return None, False
        if q_len == kv_len:
            return None, True
    if padding_mask is not None:
        device = padding_mask.device
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos if causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    mask = mask[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]
        # A padded query may have no key to attend to; let it attend to all keys so SDPA does not
        # produce NaNs. Its output is never used.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask, False


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (num_kv_heads divides num_heads).

    Self-attention by default; pass `context` for cross-attention (keys/values from `context`,
    whose width is `kv_dim`). Projections are named q_proj/k_proj/v_proj/o_proj.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        kv_dim: int | None = None,
        scale: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = head_dim or dim // num_heads
        self.scale = scale if scale is not None else self.head_dim**-0.5
        kv_dim = kv_dim or dim
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=o_bias)
        self.recorded: list[torch.Tensor] | None = None  # `record_attention` collects probabilities here

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        src = x if context is None else context
        fused = packed_call(self, "qkv", x) if context is None else None
        q, k, v = fused or (self.q_proj(x), self.k_proj(src), self.v_proj(src))
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, src.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, src.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, k, *rope)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        if self.recorded is not None:
            self.recorded.append(attention_probs(q.to(k.dtype), k, mask, is_causal and mask is None, self.scale))
        out = F.scaled_dot_product_attention(
            q.to(k.dtype),
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal and mask is None,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(b, t, -1))


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                    scale: float) -> torch.Tensor:
    """The attention probabilities SDPA computes internally: (batch, heads, queries, keys), float32."""
    if k.shape[1] != q.shape[1]:  # grouped-query heads share keys
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(-1)


@contextmanager
def record_attention(modules: Iterable[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Collect the attention probabilities of the `Attention` layers among `modules` while the
    block runs: yields one list per layer (in order), each filled with one (batch, heads,
    queries, keys) tensor per forward call. For inspection (`vlmlab explain`), not for speed."""
    layers = [m for m in modules if isinstance(m, Attention)]
    for layer in layers:
        layer.recorded = []
    try:
        yield [layer.recorded for layer in layers]
    finally:
        for layer in layers:
            layer.recorded = None
