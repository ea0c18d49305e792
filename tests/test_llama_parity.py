"""Llama-family decoder (Llama, Qwen2, Mistral) against transformers on tiny random checkpoints:
full forward, KV-cache decoding, left padding, inputs_embeds, custom 4D masks, legacy layouts,
config round trips."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from vlmlab.checkpoints.hf import read_config, read_safetensors  # noqa: E402
from vlmlab.errors import CheckpointError, InputError  # noqa: E402
from vlmlab.text.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

ATOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that the head_dim-16 frequencies fall in all three llama3 bands (kept, smoothed, scaled).
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}

# name -> (family, transformers config overrides)
CASES = {
    "llama_gqa": ("llama", dict(tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "qwen2": ("qwen2", dict()),
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral": ("mistral", dict(head_dim=32, sliding_window=4)),
    "llama3_rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0})),
}

SEQ = 13  # longer than the sliding windows (4) so they matter


def load_net(folder: Path) -> LlamaForCausalLM:
    cfg = LlamaConfig.from_hf(read_config(folder))
    net = LlamaForCausalLM.without_weights(cfg)
    net.load_hf_tensors(*read_safetensors(folder))
    return net.eval()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_hf_factory):
    family, overrides = CASES[request.param]
    folder, hf = tiny_hf_factory(family, request.param, **overrides)
    return request.param, folder, hf, load_net(folder)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 128, (2, SEQ), generator=g)


# transformers 5.x renamed `past_key_values` to `cache` (the old name warns); support both.
HF_CACHE_KW = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


def hf_cache(out):
    return getattr(out, HF_CACHE_KW)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- full forward ----------------------------------------------------------------------------


@torch.no_grad()
def test_full_forward_matches_transformers(case, ids):
    name, _, hf, net = case
    ref = hf(ids).logits
    ours = net(ids)
    assert ours.shape == ref.shape == (2, SEQ, 128)
    assert ref.std() > 0.3, "logits too flat for the comparison to mean anything"
    assert max_diff(ours, ref) < ATOL, name


@torch.no_grad()
def test_logits_to_keep_and_explicit_positions(case, ids):
    _, _, _, net = case
    full = net(ids)
    assert max_diff(net(ids, logits_to_keep=3), full[:, -3:]) < 1e-5
    pos = torch.arange(SEQ).expand(2, SEQ)
    assert max_diff(net(ids, position_ids=pos), full) < ATOL


@torch.no_grad()
def test_arbitrary_position_ids_match_transformers(case, ids):
    """Position ids with a gap (as after a spliced image) and per row: RoPE follows them, as in transformers."""
    name, _, hf, net = case
    pos = torch.arange(SEQ).repeat(2, 1)
    pos[0, 6:] += 20
    pos[1] = pos[1] * 2 + 3
    ours = net(ids, position_ids=pos)
    assert max_diff(ours, net(ids)) > 1e-3  # relative distances changed, so must the logits
    assert max_diff(ours, hf(ids, position_ids=pos).logits) < ATOL, name


@torch.no_grad()
def test_sliding_window_matters(tiny_hf_factory, ids):
    """Mistral with window 4 differs from full attention only from position 4 on; transformers agrees."""
    folder, hf = tiny_hf_factory("mistral", "mistral_window_check", head_dim=32, sliding_window=4)
    net = load_net(folder)
    cfg = LlamaConfig.from_hf(read_config(folder))
    assert cfg.sliding_window == 4 and cfg.head_dim == 32
    full = LlamaForCausalLM.without_weights(dataclasses.replace(cfg, sliding_window=None))
    full.load_hf_tensors(*read_safetensors(folder))
    windowed, unwindowed = net(ids), full(ids)
    assert max_diff(windowed[:, :4], unwindowed[:, :4]) < ATOL
    assert max_diff(windowed[:, 4:], unwindowed[:, 4:]) > 1e-3
    assert max_diff(windowed, hf(ids).logits) < ATOL


@torch.no_grad()
def test_qwen2_layer_types_pick_sliding_layers(tiny_hf_factory, ids):
    """Qwen2 with max_window_layers=1: layer 0 full attention, layer 1 sliding, as transformers does."""
    folder, hf = tiny_hf_factory("qwen2", "qwen2_layer_types", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    cfg = LlamaConfig.from_hf(read_config(folder))
    assert [cfg.window_of(i) for i in range(2)] == [None, 4]
    assert max_diff(load_net(folder)(ids), hf(ids).logits) < ATOL


# ---- KV cache --------------------------------------------------------------------------------


@torch.no_grad()
def test_token_by_token_decoding_equals_full_forward(case, ids):
    name, _, _, net = case
    full = net(ids)
    cache = net.new_cache(SEQ)
    steps = [net(ids[:, t : t + 1], cache=cache) for t in range(SEQ)]
    assert cache.length == SEQ
    assert max_diff(torch.cat(steps, dim=1), full) < ATOL, name


@torch.no_grad()
def test_prefill_then_steps_equals_full_forward(case, ids):
    name, _, _, net = case
    full = net(ids)
    cache = net.new_cache(SEQ + 2)  # spare capacity is fine
    prefill = net(ids[:, :6], cache=cache)
    steps = [net(ids[:, t : t + 1], cache=cache) for t in range(6, SEQ)]
    assert max_diff(prefill, full[:, :6]) < ATOL
    assert max_diff(torch.cat(steps, dim=1), full[:, 6:]) < ATOL, name


@torch.no_grad()
def test_cached_decoding_matches_transformers_cache(case, ids):
    name, _, hf, net = case
    out = hf(ids[:, :6], use_cache=True)
    ref = [out.logits]
    for t in range(6, SEQ):
        out = hf(ids[:, t : t + 1], use_cache=True, **{HF_CACHE_KW: hf_cache(out)})
        ref.append(out.logits)
    cache = net.new_cache(SEQ)
    ours = [net(ids[:, :6], cache=cache)] + [net(ids[:, t : t + 1], cache=cache) for t in range(6, SEQ)]
    assert max_diff(torch.cat(ours, 1), torch.cat(ref, 1)) < ATOL, name


def test_cache_overflow_raises(case, ids):
    _, _, _, net = case
    cache = net.new_cache(4)
    with pytest.raises(InputError, match="KV cache holds 4 positions but 6 were needed"):
        net(ids[:, :6], cache=cache)


# ---- padding ---------------------------------------------------------------------------------


def left_pad(rows: list[torch.Tensor], pad_id: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    batch = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, longest - len(r) :] = r
        mask[i, longest - len(r) :] = 1
    return batch, mask


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(case, ids):
    name, _, _, net = case
    rows = [ids[0], ids[1, :7], ids[0, 3:]]
    batch, mask = left_pad(rows)
    out = net(batch, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = net(r[None])
        assert max_diff(out[i, -len(r) :], alone[0]) < ATOL, f"{name} row {i}"


@torch.no_grad()
def test_left_padded_cached_decoding_equals_rows_alone(case, ids):
    """Padded prefill, then one token per step with a growing 2D mask (what generation does)."""
    name, _, _, net = case
    rows = [ids[0], ids[1, :7]]
    prefill_len = [9, 3]  # row i: its first prefill_len[i] tokens are prefilled together
    batch, mask = left_pad([r[:n] for r, n in zip(rows, prefill_len)])
    extra = SEQ - prefill_len[0]
    tails = torch.stack([ids[0, 9:], torch.cat([ids[1, 3:7], ids[1, :extra - 4]])])
    cache = net.new_cache(batch.shape[1] + extra)
    outs = [net(batch, attention_mask=mask, cache=cache)]
    for t in range(extra):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        outs.append(net(tails[:, t : t + 1], attention_mask=mask, cache=cache))
    out = torch.cat(outs, dim=1)
    for i in range(2):
        seq = torch.cat([rows[i][: prefill_len[i]], tails[i]])
        alone = net(seq[None])[0]
        assert max_diff(out[i, -len(seq) :], alone) < ATOL, f"{name} row {i}"


def test_bad_2d_mask_shape_raises(case, ids):
    _, _, _, net = case
    with pytest.raises(InputError, match=r"attention_mask has shape \(2, 5\), expected \(2, 13\)"):
        net(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))


# ---- inputs_embeds ---------------------------------------------------------------------------


@torch.no_grad()
def test_inputs_embeds_equals_input_ids(case, ids):
    _, _, hf, net = case
    embeds = net.model.embed_tokens(ids)
    assert max_diff(net(inputs_embeds=embeds), net(ids)) < 1e-6
    assert max_diff(net(inputs_embeds=embeds), hf(inputs_embeds=embeds).logits) < ATOL
    # Through the cache as well (how a VLM prefills with spliced image features).
    cache = net.new_cache(SEQ)
    first = net(inputs_embeds=embeds[:, :5], cache=cache)
    rest = net(ids[:, 5:], cache=cache)
    assert max_diff(torch.cat([first, rest], 1), net(ids)) < ATOL


def test_ids_and_embeds_together_rejected(case, ids):
    _, _, _, net = case
    with pytest.raises(InputError, match="exactly one of input_ids or inputs_embeds"):
        net(ids, inputs_embeds=net.model.embed_tokens(ids))
    with pytest.raises(InputError, match="exactly one of input_ids or inputs_embeds"):
        net()


# ---- custom 4D masks, against a plain reference implementation -------------------------------


def reference_logits(sd: dict[str, torch.Tensor], cfg: LlamaConfig, ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Llama-family forward for one sequence written out in float64 with an explicit (T, T) boolean mask.

    Default RoPE only; any sliding window must be expressed in `allowed`.
    """
    sd = {k: v.double() for k, v in sd.items()}
    T, H, KV, hd = len(ids), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def linear(x, prefix):
        y = x @ sd[prefix + ".weight"].T
        return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = linear(h, p + "self_attn.q_proj").view(T, H, hd).transpose(0, 1)
        k = linear(h, p + "self_attn.k_proj").view(T, KV, hd).transpose(0, 1)
        v = linear(h, p + "self_attn.v_proj").view(T, KV, hd).transpose(0, 1)
        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        scores = (q @ k.transpose(1, 2)) * hd**-0.5
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        x = x + linear(attn.transpose(0, 1).reshape(T, H * hd), p + "self_attn.o_proj")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + linear(F.silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return (x @ head.T).float()


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2", "llama_biases"])
@torch.no_grad()
def test_custom_4d_mask_is_honoured(name, tiny_hf_factory, ids):
    family, overrides = CASES[name]
    folder, hf = tiny_hf_factory(family, f"{name}_mask", **overrides)
    net = load_net(folder)
    sd = net.state_dict()
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    # The reference itself agrees with transformers on the causal case.
    assert max_diff(reference_logits(sd, net.cfg, ids[0], causal), hf(ids[:1]).logits[0]) < ATOL

    prefix_lm = causal.clone()
    prefix_lm[:5, :5] = True  # the first 5 tokens see each other (prefix-LM), the rest is causal
    bidirectional = torch.ones(SEQ, SEQ, dtype=torch.bool)
    mask = torch.stack([prefix_lm, bidirectional])[:, None]  # (batch, 1, q, kv), one pattern per row
    out = net(ids, attention_mask=mask)
    for row, allowed in enumerate((prefix_lm, bidirectional)):
        ref = reference_logits(sd, net.cfg, ids[row], allowed)
        assert max_diff(out[row], ref) < ATOL, f"row {row}"
    # ... and the mask really changed something compared with the causal model.
    assert max_diff(out, net(ids)) > 1e-3
    # An additive float mask (0 / -inf) means the same as the boolean one.
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert max_diff(net(ids, attention_mask=additive), out) < 1e-5


@torch.no_grad()
def test_4d_causal_mask_equals_default(case, ids):
    """A 4D mask spelling out the default pattern (causal, plus the window if any) changes nothing."""
    name, _, _, net = case
    q = torch.arange(SEQ)[:, None]
    k = torch.arange(SEQ)[None, :]
    allowed = k <= q
    window = {net.cfg.window_of(i) for i in range(net.cfg.num_hidden_layers)}
    if window != {None}:
        pytest.skip("per-layer windows cannot be expressed by one 4D mask")
    assert max_diff(net(ids, attention_mask=allowed[None, None]), net(ids)) < ATOL, name


# ---- checkpoint layouts ----------------------------------------------------------------------


@torch.no_grad()
def test_legacy_rotary_inv_freq_tensors_are_ignored(tiny_hf_factory, tmp_path, ids):
    """transformers < 4.31 saved `model.layers.N.self_attn.rotary_emb.inv_freq`; such files still load."""
    folder, hf = tiny_hf_factory("llama", "legacy_src", tie_word_embeddings=False)
    tensors, _ = read_safetensors(folder)
    hd = 16
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    legacy = dict(tensors)
    for i in range(2):
        legacy[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    save_file(legacy, str(legacy_dir / "model.safetensors"), metadata={"format": "pt"})
    (legacy_dir / "config.json").write_text((folder / "config.json").read_text())
    net = load_net(legacy_dir)
    assert max_diff(net(ids), hf(ids).logits) < ATOL
    assert max_diff(net(ids), load_net(folder)(ids)) == 0


def test_unexpected_tensor_is_reported(tiny_hf_factory, tmp_path):
    folder, _ = tiny_hf_factory("llama", "unexpected_src")
    tensors, _ = read_safetensors(folder)
    tensors["model.layers.0.self_attn.rotary_emb.scale"] = torch.ones(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor\(s\) model\.layers\.0\.self_attn\.rotary_emb\.scale"):
        load_net(bad)


def test_missing_tensor_is_reported(tiny_hf_factory, tmp_path):
    folder, _ = tiny_hf_factory("llama", "missing_src", tie_word_embeddings=False)
    tensors, _ = read_safetensors(folder)
    del tensors["lm_head.weight"]  # untied: the head is required
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) lm_head\.weight"):
        load_net(bad)


def test_tied_checkpoint_shares_head_and_embeddings(case):
    name, folder, _, net = case
    tied = read_config(folder).get("tie_word_embeddings", False)
    assert net.cfg.tie_word_embeddings == tied, name
    assert (net.lm_head.weight is net.model.embed_tokens.weight) == tied
    assert ("lm_head.weight" in net.hf_state_dict()) == (not tied)
    assert not any(t.is_meta for t in net.state_dict().values())


# ---- config round trip -----------------------------------------------------------------------

COMPARED_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "tie_word_embeddings", "sliding_window", "layer_types", "attention_bias", "mlp_bias",
    "use_sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
)


def test_config_round_trip(case):
    name, folder, hf, _ = case
    cfg = LlamaConfig.from_hf(read_config(folder))
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg, name


@torch.no_grad()
def test_config_round_trip_keeps_the_model(case, ids):
    """What `LanguageModel.save` + `vlmlab.load` do: config through to_hf/from_hf, weights through hf_state_dict."""
    name, _, _, net = case
    again = LlamaForCausalLM.without_weights(LlamaConfig.from_hf(net.cfg.to_hf()))
    again.load_hf_tensors(net.hf_state_dict(), "round trip")
    assert max_diff(again(ids), net(ids)) < 1e-6, name


def test_to_hf_builds_the_same_transformers_config(case):
    name, folder, hf, _ = case
    cfg = LlamaConfig.from_hf(read_config(folder))
    data = cfg.to_hf()
    rebuilt = transformers.CONFIG_MAPPING[data["model_type"]](**{k: v for k, v in data.items() if k != "model_type"})
    assert rebuilt.architectures == [type(hf).__name__]
    for key in COMPARED_HF_FIELDS:
        if hasattr(hf.config, key):
            assert getattr(rebuilt, key) == getattr(hf.config, key), f"{name}: {key}"


@torch.no_grad()
def test_to_hf_config_gives_transformers_the_same_model(case, ids):
    """A transformers model built from `to_hf()` with our `hf_state_dict()` computes the same logits."""
    name, folder, _, net = case
    data = net.cfg.to_hf()
    config = transformers.CONFIG_MAPPING[data["model_type"]](**{k: v for k, v in data.items() if k != "model_type"})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(net.hf_state_dict(), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    assert max_diff(model(ids).logits, net(ids)) < ATOL, name


def test_from_hf_reads_transformers_4_layout():
    """transformers 4.x wrote `rope_theta` + `rope_scaling` at top level instead of `rope_parameters`."""
    hf4 = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=False,
    )
    cfg = LlamaConfig.from_hf(hf4)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.head_dim == 16 and not cfg.tie_word_embeddings
    hf5 = dict(hf4, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0})
    del hf5["rope_theta"], hf5["rope_scaling"]
    assert LlamaConfig.from_hf(hf5) == cfg


def test_from_hf_rejects_other_families_and_missing_fields():
    from vlmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="model_type 'gemma' is not a Llama-family decoder"):
        LlamaConfig.from_hf({"model_type": "gemma"})
    with pytest.raises(ConfigError, match="required field 'hidden_size' is missing"):
        LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 1})
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
