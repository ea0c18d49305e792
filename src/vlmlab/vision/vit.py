"""The vision transformer (ViT) as CLIP and SigLIP build it: the eye of every VLM here.

An image is cut into patch x patch squares, each linearly embedded (a strided convolution);
CLIP prepends a learned [class] token; learned position embeddings are added (bicubically
interpolated when the patch grid differs from the one trained, including non-square grids);
a pre-LN transformer encoder mixes the tokens. Idefics2/3 (NaViT's "Patch n' Pack") instead give
each patch the trained position its fractional coordinate falls in (`position_buckets`), for any
grid size, exactly as transformers computes it. Pooling: CLIP takes the [class] token through
`post_layernorm`; SigLIP normalises every token and pools with a multi-head attention probe
(`AttentionPoolingHead`, "MAP"). VLMs read the hidden states of any layer instead (LLaVA: the
penultimate layer's patch tokens), and can stop the encoder early to save the remaining layers.
Training may drop most patch tokens before the encoder (FLIP's masking, `random_patches`): the
encoder's cost falls with the tokens it sees, and inference still sees every patch.

Parameter names follow Hugging Face's CLIPVisionModel / SiglipVisionModel (`embeddings.*`,
`pre_layrnorm`, `encoder.layers.N.*`, `post_layernorm`, `head.*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.checkpoints.hf import require_positive
from vlmlab.errors import ConfigError, InputError
from vlmlab.nn.attention import Attention
from vlmlab.nn.encoder import Encoder
from vlmlab.nn.mlp import MLP


@dataclass
class ViTConfig:
    """A ViT's hyper-parameters; field names follow HF's CLIPVisionConfig / SiglipVisionConfig."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Family switches (not in HF configs: each family file sets them).
    class_token: bool = True  # CLIP: a [class] token first; SigLIP: none
    pre_norm: bool = True  # CLIP's `pre_layrnorm` after the embeddings
    patch_bias: bool = False  # SigLIP's patch embedding has a bias
    pooling: str = "cls"  # "cls" (CLIP), "map" (SigLIP attention probe), "mean" (of the patch tokens), "none"
    position_buckets: bool = False  # Idefics3: positions by fractional-coordinate buckets, not interpolation

    HF_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps")

    def __post_init__(self) -> None:
        require_positive(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_channels", "image_size", "patch_size"), what="vision config")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.pooling not in ("cls", "map", "mean", "none"):
            raise ConfigError(f"vision pooling {self.pooling!r}: expected 'cls', 'map', 'mean' or 'none'")
        if self.pooling == "cls" and not self.class_token:
            raise ConfigError("vision pooling 'cls' needs class_token=True")
        if self.position_buckets and self.class_token:
            raise ConfigError("vision position_buckets needs class_token=False")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **switches: Any) -> "ViTConfig":
        """From an HF vision config dict (missing fields take HF's defaults for the family, given by the caller)."""
        known = {k: hf[k] for k in cls.HF_FIELDS if k in hf}
        return cls(**{**known, **switches})

    def to_hf(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.HF_FIELDS}


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (batch, tokens, hidden): CLIP before post_layernorm, SigLIP after
    pooled: torch.Tensor | None  # (batch, hidden)
    hidden_states: list[torch.Tensor] | None = None  # embeddings output, then every layer's output


class PatchEmbeddings(nn.Module):
    """Patches -> vectors, plus the [class] token and the position embeddings."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=cfg.patch_bias)
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.grid**2 + int(cfg.class_token), cfg.hidden_size)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings for a rows x cols patch grid: the trained ones, bicubically resized
        when the grid differs, or (`position_buckets`) picked by fractional coordinate."""
        table = self.position_embedding.weight
        g = self.cfg.grid
        if self.cfg.position_buckets:
            ids = position_buckets(rows, g, table.device)[:, None] * g + position_buckets(cols, g, table.device)
            return table[ids.flatten()]
        if (rows, cols) == (g, g):
            return table
        cls_pos, patch_pos = (table[:1], table[1:]) if self.cfg.class_token else (table[:0], table)
        grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.num_channels:
            raise InputError(f"pixel_values must be (batch, {self.cfg.num_channels}, height, width), "
                             f"got {tuple(pixel_values.shape)}")
        b, _, h, w = pixel_values.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise InputError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (b, rows * cols, hidden), row-major patches
        if self.cfg.class_token:
            x = torch.cat([self.class_embedding.expand(b, 1, -1), x], dim=1)
        return x + self.positions(h // p, w // p)


def select_patches(x: torch.Tensor, patches: torch.Tensor, prefix: int) -> torch.Tensor:
    """x (batch, prefix + patches, hidden) with only the given patch tokens (batch, k) after its
    `prefix` tokens ([class]), in the order given."""
    n = x.shape[1] - prefix
    if patches.dim() != 2 or patches.shape[0] != x.shape[0] or patches.dtype != torch.long:
        raise InputError(f"patches must be a (batch={x.shape[0]}, k) int64 tensor of patch indices, "
                         f"got {tuple(patches.shape)} {patches.dtype}")
    if patches.numel() and not (0 <= int(patches.min()) and int(patches.max()) < n):
        raise InputError(f"patch indices must lie in [0, {n}) for this image's {n} patches")
    kept = x[:, prefix:].gather(1, patches[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :prefix], kept], dim=1)


