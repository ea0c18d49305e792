"""CLIP (Radford et al. 2021): a ViT and a causal text transformer, each followed by a linear
projection into a shared space, trained so matching image-text pairs score highest.

Loads Hugging Face `CLIPModel` folders: the current layout and the legacy one (transformers < 4.31
also stored `embeddings.position_ids` buffers, which we recompute). Configs whose text
`eos_token_id` is 2 keep the legacy end-of-text pooling (see `text/text_encoder.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmlab.checkpoints.state import KeyMap, load_state, rename
from vlmlab.errors import ConfigError
from vlmlab.models.dual_encoder import DualEncoderNet
from vlmlab.text.text_encoder import TextEncoderConfig, TextTransformer
from vlmlab.vision.vit import ViTConfig, VisionTransformer

HF_ARCHITECTURES = ("CLIPModel",)
PROCESSOR = "clip"  # which `ImageProcessor` preset a folder without preprocessor_config.json gets
PAD_TO_MAX_LENGTH = False  # pools at the end-of-text token: pad to the longest text

# HF's defaults for fields a config.json may leave out.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     eos_token_id=49407)
VISION_SWITCHES = dict(class_token=True, pre_norm=True, patch_bias=False, pooling="cls")
TEXT_SWITCHES = dict(causal=True, pooling="eos", projection_size=None)


@dataclass
class CLIPConfig:
    vision: ViTConfig
    text: TextEncoderConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    extra: dict[str, Any] = field(default_factory=dict)  # other HF fields, carried through

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "CLIPConfig":
        vision, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise ConfigError("'vision_config' and 'text_config' must be objects")
        return cls(
            vision=ViTConfig.from_hf({**VISION_DEFAULTS, **vision}, **VISION_SWITCHES),
            text=TextEncoderConfig.from_hf({**TEXT_DEFAULTS, **text}, **TEXT_SWITCHES),
            projection_dim=hf.get("projection_dim", 512),
            logit_scale_init_value=hf.get("logit_scale_init_value", 2.6592),
            extra={k: text[k] for k in ("pad_token_id", "bos_token_id") if k in text},
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "vision_config": {**self.vision.to_hf(), "projection_dim": self.projection_dim},
            "text_config": {**self.text.to_hf(), **self.extra, "projection_dim": self.projection_dim},
        }


class CLIPNet(DualEncoderNet):
    Config = CLIPConfig

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.text_model = TextTransformer(cfg.text)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init_value))

    def encode_image(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        return self.visual_projection(self.vision_model.pool(pixel_values, patches))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_projection(self.text_model.pool(input_ids, attention_mask))

    # ---- checkpoints ----

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin, dtype: torch.dtype | None = None) -> None:
        load_state(self, {rename(k, HF_KEY_MAP): v for k, v in tensors.items()}, origin=origin,
                   ignore=HF_IGNORED, dtype=dtype)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return {rename(k, TO_HF_KEY_MAP): v for k, v in self.state_dict().items()}


# HF names -> ours: only the attention output projection differs.
HF_KEY_MAP: KeyMap = [(r"\.self_attn\.out_proj\.", ".self_attn.o_proj.")]
TO_HF_KEY_MAP: KeyMap = [(r"\.self_attn\.o_proj\.", ".self_attn.out_proj.")]
# Legacy checkpoints stored the position-id buffers; we compute positions instead.
HF_IGNORED = [r"^(text|vision)_model\.embeddings\.position_ids$"]

# The family's network class, for `vlmlab.load`.
Net = CLIPNet
