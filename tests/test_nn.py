"""The building blocks against hand-written references and transformers' own layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmlab.errors import PromptTooLongError
from vlmlab.nn import MLP, Attention, GatedMLP, KVCache, RMSNorm, get_activation, make_attention_mask
from vlmlab.nn.packed import PackedLinear, onednn_packing_available, pack_for_inference, unpack
from vlmlab.nn.rope import RotaryEmbedding, apply_rotary, rope_inv_freq


def reference_attention(attn: Attention, x, context=None, mask=None, causal=False):
    """Attention written out with explicit head repetition and softmax."""
    src = x if context is None else context
    b, t, _ = x.shape
    s = src.shape[1]
    q = attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(src).view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(src).view(b, s, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    groups = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    if causal:
        scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(32, num_heads=4, num_kv_heads=2, qkv_bias=True, o_bias=True)


def test_grouped_query_self_attention_causal_and_bidirectional(attn):
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x, is_causal=True), reference_attention(attn, x, causal=True))
    torch.testing.assert_close(attn(x), reference_attention(attn, x))
    assert not torch.allclose(attn(x, is_causal=True), attn(x))


def test_cross_attention_reads_keys_from_context():
    torch.manual_seed(1)
    attn = Attention(32, num_heads=4, kv_dim=48)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 9, 48)
    torch.testing.assert_close(attn(x, context=ctx), reference_attention(attn, x, context=ctx))


def test_boolean_and_additive_masks_per_batch(attn):
    x = torch.randn(2, 6, 32)
    mask = torch.rand(2, 1, 6, 6) > 0.4
    mask |= torch.eye(6, dtype=torch.bool)  # every query sees at least itself
    torch.testing.assert_close(attn(x, mask=mask), reference_attention(attn, x, mask=mask))
    additive = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(attn(x, mask=additive), reference_attention(attn, x, mask=additive))


def test_make_attention_mask_patterns():
    assert make_attention_mask(5, 5) == (None, True)  # SDPA's own causal flag
    assert make_attention_mask(1, 9) == (None, False)  # one query sees every cached key
    mask, is_causal = make_attention_mask(2, 4, padding_mask=torch.tensor([[0, 1, 1, 1]]))
    assert not is_causal
    expected = torch.tensor([[False, True, True, False], [False, True, True, True]])
    assert torch.equal(mask[0, 0], expected)
    mask, _ = make_attention_mask(4, 4, sliding_window=2)
    assert torch.equal(mask[0, 0].int().sum(-1), torch.tensor([1, 2, 2, 2]))
    # a query that is itself padding attends to everything rather than to nothing (no NaNs)
    mask, _ = make_attention_mask(2, 2, padding_mask=torch.tensor([[0, 1]]))
    assert mask[0, 0, 0].all()


def test_kv_cache_incremental_equals_full(attn):
    x = torch.randn(1, 8, 32)
    full = attn(x, is_causal=True)
    cache = KVCache(num_layers=1, capacity=8)
    steps = []
    for i in range(8):
        steps.append(attn(x[:, i : i + 1], cache=cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, 1), full)
    with pytest.raises(PromptTooLongError, match="KV cache holds 8 positions but 9 were needed"):
        attn(x[:, :1], cache=cache)


def test_float32_cache_makes_half_model_attend_in_float32(attn):
    x = torch.randn(1, 3, 32)
    attn16 = attn.to(torch.bfloat16)
    cache = KVCache(num_layers=1, capacity=3, dtype=torch.float32)
    out = attn16(x.to(torch.bfloat16), cache=cache, is_causal=True)
    assert out.dtype == torch.bfloat16 and cache.keys[0].dtype == torch.float32


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0)
    ref = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(16, base=500000.0)
    pos = torch.tensor([[0, 1, 2, 7, 100], [3, 3, 4, 5, 6]])
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = ours(pos, torch.float32)
    rcos, rsin = ref(q, pos)
    torch.testing.assert_close(cos, rcos)
    for a, b in zip(apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, rcos, rsin)):
        torch.testing.assert_close(a, b)


def test_rope_llama3_scaling_and_unknown_type():
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    base, _ = rope_inv_freq(64, 500000.0)
    scaled, _ = rope_inv_freq(64, 500000.0, scaling)
    assert torch.equal(scaled[0], base[0])  # high frequencies untouched
    torch.testing.assert_close(scaled[-1], base[-1] / 8)  # low frequencies divided by the factor
    from vlmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="'yarn' is not supported"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("name", ["gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu", "relu"])
def test_activations_match_transformers(name):
    from transformers.activations import ACT2FN

    x = torch.randn(1000) * 4
    torch.testing.assert_close(get_activation(name)(x), ACT2FN[name](x))


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown activation 'swoosh'"):
        get_activation("swoosh")


def test_rmsnorm_matches_transformers_and_unit_offset():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref = LlamaRMSNorm(48, eps=1e-5)
    ref.weight.data.normal_()
    ours = RMSNorm(48, eps=1e-5)
    ours.weight.data.copy_(ref.weight.data)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(ours(x), ref(x))
    gemma = RMSNorm(48, eps=1e-5, unit_offset=True)  # weight 0 means scale 1
    torch.testing.assert_close(gemma(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def test_mlps():
    torch.manual_seed(0)
    mlp = MLP(16, 64, act="quick_gelu")
    x = torch.randn(2, 16)
    h = mlp.fc1(x)
    torch.testing.assert_close(mlp(x), mlp.fc2(h * torch.sigmoid(1.702 * h)))
    gated = GatedMLP(16, 64)
    torch.testing.assert_close(gated(x), gated.down_proj(F.silu(gated.gate_proj(x)) * gated.up_proj(x)))


@pytest.mark.skipif(not onednn_packing_available(torch.bfloat16), reason="oneDNN bf16 not available")
def test_packing_fuses_and_unpacks_exactly():
    torch.manual_seed(0)
    block = nn.ModuleDict(dict(attn=Attention(64, 4, 2, qkv_bias=True), mlp=GatedMLP(64, 128))).to(torch.bfloat16)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    expected = block["mlp"](block["attn"](x, is_causal=True))
    assert pack_for_inference(block)
    assert isinstance(block["attn"].qkv, PackedLinear) and block["attn"].qkv.sizes == [64, 32, 32]
    assert isinstance(block["mlp"].gate_up, PackedLinear)
    torch.testing.assert_close(block["mlp"](block["attn"](x, is_causal=True)), expected)
    unpack(block)
    after = block.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_packing_leaves_float32_alone():
    mlp = GatedMLP(16, 32)
    assert not pack_for_inference(mlp)
    assert isinstance(mlp.gate_proj, nn.Linear)