def random_patches(num_patches: int, keep: float, seeds: list[int]) -> torch.Tensor:
    """(len(seeds), k) sorted indices of k = round(keep * num_patches) patches (at least one),
    drawn uniformly without replacement, one draw per seed: FLIP's random masking ("Scaling
    Language-Image Pre-training via Masking", Li et al. 2023), which trains on a fraction of each
    image's patches for a proportional saving. Seeded per sample, so a run does not depend on how
    its batches are split between processes or resumed."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"patch keep fraction {keep}: expected a fraction in (0, 1]")
    k = max(1, round(keep * num_patches))
    rows = [torch.randperm(num_patches, generator=torch.Generator().manual_seed(s))[:k] for s in seeds]
    return torch.stack(rows).sort(dim=1).values if rows else torch.zeros(0, k, dtype=torch.long)


def position_buckets(n: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """Which of `grid` trained position rows (or columns) each of `n` patch rows takes, as
    Idefics2/3 compute it: the patch's fractional coordinate i/n, bucketed at the boundaries
    k/grid, in float32. The rounding is transformers' too: at some grids (19, 25, ...) even n == grid
    repeats a neighbour's id instead of giving 0..grid-1, and trained weights expect that."""
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=device)
    coords = torch.arange(n, dtype=torch.float32, device=device) * (1.0 / torch.tensor(n, device=device))
    return torch.bucketize(coords.clamp(max=1.0 - 1e-6), boundaries, right=True)


class AttentionPoolingHead(nn.Module):
    """SigLIP's multi-head attention pooling (MAP): a learned probe attends over all tokens, then a
    residual MLP. HF stores the attention as `torch.nn.MultiheadAttention` (`in_proj_weight`,
    `out_proj`); the SigLIP family file splits that into q/k/v on load and joins it on save."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, qkv_bias=True, o_bias=True)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), context=x)
        return (h + self.mlp(self.layernorm(h)))[:, 0]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = PatchEmbeddings(cfg)
        if cfg.pre_norm:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's spelling
        self.encoder = Encoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                               cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.pooling == "map":
            self.head = AttentionPoolingHead(cfg)

    def embed(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's input: patch, [class] and position embeddings (then CLIP's pre-LN).

        patches: (batch, k) row-major indices of the patch tokens to keep, the rest dropped after
        the position embeddings are added (FLIP's masking, see `random_patches`); a [class] token
        is always kept."""
        x = self.embeddings(pixel_values)
        if patches is not None:
            x = select_patches(x, patches, int(self.cfg.class_token))
        return self.pre_layrnorm(x) if self.cfg.pre_norm else x

    def forward(self, pixel_values: torch.Tensor, *, patches: torch.Tensor | None = None,
                num_layers: int | None = None, output_hidden_states: bool = False) -> VisionOutput:
        """Encode images. num_layers: run only that many encoder layers (then `pooled` is None);
        patches: only these patch tokens (see `embed`)."""
        x = self.embed(pixel_values, patches)
        states: list[torch.Tensor] | None = [] if output_hidden_states else None
        x = self.encoder(x, num_layers=num_layers, hidden_states=states)
        if num_layers is not None and num_layers < self.cfg.num_hidden_layers:
            return VisionOutput(x, None, states)
        if self.cfg.pooling == "cls":
            return VisionOutput(x, self.post_layernorm(x[:, 0]), states)
        if self.cfg.pooling == "mean":  # global average of the patch tokens (the [class] token left out)
            return VisionOutput(x, self.post_layernorm(x[:, int(self.cfg.class_token):].mean(1)), states)
        x = self.post_layernorm(x)
        return VisionOutput(x, self.head(x) if self.cfg.pooling == "map" else None, states)

    def pool(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor | None:
        """`forward(pixel_values, patches=patches).pooled` with less work: with [class] pooling the
        last layer computes the [class] token alone (mean and attention pooling read every token)."""
        if self.cfg.pooling != "cls":
            return self(pixel_values, patches=patches).pooled
        x = self.embed(pixel_values, patches)
        keep = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return self.post_layernorm(self.encoder(x, keep=keep)[:, 0])

    def feature_layer(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states after encoder layer `layer` (HF indexing: 0 = embeddings, -1 = last,
        -2 = penultimate), running no layer beyond it."""
        n = self.cfg.num_hidden_layers
        index = layer if layer >= 0 else n + 1 + layer
        if not 0 <= index <= n:
            raise InputError(f"vision feature layer {layer} is out of range for {n} layers")
        x = self.embed(pixel_values)
        return self.encoder(x, num_layers=index)
