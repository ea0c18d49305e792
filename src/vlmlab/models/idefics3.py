"""Idefics3 (Laurençon et al. 2024) and SmolVLM (Marafioti et al. 2025, the same architecture):
a SigLIP-style vision tower read at its last layer, a pixel-shuffle connector, and a Llama decoder
that reads the image features in place of placeholder tokens.

Images are split into tiles plus a global view (`vision/tiling.py`); every tile is one vision
input of `image_size` pixels square. The tower is SigLIP's without [class] token or pooling head,
its tokens all normalised by `post_layernorm`, with NaViT-style positions (`position_buckets`:
transformers' fractional-coordinate ids, reproduced with their rounding). The connector folds
each `scale_factor` x `scale_factor` block of tokens into one (`connectors/pixel_shuffle.py`) and
projects it with one linear map without bias, so a tile gives `image_seq_len` =
(grid / scale_factor)**2 features. In the prompt each "<image>" marker becomes, per tile,
`<fake_token_around_image><row_R_col_C>` and `image_seq_len` `<image>` placeholders (a newline
after each row of tiles), then a blank line and the global view
`<fake_token_around_image><global-img>` + placeholders + `<fake_token_around_image>`: the text
transformers' Idefics3Processor writes (`image_prompt`, `Idefics3Processor`). Batches that
transformers' processor pads to equal tile counts with all-zero images work too: those are
dropped, as transformers drops them.

Loads Hugging Face `Idefics3ForConditionalGeneration` folders. transformers 4.45 to 5.x write one
layout (`model.vision_model.*`, `model.connector.modality_projection.proj.weight`,
`model.text_model.*`, `lm_head.weight`); the lm_head is tied to the embeddings when the top-level
`tie_word_embeddings` says so (transformers 5 reads that one, not text_config's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmlab.checkpoints.hf import write_json
from vlmlab.checkpoints.state import KeyMap, load_state, rename
from vlmlab.connectors.pixel_shuffle import PixelShuffleProjector
from vlmlab.errors import ConfigError
from vlmlab.fusion.placeholders import PlaceholderVLM
from vlmlab.text.llama import LlamaConfig, LlamaForCausalLM
from vlmlab.vision.tiling import PROCESSOR_CONFIG, TiledImageProcessor
from vlmlab.vision.vit import ViTConfig, VisionTransformer

HF_ARCHITECTURES = ("Idefics3ForConditionalGeneration",)

# transformers' Idefics3VisionConfig defaults, and the ViT switches of this tower
VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6)
VISION_SWITCHES = dict(class_token=False, pre_norm=False, patch_bias=True, pooling="none", position_buckets=True)

IMAGE_TOKEN = "<image>"
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TAG = "<global-img>"
_HF_OWN = ("architectures", "model_type", "vision_config", "text_config", "scale_factor", "image_token_id",
           "tie_word_embeddings", "transformers_version", "dtype", "torch_dtype")


@dataclass
class Idefics3Config:
    vision: ViTConfig
    text: LlamaConfig
    scale_factor: int = 2
    image_token_id: int = 128257
    vision_extra: dict[str, Any] = field(default_factory=dict)  # other vision_config fields, carried through
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level config.json fields, carried through

    def __post_init__(self) -> None:
        s = self.scale_factor
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"scale_factor must be a positive integer, got {s!r}")
        if self.vision.grid % s:
            raise ConfigError(f"the vision grid (image_size / patch_size = {self.vision.grid}) is not a multiple of "
                              f"scale_factor {s}")

    @property
    def image_seq_len(self) -> int:
        """Image features (and `<image>` placeholders) per tile."""
        return (self.vision.grid // self.scale_factor) ** 2

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "Idefics3Config":
        vision, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise ConfigError("'vision_config' and 'text_config' must be objects")
        tied = hf.get("tie_word_embeddings", False)
        return cls(
            vision=ViTConfig.from_hf({**VISION_DEFAULTS, **vision}, **VISION_SWITCHES),
            text=LlamaConfig.from_hf({**text, "tie_word_embeddings": tied}),
            scale_factor=hf.get("scale_factor", 2),
            image_token_id=hf.get("image_token_id", 128257),
            vision_extra={k: v for k, v in vision.items() if k not in ViTConfig.HF_FIELDS and k != "model_type"},
            extra={k: v for k, v in hf.items() if k not in _HF_OWN},
        )

    def to_hf(self) -> dict[str, Any]:
        text = self.text.to_hf()
        return {
            **self.extra, "architectures": list(HF_ARCHITECTURES), "model_type": "idefics3",
            "vision_config": {**self.vision_extra, **self.vision.to_hf(), "model_type": "idefics3_vision"},
            "text_config": text, "scale_factor": self.scale_factor, "image_token_id": self.image_token_id,
            "tie_word_embeddings": text["tie_word_embeddings"],
        }


class Idefics3Net(PlaceholderVLM):
    """Vision tower, pixel-shuffle connector, decoder; prompts, generation and the count check:
    `PlaceholderVLM`."""

    feature_unit = "image tile"

    def __init__(self, cfg: Idefics3Config):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.connector = PixelShuffleProjector(cfg.vision.hidden_size, cfg.text.hidden_size, cfg.scale_factor)
        self.language_model = LlamaForCausalLM(cfg.text)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, image_seq_len, LM width): every tile's last-layer tokens, pixel-shuffled and
        projected. `pixel_values` is (tiles, 3, H, W), or transformers' (batch, images, 3, H, W);
        all-zero images (the padding of transformers' processor) are dropped in both."""
        if pixel_values.dim() == 5:
            pixel_values = pixel_values.flatten(0, 1)
        pixel_values = pixel_values[(pixel_values != 0).flatten(1).any(1)]
        if not len(pixel_values):  # nothing but padding: no features (the tower cannot run on none)
            width = self.cfg.text.hidden_size  # (packed linears have no .weight: ask the embedding for the dtype)
            return self.language_model.model.embed_tokens.weight.new_zeros(0, self.cfg.image_seq_len, width)
        return self.connector(self.vision_model(pixel_values).last_hidden_state)

    # ---- checkpoints ----

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin, dtype: torch.dtype | None = None) -> None:
        """Load a checkpoint strictly (a missing or extra tensor is a CheckpointError naming it)."""
        renamed = {rename(k, HF_KEY_MAP): v for k, v in tensors.items()}
        optional = ["language_model.lm_head.weight"] if self.cfg.text.tie_word_embeddings else []
        load_state(self, renamed, origin=origin, ignore=HF_IGNORED, optional=optional, dtype=dtype)
        self.tie_weights()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors in the layout transformers writes (the tied head left out)."""
        sd = {rename(k, TO_HF_KEY_MAP): v for k, v in self.state_dict().items()}
        if self.cfg.text.tie_word_embeddings:
            sd.pop("lm_head.weight")
        return sd


# The on-disk layout -> ours.
HF_KEY_MAP: KeyMap = [
    (r"^model\.vision_model\.", "vision_model."),
    (r"^vision_model\.(.*)\.out_proj\.", r"vision_model.\1.o_proj."),
    (r"^model\.connector\.modality_projection\.proj\.", "connector.projector.linear_1."),
    (r"^model\.text_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
TO_HF_KEY_MAP: KeyMap = [
    (r"^vision_model\.(.*)\.o_proj\.", r"vision_model.\1.out_proj."),
    (r"^vision_model\.", "model.vision_model."),
    (r"^connector\.projector\.linear_1\.", "model.connector.modality_projection.proj."),
    (r"^language_model\.model\.", "model.text_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]
HF_IGNORED = [r"rotary_emb\.inv_freq$"]


# ---- prompts ------------------------------------------------------------------------------------


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text one image's "<image>" marker becomes, exactly as transformers' Idefics3Processor
    writes it: the tiles row by row (a newline after each row), a newline, the global view; only
    the global view for an unsplit image (rows = cols = 0)."""
    placeholders = IMAGE_TOKEN * image_seq_len
    global_view = f"{FAKE_TOKEN}{GLOBAL_TAG}{placeholders}{FAKE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_view
    grid = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{placeholders}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{global_view}"


