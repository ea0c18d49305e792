"""SigLIP (Zhai et al. 2023): CLIP's two towers trained with a sigmoid loss over every image-text
pair, so each pair is an independent yes/no with a learned temperature and bias.

Differences from CLIP, all switches of the shared blocks: no [class] token, a patch-embedding
bias, no pre-LayerNorm, attention-probe pooling (`vision/vit.py:AttentionPoolingHead`);
a bidirectional text tower pooled at its last position with a linear head; no projections;
`logit_bias`. Loads Hugging Face `SiglipModel` folders; the pooling head's attention, stored by
HF as one `nn.MultiheadAttention` (`in_proj_weight`), is split into q/k/v on load and joined on
save (`split_in_proj` / `join_in_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmlab.checkpoints.state import KeyMap, load_state, rename
from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.models.dual_encoder import DualEncoderNet
from vlmlab.text.text_encoder import TextEncoderConfig, TextTransformer
from vlmlab.vision.vit import ViTConfig, VisionTransformer

HF_ARCHITECTURES = ("SiglipModel",)
PROCESSOR = "siglip"
PAD_TO_MAX_LENGTH = True  # pools the last position: every text padded to the trained length, unmasked

VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6)
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                     layer_norm_eps=1e-6, eos_token_id=49407)
TEXT_SWITCHES = dict(causal=False, pooling="last")


@dataclass
class SiglipConfig:
    vision: ViTConfig
    text: TextEncoderConfig
    extra: dict[str, Any]

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "SiglipConfig":
        vision, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise ConfigError("'vision_config' and 'text_config' must be objects")
        if vision.get("vision_use_head") is False:
            raise ConfigError("SigLIP vision towers without the pooling head (vision_use_head=false) are not supported")
        text = {**TEXT_DEFAULTS, **text}
        text.setdefault("projection_size", text["hidden_size"])
        return cls(
            vision=ViTConfig.from_hf({**VISION_DEFAULTS, **vision}, class_token=False, pre_norm=False,
                                     patch_bias=True, pooling="map"),
            text=TextEncoderConfig.from_hf(text, **TEXT_SWITCHES),
            extra={k: text[k] for k in ("pad_token_id", "bos_token_id") if k in text},
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["SiglipModel"], "model_type": "siglip",
            "vision_config": {**self.vision.to_hf(), "vision_use_head": True},
            "text_config": {**self.text.to_hf(), **self.extra},
        }


class SiglipNet(DualEncoderNet):
    Config = SiglipConfig

    probability = "sigmoid"

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionTransformer(cfg.vision)
        self.text_model = TextTransformer(cfg.text)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))

    def encode_image(self, pixel_values: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        return self.vision_model.pool(pixel_values, patches)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_model.pool(input_ids, attention_mask)

    # ---- checkpoints ----

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin, dtype: torch.dtype | None = None) -> None:
        renamed = split_in_proj({rename(k, HF_KEY_MAP): v for k, v in tensors.items()}, origin)
        load_state(self, renamed, origin=origin, ignore=HF_IGNORED, dtype=dtype)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return join_in_proj({rename(k, TO_HF_KEY_MAP): v for k, v in self.state_dict().items()})


HEAD_ATTN = "vision_model.head.attention"
HF_KEY_MAP: KeyMap = [(r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
                      (r"^vision_model\.head\.attention\.out_proj\.", "vision_model.head.attention.o_proj.")]
TO_HF_KEY_MAP: KeyMap = [(r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
                         (r"^vision_model\.head\.attention\.o_proj\.", "vision_model.head.attention.out_proj.")]
HF_IGNORED = [r"^(text|vision)_model\.embeddings\.position_ids$"]


def split_in_proj(tensors: dict[str, torch.Tensor], origin, prefix: str = HEAD_ATTN) -> dict[str, torch.Tensor]:
    """HF's fused `in_proj_weight` / `in_proj_bias` of the pooling head at `prefix` -> our q/k/v projections."""
    out = dict(tensors)
    for kind in ("weight", "bias"):
        fused = out.pop(f"{prefix}.in_proj_{kind}", None)
        if fused is None:
            continue
        if fused.shape[0] % 3:
            where = origin if isinstance(origin, str) else origin.get(f"{prefix}.in_proj_{kind}", "the checkpoint")
            raise CheckpointError(f"{where}: tensor '{prefix}.in_proj_{kind}' has {fused.shape[0]} rows, "
                                  "not a multiple of 3 (query, key, value)")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3)):
            out[f"{prefix}.{name}.{kind}"] = part
    return out


def join_in_proj(tensors: dict[str, torch.Tensor], prefix: str = HEAD_ATTN) -> dict[str, torch.Tensor]:
    """Our q/k/v projections of the pooling head at `prefix` -> HF's fused in_proj tensors."""
    out = dict(tensors)
    for kind in ("weight", "bias"):
        parts = [out.pop(f"{prefix}.{name}.{kind}") for name in ("q_proj", "k_proj", "v_proj")]
        out[f"{prefix}.in_proj_{kind}"] = torch.cat(parts)
    return out

# The family's network class, for `vlmlab.load`.
Net = SiglipNet
