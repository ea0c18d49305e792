"""Transformer building blocks shared by every family: attention, RoPE, norms, MLPs."""

from vlmlab.nn.attention import Attention, KVCache, make_attention_mask
from vlmlab.nn.mlp import MLP, GatedMLP, get_activation
from vlmlab.nn.norms import LayerNorm, RMSNorm, build_norm
from vlmlab.nn.rope import RotaryEmbedding, apply_rotary

__all__ = [
    "Attention", "KVCache", "make_attention_mask", "MLP", "GatedMLP", "get_activation",
    "LayerNorm", "RMSNorm", "build_norm", "RotaryEmbedding", "apply_rotary",
]
