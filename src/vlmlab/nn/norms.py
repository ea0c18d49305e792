"""Normalisation layers: LayerNorm (CLIP, SigLIP, BERT) and RMSNorm (Llama-family decoders)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (PyTorch's fused kernel accumulates in float32 for half inputs).

    `unit_offset=True` scales by (1 + weight), the Gemma convention, so later families reuse this.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1.0 if self.unit_offset else self.weight
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


LayerNorm = nn.LayerNorm


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """A norm layer from its name in a config: 'rmsnorm' or 'layernorm'."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'rmsnorm' or 'layernorm'")