class Idefics3Processor:
    """Images -> tiles' pixel values and the prompt text of each image, as transformers'
    Idefics3Processor: the `VisionLanguageModel` hook `prompt_images`."""

    def __init__(self, images: TiledImageProcessor, image_seq_len: int):
        self.images = images
        self.image_seq_len = image_seq_len

    def prompt_images(self, images: list, tokenizer) -> tuple[torch.Tensor, list[list[int]]]:
        """Pixel values (all images' tiles, 3, tile, tile) and, per image, the token ids of its
        prompt text (`image_prompt`)."""
        tiled = self.images(images)
        prompts = [image_prompt(rows, cols, self.image_seq_len) for rows, cols in tiled.grids]
        return tiled.pixel_values, [tokenizer.encode(p, add_special_tokens=False) for p in prompts]

    def view(self, width: int, height: int) -> tuple[float, float, float, float]:
        return self.images.view(width, height)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, cfg: Idefics3Config) -> "Idefics3Processor":
        """The folder's image processor (transformers' defaults at the model's tile size when it
        has none); placeholders per tile from the model config (`cfg.image_seq_len`)."""
        images = TiledImageProcessor.from_folder(folder) or TiledImageProcessor.for_tile(cfg.vision.image_size)
        return cls(images, cfg.image_seq_len)

    def to_folder(self, folder: str | os.PathLike) -> None:
        """preprocessor_config.json (transformers 4.x) and processor_config.json (5.x, with
        `image_seq_len`, which transformers' processor needs to expand the prompt the same way)."""
        self.images.to_folder(folder)
        write_json(Path(folder) / PROCESSOR_CONFIG, {"processor_class": "Idefics3Processor",
                                                     "image_seq_len": self.image_seq_len,
                                                     "image_processor": self.images.to_hf()})
