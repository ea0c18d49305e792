"""LLaVA (Liu et al. 2023): a vision tower, a projector, and a decoder LM that reads the projected
patch features in place of image placeholder tokens.

The prompt holds one `image_token_id` per image feature (the processor expands each `<image>`
into as many placeholders as the image gives features); the model embeds the prompt, writes the
projected features over the placeholders in order, and runs the language model on the result.
Features come from any vision layer (`vision_feature_layer`, HF indexing: -2 = penultimate, or a
list whose features are concatenated), with or without the first ([class]) token
(`vision_feature_select_strategy` "default" drops it, "full" keeps it). `pixel_shuffle` = s > 1
folds every s x s block of patch features into one token before the projector (as Idefics3's
connector): s**2 times fewer image tokens for the language model to read. `feature_norm` standardises
the projector's input per channel with statistics measured on sample images (`calibrate_feature_norm`;
buffers `feature_norm.mean` / `.std`; see `connectors.projector.Standardize`). `image_positions` adds a
learned row and column embedding to each projected token (`image_positions.rows` / `.columns`;
`connectors.projector.GridPositions`). `mrope_sections` gives the decoder Qwen2-VL's M-RoPE: image
tokens rotated by their row and column on the grid, text as before (`nn.rope`;
`mrope_interleaved`: Qwen3-VL's frequency layout). `location_tokens` = n: boxes written as n location
tokens after the vocabulary, one per coordinate (`text.locations`; their embeddings
`language_model.model.added_embeddings`). transformers' LLaVA has none of these steps; vlmlab writes
them to config.json as `vlmlab_pixel_shuffle` / `vlmlab_feature_norm` / `vlmlab_image_positions` /
`vlmlab_mrope_sections` / `vlmlab_mrope_interleaved` / `vlmlab_location_tokens`.

Loads Hugging Face `LlavaForConditionalGeneration` folders in every layout transformers has
written: 5.x (`language_model.model.*`, `vision_tower.*`), 4.52-4.57
(`model.language_model.*`, `model.vision_tower.vision_model.*`, `lm_head`), and earlier
(`language_model.model.*`, `vision_tower.vision_model.*`). Vision towers: CLIP or SigLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vlmlab.checkpoints.state import KeyMap, load_state, rename
from vlmlab.connectors.pixel_shuffle import pixel_shuffle
from vlmlab.connectors.projector import GridPositions, Projector, Standardize
from vlmlab.data.coords import BOX_SCALE
from vlmlab.errors import ConfigError
from vlmlab.fusion.placeholders import PlaceholderVLM
from vlmlab.models import clip, siglip
from vlmlab.nn.rope import MultimodalRotaryEmbedding
from vlmlab.text.llama import LlamaConfig, LlamaForCausalLM
from vlmlab.vision.vit import ViTConfig, VisionTransformer

HF_ARCHITECTURES = ("LlavaForConditionalGeneration",)
PIXEL_SHUFFLE_FIELD = "vlmlab_pixel_shuffle"  # config.json: a vlmlab LLaVA's pixel shuffle (absent: 1)
FEATURE_NORM_FIELD = "vlmlab_feature_norm"  # config.json: standardised projector input (absent: false)
IMAGE_POSITIONS_FIELD = "vlmlab_image_positions"  # config.json: learned row + column embeddings (absent: false)
MROPE_FIELD = "vlmlab_mrope_sections"  # config.json: M-RoPE frequency sections of the decoder (absent: 1D RoPE)
MROPE_INTERLEAVED_FIELD = "vlmlab_mrope_interleaved"  # config.json: Qwen3-VL's interleaved layout (absent: false)
LOCATION_TOKENS_FIELD = "vlmlab_location_tokens"  # config.json: box coordinates as location tokens (absent: 0)

# vision_config.model_type -> (HF defaults, ViT switches) of that tower family
VISION_FAMILIES = {
    "clip_vision_model": (clip.VISION_DEFAULTS, clip.VISION_SWITCHES),
    "siglip_vision_model": (siglip.VISION_DEFAULTS, dict(class_token=False, pre_norm=False, patch_bias=True,
                                                         pooling="map")),
}


@dataclass
class LlavaConfig:
    vision: ViTConfig
    text: LlamaConfig
    vision_model_type: str = "clip_vision_model"
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # "default": drop the first token; "full": keep it
    image_token_id: int = 32000
    image_seq_length: int | None = None  # features per image; None: the tower's grid after the shuffle
    pixel_shuffle: int = 1  # s > 1: s x s neighbouring patch features -> one token (not in transformers)
    feature_norm: bool = False  # standardise the projector's input with saved statistics (not in transformers)
    image_positions: bool = False  # add a learned row + column embedding to each image token (not in transformers)
    # Rotate image tokens in the decoder by (row, column) too: Qwen2-VL's M-RoPE with these
    # frequency sections (temporal, height, width; they sum to half the head dim). Not in transformers.
    mrope_sections: list[int] | None = None
    mrope_interleaved: bool = False  # Qwen3-VL's layout: t, h, w alternate over the frequencies
    # Boxes written as this many location tokens after the vocabulary (`text.locations`); 0: as digits.
    location_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: "
                              "expected 'default' or 'full'")
        layers = self.feature_layers
        n = self.vision.num_hidden_layers
        if not layers or any(not isinstance(i, int) or not -n - 1 <= i <= n for i in layers):
            raise ConfigError(f"vision_feature_layer {self.vision_feature_layer!r} is out of range for {n} layers")
        s = self.pixel_shuffle
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"pixel_shuffle must be a positive integer, got {s!r}")
        with_class_token = self.vision.class_token and self.vision_feature_select_strategy == "full"
        if s > 1 and (self.vision.grid % s or with_class_token):
            raise ConfigError(f"pixel_shuffle {s} needs a patch grid whose side ({self.vision.grid}) is a multiple of "
                              f"{s} and no [class] token among the features (vision_feature_select_strategy 'default')")
        for name in ("feature_norm", "image_positions", "mrope_interleaved"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.image_seq_length is None:
            self.image_seq_length = (self.vision.grid // s) ** 2
        for name in ("image_positions", "mrope_sections"):
            if getattr(self, name) and with_class_token:
                raise ConfigError(f"{name} needs image tokens on a grid: no [class] token among the features "
                                  "(vision_feature_select_strategy 'default')")
        n = self.location_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n == 1 or n > BOX_SCALE + 1:
            raise ConfigError(f"location_tokens must be 0 (boxes as digits) or a number of bins from 2 to "
                              f"{BOX_SCALE + 1}, got {n!r}")
        m = self.mrope_sections
        if m is not None and (not isinstance(m, (list, tuple)) or len(m) != 3 or sum(m) != self.text.head_dim // 2
                              or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in m)):
            raise ConfigError(f"mrope_sections must be 3 positive integers (temporal, height, width) that sum to "
                              f"half the decoder's head dim ({self.text.head_dim // 2}), got {m!r}")

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def patch_size_in_features(self) -> int:
        """Pixels per image feature along each side (the patch, times the pixel shuffle)."""
        return self.vision.patch_size * self.pixel_shuffle

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlavaConfig":
        vision, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise ConfigError("'vision_config' and 'text_config' must be objects")
        kind = vision.get("model_type", "clip_vision_model")
        if kind not in VISION_FAMILIES:
            raise ConfigError(f"vision tower {kind!r} is not supported (supported: {', '.join(VISION_FAMILIES)})")
        defaults, switches = VISION_FAMILIES[kind]
        if kind == "siglip_vision_model" and vision.get("vision_use_head") is False:
            switches = {**switches, "pooling": "none"}
        text = {"tie_word_embeddings": hf.get("tie_word_embeddings", False), **text}
        image_token = hf.get("image_token_id", hf.get("image_token_index", 32000))
        return cls(
            vision=ViTConfig.from_hf({**defaults, **vision}, **switches),
            text=LlamaConfig.from_hf(text),
            vision_model_type=kind,
            projector=f"mlp2x_{hf.get('projector_hidden_act', 'gelu')}",
            projector_bias=hf.get("multimodal_projector_bias", True),
            vision_feature_layer=hf.get("vision_feature_layer", -2),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            image_token_id=image_token,
            image_seq_length=hf.get("image_seq_length", 576),
            pixel_shuffle=hf.get(PIXEL_SHUFFLE_FIELD, 1),
            feature_norm=hf.get(FEATURE_NORM_FIELD, False),
            image_positions=hf.get(IMAGE_POSITIONS_FIELD, False),
            mrope_sections=hf.get(MROPE_FIELD),
            mrope_interleaved=hf.get(MROPE_INTERLEAVED_FIELD, False),
            location_tokens=hf.get(LOCATION_TOKENS_FIELD, 0),
        )

    def to_hf(self) -> dict[str, Any]:
        depth_act = self.projector.split("_", 1)
        if not self.projector.startswith("mlp2x_"):
            raise ConfigError(f"HF's LLaVA layout has a 2-layer projector; {self.projector!r} cannot be saved in it")
        text = self.text.to_hf()
        extensions = {PIXEL_SHUFFLE_FIELD: self.pixel_shuffle} if self.pixel_shuffle > 1 else {}
        if self.feature_norm:
            extensions[FEATURE_NORM_FIELD] = True
        if self.image_positions:
            extensions[IMAGE_POSITIONS_FIELD] = True
        if self.mrope_sections:
            extensions[MROPE_FIELD] = list(self.mrope_sections)
            if self.mrope_interleaved:
                extensions[MROPE_INTERLEAVED_FIELD] = True
        if self.location_tokens:
            extensions[LOCATION_TOKENS_FIELD] = self.location_tokens
        return {
            "architectures": list(HF_ARCHITECTURES), "model_type": "llava",
            "vision_config": {**self.vision.to_hf(), "model_type": self.vision_model_type},
            "text_config": text, "projector_hidden_act": depth_act[1],
            "multimodal_projector_bias": self.projector_bias, "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.vision_feature_select_strategy,
            "image_token_index": self.image_token_id, "image_seq_length": self.image_seq_length,
            "tie_word_embeddings": text.get("tie_word_embeddings", False), **extensions,
        }


class LlavaNet(PlaceholderVLM):
    """Vision tower, projector, decoder; prompts, generation and the count check: `PlaceholderVLM`."""

    def __init__(self, cfg: LlavaConfig, language_model: LlamaForCausalLM | None = None):
        """`language_model`: an existing decoder to use (assembling a model from parts)."""
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTransformer(cfg.vision)
        width = cfg.vision.hidden_size * len(cfg.feature_layers) * cfg.pixel_shuffle**2
        if cfg.feature_norm:
            self.feature_norm = Standardize(width)
        self.multi_modal_projector = Projector(cfg.projector, width, cfg.text.hidden_size, cfg.projector_bias)
        self.language_model = language_model if language_model is not None else LlamaForCausalLM(cfg.text)
        self._build_positions(cfg.image_positions, bool(cfg.mrope_sections))
        if cfg.location_tokens:  # their embeddings: a checkpoint's, or text.locations.ruler_embeddings
            self.language_model.model.add_tokens(torch.zeros(cfg.location_tokens, cfg.text.hidden_size))

    def _build_positions(self, image_positions: bool, mrope: bool) -> None:
        """What says where an image token is: grid positions (zeros when new) and / or M-RoPE."""
        cfg = self.cfg
        side = cfg.vision.grid // cfg.pixel_shuffle  # image tokens per row and column
        if image_positions:
            self.image_positions = GridPositions(side, side, cfg.text.hidden_size)
        if mrope:
            t = cfg.text
            self.language_model.model.rotary = MultimodalRotaryEmbedding(
                t.head_dim, t.rope_theta, cfg.mrope_sections, t.rope_scaling, interleaved=cfg.mrope_interleaved)
            self.rope_grid = (side, side)

    def add_positions(self, *, image_positions: bool = False, mrope_sections: list[int] | None = None,
                      mrope_interleaved: bool = False) -> None:
        """Give a built (trained) model what a new one gets from these config fields: grid positions
        (zeros: the model answers as before until they train) and / or M-RoPE in the decoder (which
        changes how it reads image tokens: train after). What the model has already is refused."""
        had = [name for name, asked in (("image_positions", image_positions), ("mrope_sections", mrope_sections))
               if asked and getattr(self.cfg, name)]
        if had:
            raise ConfigError(f"add_positions: the model already has {' and '.join(had)}")
        if mrope_interleaved and not mrope_sections:
            raise ConfigError("add_positions: mrope_interleaved needs mrope_sections")
        mrope = dict(mrope_sections=list(mrope_sections), mrope_interleaved=mrope_interleaved) if mrope_sections else {}
        old = self.cfg
        self.cfg = replace(old, image_positions=old.image_positions or image_positions, **mrope)
        try:
            self._build_positions(image_positions, bool(mrope))
        except ConfigError:
            self.cfg = old
            raise
        if image_positions:
            anchor = next(self.multi_modal_projector.parameters())
            self.image_positions.to(anchor.device, anchor.dtype)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, features per image, LM width): the selected layers' tokens, projected."""
        return self.project(self.projector_inputs(pixel_values))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`projector_inputs` -> the image tokens the language model reads (feature norm, projector,
        grid positions)."""
        if self.cfg.feature_norm:
            features = self.feature_norm(features)
        tokens = self.multi_modal_projector(features)
        return self.image_positions(tokens) if self.cfg.image_positions else tokens

    @torch.no_grad()
    def calibrate_feature_norm(self, pixel_values: torch.Tensor) -> None:
        """Measure `feature_norm`'s statistics on the projector inputs of these sample images."""
        if not self.cfg.feature_norm:
            raise ConfigError("calibrate_feature_norm: this model has no feature_norm (config feature_norm = false)")
        self.feature_norm.calibrate(self.projector_inputs(pixel_values))

    def projector_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, features per image, width): the selected layers' tokens, concatenated and shuffled."""
        n = self.cfg.vision.num_hidden_layers
        indices = [i if i >= 0 else n + 1 + i for i in self.cfg.feature_layers]
        # Run only as many layers as the deepest selected one needs.
        states = self.vision_tower(pixel_values, num_layers=max(indices), output_hidden_states=True).hidden_states
        picked = [states[i] for i in indices]
        if self.cfg.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        features = torch.cat(picked, dim=-1)
        if self.cfg.pixel_shuffle > 1:
            features = pixel_shuffle(features, self.cfg.pixel_shuffle)
        return features

    # ---- checkpoints ----

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin, dtype: torch.dtype | None = None, *,
                        with_language_model: bool = True) -> None:
        """Load a checkpoint strictly; `with_language_model=False`: the file holds only the vision
        tower and projector (the language model was given to the constructor)."""
        renamed = siglip.split_in_proj({rename(k, HF_KEY_MAP): v for k, v in tensors.items()}, origin, HEAD_ATTN)
        optional = ["language_model.lm_head.weight"] if self.cfg.text.tie_word_embeddings else []
        if not with_language_model:  # the location tokens' embeddings are the folder's own
            optional = [k for k in self.state_dict() if k.startswith("language_model.") and k != ADDED_EMBEDDINGS]
        load_state(self, renamed, origin=origin, ignore=HF_IGNORED, optional=optional, dtype=dtype)
        self.language_model.tie_weights()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors in the layout transformers 5 writes (the tied head left out)."""
        sd = {rename(k, TO_HF_KEY_MAP): v for k, v in self.state_dict().items()}
        if self.cfg.vision.pooling == "map":
            sd = siglip.join_in_proj(sd, HEAD_ATTN)
        if self.cfg.text.tie_word_embeddings:
            sd.pop("language_model.lm_head.weight")
        return sd


# Every on-disk layout -> ours (= transformers 5's files, except the attention output's name).
HF_KEY_MAP: KeyMap = [
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^vision_tower\.(.*)\.out_proj\.", r"vision_tower.\1.o_proj."),
]
ADDED_EMBEDDINGS = "language_model.model.added_embeddings"  # location tokens (LlamaModel.add_tokens)
HEAD_ATTN = "vision_tower.head.attention"  # a SigLIP tower's pooling attention (fused in_proj on disk)
TO_HF_KEY_MAP: KeyMap = [(r"^vision_tower\.(.*)\.o_proj\.", r"vision_tower.\1.out_proj.")]
HF_IGNORED = [r"^vision_tower\.embeddings\.position_ids$", r"rotary_emb\.inv_freq$"]

# Our module paths -> those of transformers 5's LlavaForConditionalGeneration in memory, which
# PEFT adapters name (`base_model.model.<path>.lora_A.weight`); see checkpoints/peft.py.
PEFT_KEY_MAP: KeyMap = [
    (r"^vision_tower\.(.*)\.o_proj$", r"vision_tower.\1.out_proj"),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head$", "lm_head"),
]
