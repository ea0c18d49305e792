"""Rotary position embeddings (RoPE) for arbitrary position ids.

`RotaryEmbedding` turns position ids into (cos, sin) tables once per forward; `apply_rotary`
rotates queries and keys with them (the "rotate half" convention of the Hugging Face checkpoints;
GGUF files store Q/K permuted for llama.cpp's interleaved convention and are un-permuted on load).
Position ids are (batch, seq) for 1D RoPE. Multimodal RoPE (`MultimodalRotaryEmbedding`, Qwen2-VL's
M-RoPE) takes (3, batch, seq) ids -- temporal, height, width -- and rotates each section of the
frequencies by one of them; `grid_position_ids` makes those ids for a prompt whose image tokens
lie on grids. 2D RoPE (vision towers) would likewise build its tables from (row, col) ids.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError, InputError


def rope_inv_freq(dim: int, base: float, scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary channels and the attention scaling factor.

    `scaling` is the checkpoint's `rope_scaling` / `rope_parameters` dict; supported types are
    default, linear and llama3 (Llama 3.1+). Others raise `ConfigError` rather than run wrong.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ConfigError(f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")


def sequence_position_ids(padding: torch.Tensor | None, past: int, batch: int, length: int,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """1D position ids (batch, length) of the `length` tokens after `past` cached ones: counted over
    each row's real tokens when a (batch, past + length) `padding` mask (true at real tokens) is
    given, so left padding does not shift them; 0 at padding."""
    if padding is not None:
        return (padding.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    return torch.arange(past, past + length, device=device).expand(batch, length)


class RotaryEmbedding(nn.Module):
    """Maps position ids (batch, seq) to cos/sin tables (batch, seq, dim), computed in float32."""

    def __init__(self, dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(dim, base, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq, dim / 2): each position times each inverse frequency."""
        return position_ids[..., None].float() * self.inv_freq.float()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = self.frequencies(position_ids)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (batch, heads, seq, head_dim) by cos/sin (batch, seq, rot_dim).

    When rot_dim < head_dim (partial rotary), only the leading rot_dim channels rotate.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


class MultimodalRotaryEmbedding(RotaryEmbedding):
    """M-RoPE: each of the `dim / 2` rotary frequencies turns with one component of (3, batch,
    seq) position ids (temporal, height, width), `sections` = how many frequencies each gets (they
    sum to dim / 2). Qwen2-VL gives them contiguous blocks, t the fastest frequencies and w the
    slowest; `interleaved` (Qwen3-VL) alternates t, h, w from the fastest on, so height and width
    both span the whole spectrum (the rest go to t). Text has the same id in all three, so it is
    rotated exactly as by 1D RoPE; (batch, seq) ids are taken as that."""

    def __init__(self, dim: int, base: float = 10000.0, sections: tuple[int, ...] = (), scaling=None, *,
                 interleaved: bool = False):
        super().__init__(dim, base, scaling)
        if len(sections) != 3 or sum(sections) != dim // 2 or min(sections) < 1:
            raise ConfigError(f"M-RoPE sections {list(sections)} must be 3 positive counts that sum to {dim // 2} "
                              f"(half the rotary dimension {dim})")
        self.sections, self.interleaved = tuple(int(n) for n in sections), interleaved
        if interleaved:
            component = torch.zeros(dim // 2, dtype=torch.long)
            for axis in (1, 2):
                component[axis:3 * self.sections[axis]:3] = axis
        else:
            component = torch.cat([torch.full((n,), i) for i, n in enumerate(self.sections)])
        if [int((component == i).sum()) for i in range(3)] != list(self.sections):
            raise ConfigError(f"interleaved M-RoPE sections {list(sections)} do not fit {dim // 2} frequencies "
                              "(height and width take every third one from the second and third on)")
        self.register_buffer("component", component, persistent=False)

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = super().frequencies(position_ids)  # (3, batch, seq, dim / 2) or, 1D, (batch, seq, dim / 2)
        if position_ids.dim() == 2:
            return freqs
        return freqs.gather(0, self.component.expand(1, *freqs.shape[1:3], -1)).squeeze(0)


def grid_position_ids(
    is_image: torch.Tensor, grid: tuple[int, int], padding: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, batch, seq) for prompts whose image tokens come in runs of
    rows x columns, each in raster order (`is_image`: (batch, seq) bool; `padding`: (batch, seq),
    true at real tokens). Text continues one past the largest id so far (p, p, p); an image's
    token at (r, c) gets (p, p + r, p + c), and the text after it starts at p + max(rows, columns).
    Also returns each row's offset (batch,): its next position id minus its number of real
    tokens, which decoding adds to 1D positions."""
    rows, columns = grid
    per_image, step = rows * columns, max(rows, columns)
    real = torch.ones_like(is_image, dtype=torch.bool) if padding is None else padding.bool()
    image, text = is_image & real, ~is_image & real
    images_so_far = image.long().cumsum(-1) - image.long()  # image tokens before each token
    k = images_so_far % per_image  # an image token's place in its image
    previous_is_image = torch.nn.functional.pad(image, (1, 0))[:, :-1]
    if bool((image & (k > 0) & ~previous_is_image).any()) or bool((image.sum(-1) % per_image).any()):
        raise InputError(f"image tokens must come in unbroken runs of {rows} x {columns} = {per_image}")
    base = text.long().cumsum(-1) - text.long() + step * (images_so_far // per_image)
    ids = torch.stack([base, base + image * (k // columns), base + image * (k % columns)])
    ids = ids.masked_fill(~real, 1)
    offsets = (image.sum(-1) // per_image) * (step - per_image)
    return ids, offsets
