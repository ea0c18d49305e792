"""Pixel shuffle (space-to-depth): fewer, wider image tokens before the projector.

Idefics3 / SmolVLM (and nanoVLM) fold every `scale x scale` block of neighbouring patch tokens
into one token `scale**2` times as wide, so a 32 x 32 grid of 768-wide tokens becomes 16 x 16
tokens of 3072 at `scale=2`: a quarter of the tokens the language model reads, no information
dropped. Within a block the channels are ordered row by row, as transformers'
`Idefics3Connector.pixel_shuffle` orders them (the order a trained projector expects).
`PixelShuffleProjector` is the whole connector: shuffle, then a `Projector`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmlab.connectors.projector import Projector
from vlmlab.errors import ConfigError, InputError


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(batch, side * side, dim) row-major square grid of tokens -> (batch, (side / scale)**2,
    dim * scale**2): token (I, J) holds the block's tokens (I*scale + r, J*scale + c) in order
    r, then c."""
    b, seq, dim = x.shape
    side = math.isqrt(seq)
    if side * side != seq or side % scale:
        raise InputError(f"pixel shuffle by {scale} needs a square grid of tokens whose side is a multiple of "
                         f"{scale}; got {seq} tokens")
    n = side // scale
    x = x.reshape(b, side, n, dim * scale)  # each row: groups of `scale` neighbouring columns
    x = x.permute(0, 2, 1, 3).reshape(b, n, n, dim * scale * scale)  # then groups of `scale` rows
    return x.permute(0, 2, 1, 3).reshape(b, n * n, dim * scale * scale)


class PixelShuffleProjector(nn.Module):
    """Pixel shuffle by `scale_factor`, then a projector to the language model's width (Idefics3:
    one linear layer without bias, `Projector("linear", bias=False)`)."""

    def __init__(self, in_dim: int, out_dim: int, scale_factor: int, projector: str = "linear", bias: bool = False):
        super().__init__()
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, int) or scale_factor < 1:
            raise ConfigError(f"pixel shuffle scale_factor must be a positive integer, got {scale_factor!r}")
        self.scale_factor = scale_factor
        self.projector = Projector(projector, in_dim * scale_factor**2, out_dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(pixel_shuffle(x, self.scale_factor))
