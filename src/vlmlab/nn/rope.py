"""Rotary position embeddings (RoPE) for arbitrary position ids.

`RotaryEmbedding` turns position ids into (cos, sin) tables once per forward; `apply_rotary`
rotates queries and keys with them (the "rotate half" convention of the Hugging Face checkpoints;
GGUF files store Q/K permuted for llama.cpp's interleaved convention and are un-permuted on load).
Position ids are (batch, seq) for 1D RoPE. Multimodal RoPE (M-RoPE, Qwen2-VL) will pass
(3, batch, seq) ids -- temporal, height, width -- and pick frequency sections per component;
2D RoPE (vision towers) likewise builds its tables from (row, col) ids. Both extend this class.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vlmlab.errors import ConfigError


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


class RotaryEmbedding(nn.Module):
    """Maps position ids (batch, seq) to cos/sin tables (batch, seq, dim), computed in float32."""

    def __init__(self, dim: int, base: float = 10000.0, scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(dim, base, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
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
