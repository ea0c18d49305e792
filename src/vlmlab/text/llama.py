"""The Llama family of decoder language models: Llama, SmolLM2, Qwen2 (q/k/v biases), Mistral
(sliding window), from one implementation with config switches.

Pre-norm blocks: x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x)); RoPE on q/k; grouped-query
attention; tied or untied output head. Parameter names equal the Hugging Face layout
(`model.layers.N.self_attn.q_proj.weight`, ...) so HF checkpoints load through an identity map;
GGUF names go through `GGUF_KEY_MAP`. VLMs feed `inputs_embeds` with image features spliced in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.checkpoints.gguf import INT4_TYPES, GGUFFile
from vlmlab.checkpoints.hf import require_positive
from vlmlab.checkpoints.state import KeyMap, load_state, rename
from vlmlab.errors import ConfigError, InputError
from vlmlab.nn import Attention, GatedMLP, KVCache, RMSNorm, RotaryEmbedding, make_attention_mask
from vlmlab.nn import checkpointing
from vlmlab.nn.quant import Int4Weight, dense_state_dict, use_int4_weights
from vlmlab.nn.rope import sequence_position_ids

# HF architectures (config.json "architectures") and GGUF `general.architecture` values served here.
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
GGUF_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder; field names follow the HF config.json."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer: "full_attention" or "sliding_attention"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"  # llama | qwen2 | mistral: picks the HF architecture when saving
    extra: dict[str, Any] = field(default_factory=dict)  # HF fields we carry through unchanged

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        require_positive(self, ("rms_norm_eps", "rope_theta"), integer=False)
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ConfigError(f"config field 'head_dim' must be a positive integer, got {self.head_dim!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    def window_of(self, layer: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """From a config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise ConfigError(f"model_type {model_type!r} is not a Llama-family decoder")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in hf:
                raise ConfigError(f"required field '{key}' is missing")
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
            window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            window = hf.get("sliding_window") if model_type == "mistral" else None
        known = {f.name for f in dataclasses.fields(cls)} | {"rope_parameters", "attention_bias", "use_sliding_window", "architectures"}
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            hidden_act=hf.get("hidden_act", "silu"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type != "llama")),
            sliding_window=window,
            layer_types=hf.get("layer_types") if window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            model_type=model_type,
            extra={k: v for k, v in hf.items() if k not in known and k not in ("transformers_version",)},
        )

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads for this model."""
        arch = {v: k for k, v in HF_ARCHITECTURES.items()}[self.model_type]
        hf: dict[str, Any] = dict(self.extra)
        hf.update(
            architectures=[arch],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "qwen2":
            hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window)
            if self.layer_types is not None:
                hf.update(layer_types=self.layer_types)
        else:
            if self.qkv_bias != self.o_bias:
                raise ConfigError(f"{self.model_type} checkpoints cannot express q/k/v bias without o bias")
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
            if self.model_type == "mistral":
                hf.update(sliding_window=self.sliding_window)
        return hf

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "LlamaConfig":
        """From GGUF metadata (`{arch}.block_count`, ...), as llama.cpp's converter writes it."""
        arch = g.architecture
        if arch not in GGUF_ARCHITECTURES:
            raise ConfigError(f"{g.path}: GGUF architecture {arch!r} is not a Llama-family decoder")
        heads = int(g.field(f"{arch}.attention.head_count"))
        hidden = int(g.field(f"{arch}.embedding_length"))
        vocab = g.field(f"{arch}.vocab_size", None) or len(g.field("tokenizer.ggml.tokens"))
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(g.field(f"{arch}.feed_forward_length")),
            num_hidden_layers=int(g.field(f"{arch}.block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(g.field(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(g.field(f"{arch}.attention.key_length", hidden // heads)),
            max_position_embeddings=int(g.field(f"{arch}.context_length")),
            rms_norm_eps=float(g.field(f"{arch}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(g.field(f"{arch}.rope.freq_base", 10000.0)),
            qkv_bias=arch == "qwen2",
            tie_word_embeddings="output.weight" not in g.tensor_names(),
            sliding_window=g.field(f"{arch}.attention.sliding_window", None),
            bos_token_id=g.field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=g.field("tokenizer.ggml.eos_token_id", None),
            pad_token_id=g.field("tokenizer.ggml.padding_token_id", None),
            model_type=arch if arch in ("qwen2", "mistral") else "llama",
        )


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: self-attention then gated MLP, each with a residual."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            o_bias=cfg.o_bias,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias)

    def forward(self, x, rope, mask, is_causal, cache):
        x = x + self.self_attn(
            self.input_layernorm(x), rope=rope, mask=mask, is_causal=is_causal, cache=cache, layer_idx=self.layer_idx
        )
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, the stack of decoder layers and the final norm; returns hidden states."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.gradient_checkpointing = False  # nn/checkpointing.py
        self.added_embeddings: nn.Parameter | None = None  # add_tokens

    def add_tokens(self, embeddings: torch.Tensor) -> None:
        """Tokens after the vocabulary (ids vocab_size, vocab_size + 1, ...) with these (n, width)
        embeddings: a parameter of their own (`added_embeddings`, trainable apart from the frozen
        table), read as input embeddings and as the output head's rows for those ids (tied).
        Location tokens are the use (`text.locations`)."""
        if self.added_embeddings is not None:
            raise ConfigError("add_tokens: this model has added tokens already")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.cfg.hidden_size:
            raise ConfigError(f"add_tokens: embeddings of shape {tuple(embeddings.shape)}, expected (n, "
                              f"{self.cfg.hidden_size})")
        self.added_embeddings = nn.Parameter(embeddings.to(self.embed_tokens.weight.dtype).clone())

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of `input_ids` (added tokens' from `added_embeddings`)."""
        added = self.added_embeddings
        if added is None:
            return self.embed_tokens(input_ids)
        v = self.cfg.vocab_size
        if input_ids.numel() and int(input_ids.max()) >= v + added.shape[0]:
            raise InputError(f"token id {int(input_ids.max())} is past the vocabulary ({v} + {added.shape[0]} added)")
        is_added = (input_ids >= v)[..., None]
        return torch.where(is_added, added[(input_ids - v).clamp(min=0)].to(self.embed_tokens.weight.dtype),
                           self.embed_tokens(input_ids.clamp(max=v - 1)))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        padding = None
        if attention_mask is not None and attention_mask.dim() == 2:
            if attention_mask.shape != (b, past + t):
                raise InputError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + t)} "
                    "(batch, cached + new positions)"
                )
            padding = attention_mask
        if position_ids is None:
            position_ids = sequence_position_ids(padding, past, b, t, x.device)
        rope = self.rotary(position_ids, x.dtype)
        masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}
        for layer in self.layers:
            window = self.cfg.window_of(layer.layer_idx)
            if attention_mask is not None and attention_mask.dim() == 4:
                mask, is_causal = attention_mask, False  # a caller-built custom mask, used as given
            else:
                if window not in masks:
                    masks[window] = make_attention_mask(
                        t, past + t, causal=True, padding_mask=padding, sliding_window=window, device=x.device
                    )
                mask, is_causal = masks[window]
            x = checkpointing.call(self, layer, x, rope, mask, is_causal, cache)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """The decoder plus its output head; `forward` returns logits (batch, seq, vocab)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    @classmethod
    def without_weights(cls, cfg: LlamaConfig) -> "LlamaForCausalLM":
        """Build with parameters on the meta device (no memory, no random init); loading assigns
        the checkpoint's tensors. Only the RoPE tables, which are computed, are made for real."""
        with torch.device("meta"):
            net = cls(cfg)
        net.model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return net

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def text_cfg(self) -> LlamaConfig:
        """The decoder's config (a VLM's network answers with its language model's)."""
        return self.cfg

    def new_cache(self, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.cfg.num_hidden_layers, capacity, dtype)

    @property
    def context_length(self) -> int:
        return self.cfg.max_position_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) for every position, or only the last `logits_to_keep`, or
        (n, vocab) at the n True positions of the boolean (batch, seq) `logits_at` (training: the
        positions that predict a labelled token). The last two save most of the big head matmul."""
        h = self.model(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache
        )
        if logits_at is not None:
            h = h[logits_at]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        if self.model.added_embeddings is not None:  # the added tokens' rows of the (tied) head
            logits = torch.cat([logits, F.linear(h, self.model.added_embeddings.to(h.dtype))], dim=-1)
        return logits

    # ---- checkpoints -------------------------------------------------------------------------

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under their HF names (the tied head is not stored, as transformers does).
        4-bit layers are written dequantized, in the embeddings' dtype."""
        sd = dense_state_dict(self, self.model.embed_tokens.weight.dtype)
        if self.cfg.tie_word_embeddings:
            sd.pop("lm_head.weight")
        return sd

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor], origin, dtype: torch.dtype | None = None) -> None:
        renamed = {rename(k, HF_KEY_MAP): v for k, v in tensors.items()}
        optional = ["lm_head.weight"] if self.cfg.tie_word_embeddings else []
        load_state(self, renamed, origin=origin, ignore=HF_IGNORED, optional=optional, dtype=dtype)
        self.tie_weights()

    def load_gguf_tensors(self, g: GGUFFile, dtype: torch.dtype = torch.float32, int4: bool = False) -> None:
        """Load a GGUF's tensors. int4: the decoder layers' linear weights stored as Q4_0/Q4_1
        keep their 4 bits (`Int4Linear`); every other tensor is dequantized to `dtype`."""

        def unpermuted(hf_name: str, t):
            if g.architecture == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = self.cfg.num_attention_heads if "q_proj" in hf_name else self.cfg.num_key_value_heads
                t = unpermute_qk(t, heads)
            return t

        quantized = {}
        if int4:
            for name, kind in g.tensor_types().items():
                hf_name = rename(name, GGUF_KEY_MAP)
                if kind in INT4_TYPES and hf_name.startswith("model.layers."):
                    weight = Int4Weight.from_codes(*g.int4_blocks(name))
                    order = torch.arange(weight.shape[0])
                    if not torch.equal(perm := unpermuted(hf_name, order), order):
                        weight = weight.rows(perm)
                    quantized[name] = weight
            use_int4_weights(self, {rename(n, GGUF_KEY_MAP): w for n, w in quantized.items()})
        tensors = {}
        for name, t in g.tensors(torch.float32, skip=quantized):
            hf_name = rename(name, GGUF_KEY_MAP)
            tensors[hf_name] = unpermuted(hf_name, t).to(dtype)
        optional = ["lm_head.weight"] if self.cfg.tie_word_embeddings else []
        load_state(self, tensors, origin=str(g.path), ignore=GGUF_IGNORED, optional=optional, dtype=dtype)
        self.tie_weights()


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs back to rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# Current HF layout = our parameter names. Legacy checkpoints (transformers < 4.31) also stored
# each layer's RoPE `inv_freq` buffer, which we recompute from the config.
HF_KEY_MAP: KeyMap = []
HF_IGNORED = [r"\.rotary_emb\.inv_freq$"]

GGUF_KEY_MAP: KeyMap = [
    (r"^token_embd\.", "model.embed_tokens."),
    (r"^output_norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^blk\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^blk\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^blk\.(\d+)\.attn_q\.", r"model.layers.\1.self_attn.q_proj."),
    (r"^blk\.(\d+)\.attn_k\.", r"model.layers.\1.self_attn.k_proj."),
    (r"^blk\.(\d+)\.attn_v\.", r"model.layers.\1.self_attn.v_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.ffn_gate\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^blk\.(\d+)\.ffn_up\.", r"model.layers.\1.mlp.up_proj."),
    (r"^blk\.(\d+)\.ffn_down\.", r"model.layers.\1.mlp.down_proj."),
]
# Nothing is dropped silently: a Llama 3.1 GGUF's `rope_freqs` tensor (RoPE scaling factors) is
# reported as unexpected until llama3 scaling from GGUF is implemented.
GGUF_IGNORED: list[str] = []
