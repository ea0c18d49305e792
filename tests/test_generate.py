"""Generation on a tiny random Llama with a byte-level tokenizer: batching, sampling, stops,
streaming, context limits, config validation; sampling filters against transformers' warpers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlmlab  # noqa: E402
from vlmlab.errors import InputError, PromptTooLongError  # noqa: E402
from vlmlab.infer.generate import (  # noqa: E402
    GenerationConfig,
    TextStream,
    apply_repetition_penalty,
    filter_top_k_top_p,
    sample,
)
from vlmlab.infer.batching import Batch, Row  # noqa: E402

from conftest import TINY_VOCAB  # noqa: E402

PROMPTS = ["hi", "Tell me a story about a dragon and a knight.", "abc def"]
GREEDY = dict(max_new_tokens=16, stop_token_ids=[])


@pytest.fixture(scope="module")
def tiny(tiny_hf_factory):
    """(LanguageModel loaded by vlmlab.load, the transformers model it was saved from)."""
    folder, hf = tiny_hf_factory("llama", "gen_llama", tokenizer=True, vocab_size=TINY_VOCAB, max_position_embeddings=128)
    return vlmlab.load(folder), hf


@pytest.fixture(scope="module")
def lm(tiny):
    return tiny[0]


@pytest.fixture(scope="module")
def short_lm(tiny_hf_factory):
    """The same kind of model with a 32-token context."""
    folder, _ = tiny_hf_factory("llama", "gen_short", tokenizer=True, vocab_size=TINY_VOCAB, max_position_embeddings=32)
    return vlmlab.load(folder)


@pytest.fixture(scope="module")
def singles(lm):
    """Greedy answers of each prompt alone (no stop tokens, 16 new tokens)."""
    return [lm.generate(p, **GREEDY) for p in PROMPTS]


# ---- greedy ----------------------------------------------------------------------------------


def test_prompt_ids_use_the_chat_template(lm):
    ids = lm.prompt_ids("hi")
    assert lm.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == 1 and ids.count(2) == 1
    assert lm.prompt_ids("hi", chat=False) == [ord("h") - 33 + 3, ord("i") - 33 + 3]


def test_greedy_matches_transformers_generate(tiny, singles):
    lm, hf = tiny
    for prompt, ours in zip(PROMPTS, singles):
        ids = torch.tensor([lm.prompt_ids(prompt)])
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0
        )
        assert ours.token_ids == ref[0, ids.shape[1]:].tolist(), prompt
        assert ours.finish_reason == "length"
        assert ours.prompt_tokens == ids.shape[1]
        assert len(set(ours.token_ids)) > 2, "degenerate output makes the comparison weak"


def test_repetition_penalty_matches_transformers_generate(tiny):
    lm, hf = tiny
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([lm.prompt_ids(prompt)])
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16, eos_token_id=None,
            pad_token_id=0, repetition_penalty=1.8,
        )
        ours = lm.generate(prompt, repetition_penalty=1.8, **GREEDY)
        assert ours.token_ids == ref[0, ids.shape[1]:].tolist(), prompt
        assert ours.token_ids != lm.generate(prompt, **GREEDY).token_ids  # the penalty did something


def test_batched_greedy_equals_one_by_one(lm, singles):
    batch = lm.generate(PROMPTS, **GREEDY)
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    assert len({r.prompt_tokens for r in batch}) == len(PROMPTS), "prompts should differ in length (left padding)"
    for one, row in zip(singles, batch):
        assert row.token_ids == one.token_ids
        assert row.text == one.text
        assert row.finish_reason == one.finish_reason == "length"


def test_batched_greedy_with_repetition_penalty_equals_one_by_one(lm):
    kwargs = dict(GREEDY, repetition_penalty=1.5)
    batch = lm.generate(PROMPTS, **kwargs)
    for prompt, row in zip(PROMPTS, batch):
        assert row.token_ids == lm.generate(prompt, **kwargs).token_ids, prompt


def decode(lm, prompts: list[list[int]], cfg: GenerationConfig) -> tuple[list[Row], list[int]]:
    """Rows decoded as one static batch, and the batch size at each step."""
    rows = [Row(p, cfg) for p in prompts]
    batch = Batch(lm)
    sizes = [len(batch) for _ in batch.run(rows)]
    return rows, sizes


def test_batch_rows_equal_single_rows(lm):
    prompts = [lm.prompt_ids(p) for p in PROMPTS]
    cfg = GenerationConfig(max_new_tokens=10)
    rows, sizes = decode(lm, prompts, cfg)
    assert len(sizes) == 10 and all(len(r.tokens) == 10 for r in rows)
    for p, row in zip(prompts, rows):
        assert decode(lm, [p], cfg)[0][0].tokens == row.tokens


# ---- sampling --------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seed_dependent(lm):
    kwargs = dict(max_new_tokens=16, stop_token_ids=[], temperature=1.0)
    a = lm.generate(PROMPTS[0], seed=7, **kwargs)
    b = lm.generate(PROMPTS[0], seed=7, **kwargs)
    c = lm.generate(PROMPTS[0], seed=8, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert len(a.token_ids) == 16


def test_sampled_row_is_the_same_alone_or_in_a_batch(lm):
    """Row i of a batch uses the generator seeded with seed + i, so it matches that row alone with seed + i."""
    kwargs = dict(max_new_tokens=16, stop_token_ids=[], temperature=1.0, top_k=50, top_p=0.95)
    batch = lm.generate(PROMPTS, seed=11, **kwargs)
    for i, prompt in enumerate(PROMPTS):
        assert batch[i].token_ids == lm.generate(prompt, seed=11 + i, **kwargs).token_ids, prompt


def test_top_k_1_and_tiny_top_p_equal_greedy(lm, singles):
    for prompt, greedy in zip(PROMPTS, singles):
        assert lm.generate(prompt, temperature=1.5, top_k=1, seed=3, **GREEDY).token_ids == greedy.token_ids
        assert lm.generate(prompt, temperature=1.5, top_p=1e-6, seed=3, **GREEDY).token_ids == greedy.token_ids


def test_sample_stays_inside_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, 2.8, -1.0]])
    cfg = GenerationConfig(temperature=5.0, top_k=3)
    drawn = {sample(logits, cfg, None, [torch.Generator().manual_seed(s)]).item() for s in range(200)}
    assert drawn == {1, 3, 4}


def test_sample_greedy_ignores_generators():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 4.0]])
    assert sample(logits, GenerationConfig(), None, [None, None]).tolist() == [1, 0]


# ---- filters, on hand-made logits ------------------------------------------------------------

NEG = float("-inf")


def probs_logits(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()


def kept(logits: torch.Tensor) -> list[bool]:
    return torch.isfinite(logits)[0].tolist()


def test_top_k_filter():
    logits = torch.tensor([[0.5, -1.0, 3.0, 2.0, 0.0]])
    out = filter_top_k_top_p(logits, 2, 1.0)
    assert out.tolist() == [[NEG, NEG, 3.0, 2.0, NEG]]
    assert torch.equal(filter_top_k_top_p(logits, 0, 1.0), logits)  # 0 = off
    assert torch.equal(filter_top_k_top_p(logits, 5, 1.0), logits)
    assert torch.equal(filter_top_k_top_p(logits, 99, 1.0), logits)
    # Ties with the k-th value are all kept, as transformers does.
    assert kept(filter_top_k_top_p(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 1, 1.0)) == [True, True, True, False]


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (1.0, [True, True, True, True]),
        (0.75, [True, False, True, True]),  # drop 0.1: the rest holds 0.9 >= 0.75
        (0.5, [True, False, True, False]),  # 0.4 + 0.3 = 0.7 >= 0.5
        (0.35, [False, False, True, False]),  # 0.4 alone suffices
        (1e-9, [False, False, True, False]),  # the most likely token is always kept
    ],
)
def test_top_p_filter(top_p, expected):
    logits = probs_logits(0.3, 0.1, 0.4, 0.2)
    out = filter_top_k_top_p(logits, 0, top_p)
    assert kept(out) == expected
    # Kept logits are unchanged (no renormalisation).
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_top_k_then_top_p():
    # top_k=3 keeps 0.2, 0.3, 0.4 (renormalised 2/9, 3/9, 4/9); top_p=0.5 then drops 2/9.
    assert kept(filter_top_k_top_p(probs_logits(0.3, 0.1, 0.4, 0.2), 3, 0.5)) == [True, False, True, False]


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (10, 0.7), (3, 0.3), (0, 0.05)])
def test_filters_match_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    logits = torch.randn(4, 50, generator=g) * 2
    ref = logits.clone()
    ids = torch.zeros(4, 1, dtype=torch.long)
    if top_k:
        ref = TopKLogitsWarper(top_k)(ids, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(ids, ref)
    assert torch.equal(filter_top_k_top_p(logits, top_k, top_p), ref)


def test_repetition_penalty_hf_semantics():
    """Seen tokens: positive logits are divided by the penalty, negative ones multiplied."""
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0, -0.5]])
    seen = torch.tensor([[True, True, False, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.0, -0.5]]
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -1.0, 1.0, 0.0, -0.5]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_matches_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g)
    ids = torch.randint(0, 40, (3, 12), generator=g)
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref, atol=0, rtol=0)


# ---- stopping --------------------------------------------------------------------------------


def first_new_token_index(tokens: list[int], start: int = 2) -> int:
    """Index of the first token (from `start`) that did not occur before it."""
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k])


def test_stop_token_ends_the_row(lm, singles):
    toks = singles[1].token_ids
    k = first_new_token_index(toks)
    r = lm.generate(PROMPTS[1], max_new_tokens=16, stop_token_ids=[toks[k]])
    assert r.token_ids == toks[:k]  # the stop token itself is not part of the answer
    assert r.finish_reason == "stop"
    # A trailing incomplete UTF-8 sequence comes out as decoded (U+FFFD), as the reference decodes it.
    assert r.text == lm.tokenizer.decode(toks[:k], skip_special_tokens=True)


def test_max_new_tokens_gives_length(lm, singles):
    r = lm.generate(PROMPTS[1], max_new_tokens=5, stop_token_ids=[])
    assert r.token_ids == singles[1].token_ids[:5]
    assert r.finish_reason == "length"


def test_stop_token_ends_only_its_row_in_a_batch(lm, singles):
    toks0, toks1 = singles[0].token_ids, singles[1].token_ids
    k = next(k for k in range(2, 16) if toks0[k] not in toks0[:k] and toks0[k] not in toks1)
    stop = toks0[k]
    prompts = [lm.prompt_ids(PROMPTS[0]), lm.prompt_ids(PROMPTS[1])]
    rows, sizes = decode(lm, prompts, GenerationConfig(max_new_tokens=16, stop_token_ids=[stop]))
    assert sizes == [2] * k + [1] * (15 - k) + [0]  # the stopped row left the batch at its stop token
    assert rows[0].tokens == toks0[:k] and rows[0].finish_reason == "stop"
    assert rows[1].tokens == toks1 and rows[1].finish_reason == "length"
    results = lm.generate(PROMPTS[:2], max_new_tokens=16, stop_token_ids=[stop])
    assert [r.finish_reason for r in results] == ["stop", "length"]
    assert results[0].token_ids == toks0[:k] and results[1].token_ids == toks1


def test_generation_ends_when_all_rows_stop(lm, singles):
    toks = singles[0].token_ids
    k = first_new_token_index(toks)
    _, sizes = decode(lm, [lm.prompt_ids(PROMPTS[0])], GenerationConfig(max_new_tokens=16, stop_token_ids=[toks[k]]))
    assert len(sizes) == k + 1


def test_default_chat_stop_tokens(lm):
    # config eos (2) and tokenizer eos <|im_end|> (2), plus the end-of-turn markers present: <|endoftext|> (0).
    assert lm.stop_token_ids(chat=True) == [0, 2]
    assert lm.stop_token_ids(chat=False) == [2]


def test_stop_string_cuts_the_text(lm, singles):
    full = singles[1].text
    at = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full.find(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    r = lm.generate(PROMPTS[1], stop=[stop], **GREEDY)
    assert r.text == full[:at]
    assert r.finish_reason == "stop"
    assert stop not in r.text
    assert r.token_ids == singles[1].token_ids[: len(r.token_ids)]
    assert len(r.token_ids) < 16


# ---- TextStream ------------------------------------------------------------------------------


class FakeTokenizer:
    """Ids are indexes into a list of byte strings; decoding replaces incomplete UTF-8 with U+FFFD."""

    def __init__(self, pieces: list[bytes | str]):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def push_all(stream: TextStream, n: int) -> list[str]:
    return [stream.push(i) for i in range(n)]


def test_text_stream_without_stops_emits_everything():
    tok = FakeTokenizer(["Hel", "lo", " wor", "ld"])
    s = TextStream(tok)
    assert push_all(s, 4) == ["Hel", "lo", " wor", "ld"]
    assert s.flush() == "" and s.text == "Hello world" and not s.stopped


def test_text_stream_cuts_before_the_stop_string():
    tok = FakeTokenizer(["Hel", "lo", " ST", "OP", " more"])
    s = TextStream(tok, stop_strings=["STOP"])
    assert push_all(s, 4) == ["Hel", "lo", " ", ""]  # "ST" was held back, then turned out to be the stop
    assert s.stopped and s.text == "Hello "
    assert s.flush() == ""


def test_text_stream_stop_inside_one_token():
    s = TextStream(FakeTokenizer(["Hi", " there<end>junk"]), stop_strings=["<end>"])
    assert push_all(s, 2) == ["Hi", " there"]
    assert s.stopped and s.text == "Hi there"


def test_text_stream_releases_a_prefix_that_is_not_a_stop():
    s = TextStream(FakeTokenizer(["Hello", " S", "ay", " ST"]), stop_strings=["STOP"])
    assert s.push(0) == "Hello"
    assert s.push(1) == " "  # "S" could start "STOP": held
    assert s.push(2) == "Say"  # no longer a prefix: released
    assert s.push(3) == " "
    assert not s.stopped
    assert s.flush() == "ST"  # the row ended without the stop: flush releases the held prefix
    assert s.text == "Hello Say ST"


def test_text_stream_holds_incomplete_utf8():
    euro = "€".encode()  # 3 bytes
    s = TextStream(FakeTokenizer([b"a", euro[:1], euro[1:2], euro[2:], b"b"]))
    assert push_all(s, 5) == ["a", "", "", "€", "b"]
    assert s.text == "a€b"


def test_text_stream_flush_releases_a_trailing_incomplete_character_as_decoded():
    """Held back while more bytes may come; at the end it is shown as the decoder gives it (U+FFFD)."""
    euro = "€".encode()
    s = TextStream(FakeTokenizer([b"ok", euro[:2]]))
    assert push_all(s, 2) == ["ok", ""]
    assert s.flush() == "\ufffd"
    assert s.text == "ok\ufffd"


def test_text_stream_stops_at_the_earliest_of_several_stop_strings():
    """When one token brings two stop strings, the text ends before the first one, whatever their order."""
    s = TextStream(FakeTokenizer(["x", " A then B"]), stop_strings=["B", "A"])
    assert s.push(0) == "x"
    s.push(1)
    assert s.stopped
    assert s.text == "x "
    assert "A" not in s.text + s.flush()


# ---- streaming -------------------------------------------------------------------------------


def test_stream_concatenation_equals_generate_text(lm, singles):
    for prompt, full in zip(PROMPTS, singles):
        deltas = list(lm.stream(prompt, **GREEDY))
        assert "".join(deltas) == full.text
        assert lm.last_result.token_ids == full.token_ids
        assert lm.last_result.text == full.text
    assert len(deltas) > 1  # it really streamed


def test_stream_with_stop_string_equals_generate(lm, singles):
    full = singles[2].text
    at = next(i for i in range(1, len(full) - 2) if "\ufffd" not in full[i : i + 2] and full.find(full[i : i + 2]) == i)
    stop = [full[at : at + 2]]
    streamed = "".join(lm.stream(PROMPTS[2], stop=stop, **GREEDY))
    assert streamed == lm.generate(PROMPTS[2], stop=stop, **GREEDY).text == full[:at]


def test_chat_equals_generate_with_messages(lm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert lm.chat(messages, **GREEDY).token_ids == lm.generate(messages, **GREEDY).token_ids
    assert lm.generate("hi", system="be brief", **GREEDY).token_ids == lm.chat(messages, **GREEDY).token_ids


def test_chat_rejects_malformed_messages(lm):
    with pytest.raises(InputError, match="messages must be a non-empty list"):
        lm.chat([])
    with pytest.raises(InputError, match="messages must be a non-empty list"):
        lm.chat([{"content": "no role"}])


# ---- context limits --------------------------------------------------------------------------


def test_prompt_longer_than_context_raises(short_lm):
    text = "x" * 40
    assert len(short_lm.prompt_ids(text, chat=False)) == 40
    with pytest.raises(PromptTooLongError, match=r"prompt has 40 tokens but the model's context is 32 tokens"):
        short_lm.generate(text, chat=False, max_new_tokens=4)
    with pytest.raises(PromptTooLongError, match=r"32 tokens.*context is 32"):
        short_lm.generate("y" * 32, chat=False, max_new_tokens=1)  # no room for even one new token
    with pytest.raises(PromptTooLongError, match="40 tokens"):  # in a batch, the longest prompt counts
        short_lm.generate(["short", text], chat=False, max_new_tokens=1)


def test_max_new_tokens_is_clamped_to_the_context(short_lm):
    r = short_lm.generate("z" * 28, chat=False, max_new_tokens=100, stop_token_ids=[])
    assert len(r.token_ids) == 4
    assert r.finish_reason == "length"
    r = short_lm.generate("z" * 31, chat=False, max_new_tokens=100, stop_token_ids=[])
    assert len(r.token_ids) == 1 and r.finish_reason == "length"


def test_empty_prompt_rejected(lm):
    with pytest.raises(InputError, match="the prompt has no tokens"):
        decode(lm, [[1, 2], []], GenerationConfig())
    with pytest.raises(InputError, match="prompt is an empty list"):
        lm.generate([])


# ---- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_new_tokens", 0, "max_new_tokens must be at least 1, got 0"),
        ("max_new_tokens", -5, "max_new_tokens"),
        ("temperature", -0.1, "temperature must be >= 0"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_k", -1, "top_k must be >= 0"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
        ("repetition_penalty", -1.0, "repetition_penalty"),
        ("stop_strings", ("ok", ""), "stop strings must be non-empty"),
        # Values a JSON request can carry (Python's json accepts NaN) that must not reach the sampler.
        ("temperature", float("nan"), "temperature"),
        ("repetition_penalty", float("nan"), "repetition_penalty"),
        ("max_new_tokens", 2.5, "max_new_tokens"),
    ],
)
def test_generation_config_rejects_bad_values(field, value, message):
    with pytest.raises(InputError) as err:
        GenerationConfig(**{field: value}).validate()
    assert message in str(err.value)


def test_generation_config_accepts_good_values():
    GenerationConfig(max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0).validate()
    GenerationConfig(temperature=2.0, top_p=0.01, top_k=5, repetition_penalty=0.5, stop_strings=("x",)).validate()


def test_generate_validates_before_running(lm):
    with pytest.raises(InputError, match="top_p"):
        lm.generate("hi", top_p=0)
    with pytest.raises(InputError, match="temperature"):
        lm.generate("hi", temperature=-1)


def test_unknown_generation_option_is_named(lm):
    with pytest.raises(InputError, match="unknown generation option.*max_tokens"):
        lm.generate("hi", max_tokens=3)


def test_empty_prompt_list_is_an_input_error(lm):
    with pytest.raises(InputError, match="empty list"):
        lm.generate([])
