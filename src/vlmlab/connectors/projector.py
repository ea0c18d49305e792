"""The LLaVA projector: image features -> language-model embeddings, built from a short string.

"linear" is LLaVA 1.0's single linear map; "mlp2x_gelu" is LLaVA 1.5's two linear layers with a
GELU between (any depth and any activation of `nn.mlp.ACTIVATIONS`: "mlp3x_silu", ...). Layers are
named `linear_1`, `linear_2`, ... as in Hugging Face's `LlavaMultiModalProjector`.

`Standardize` is an optional step before the projector: per-channel (x - mean) / std with
statistics measured once on sample images and saved with the weights. A ViT's patch outputs
often share one large vector (scenes-clip's penultimate layer: more than half of every token's
energy); a new projector maps that vector up too, so every image token the language model reads
is nearly the same (cosine 0.9 between tokens of one image and between images) and the
differences that describe the image are a small part of a large input. Standardised, the
projector starts from the differences.

`GridPositions` is an optional step after the projector: a learned embedding of each image
token's row plus one of its column, added to the token. A language model reads the image tokens
in raster order and can tell where a token is only from what it carries or from its offset in the
sequence; a tower trained to say what is under each patch keeps little of its position embedding
(experiments/scenes_smol_probe.py positions), and the projector drops most of the rest.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from vlmlab.errors import ConfigError
from vlmlab.nn.mlp import ACTIVATIONS, get_activation

_MLP = re.compile(r"^mlp(\d+)x_(\w+)$")


def parse_projector(kind: str) -> tuple[int, str | None]:
    """'linear' -> (1, None); 'mlp2x_gelu' -> (2, 'gelu'). ConfigError for anything else."""
    if kind == "linear":
        return 1, None
    m = _MLP.match(kind)
    if m is None or int(m.group(1)) < 1 or m.group(2) not in ACTIVATIONS:
        raise ConfigError(f"projector {kind!r}: expected 'linear' or 'mlp<N>x_<activation>' "
                          f"(e.g. 'mlp2x_gelu'; activations: {', '.join(sorted(ACTIVATIONS))})")
    return int(m.group(1)), m.group(2)


class Projector(nn.Module):
    def __init__(self, kind: str, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.kind = kind
        depth, act = parse_projector(kind)
        self.depth = depth
        self.act = get_activation(act) if act else None
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(in_dim if i == 0 else out_dim, out_dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            if i:
                x = self.act(x)
            x = getattr(self, f"linear_{i + 1}")(x)
        return x


class Standardize(nn.Module):
    """(x - mean) / std per channel, with fixed statistics (buffers: saved, loaded, never trained).
    New: the identity (mean 0, std 1) until `calibrate` measures them."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor) -> None:
        """Set the statistics from `features` (..., width): every token of every sample image."""
        flat = features.reshape(-1, features.shape[-1]).float()
        if flat.shape[0] < 2:
            raise ConfigError("Standardize.calibrate: needs at least 2 feature vectors")
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class GridPositions(nn.Module):
    """x + rows[r] + columns[c] for the token at row r, column c of a rows x columns grid, tokens
    in raster order (x: (..., rows * columns, width)). New: zeros, the identity until trained."""

    def __init__(self, rows: int, columns: int, width: int):
        super().__init__()
        self.rows = nn.Parameter(torch.zeros(rows, width))
        self.columns = nn.Parameter(torch.zeros(columns, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (self.rows[:, None] + self.columns[None]).flatten(0, 1)
        if x.shape[-2] != grid.shape[0]:
            raise ConfigError(f"GridPositions: {x.shape[-2]} tokens, expected {self.rows.shape[0]} x "
                              f"{self.columns.shape[0]} = {grid.shape[0]}")
        return x + grid.to(x.dtype)
