"""Text-only replay chats (data/replay.py): seeded distinct prompts, answers that end on a full
sentence, the language model's own greedy answers, and the recipe source that generates them once
into the run folder."""

from __future__ import annotations

import pytest

import vlmlab
from vlmlab.data import replay
from vlmlab.data.replay import replay_chats, replay_folder, replay_prompts, whole_sentences
from vlmlab.errors import ConfigError
from vlmlab.train.vlm import sample_source


def test_prompts_are_distinct_seeded_and_extend():
    fifty = replay_prompts(50)
    assert len(set(fifty)) == 50 and fifty == replay_prompts(50)
    assert replay_prompts(80)[:50] == fifty  # a larger n extends a smaller one
    assert replay_prompts(50, seed=1) != fifty
    kinds = ("story", "poem", "Explain", "explain", "facts")
    assert all(any(k in p for p in replay_prompts(40)) for k in kinds)
    for n in (0, -1, 10_000, 2.5, True):
        with pytest.raises(ConfigError, match="n must be an integer"):
            replay_prompts(n)


@pytest.mark.parametrize("text, kept", [
    ("One. Two! Three? Fou", "One. Two! Three?"),
    ('He said "stop." Then he', 'He said "stop."'),
    ("3.5 kilos of flour and", ""),
    ("No end at all", ""),
    ("Done.", "Done."),
])
def test_whole_sentences(text, kept):
    assert whole_sentences(text) == kept


@pytest.fixture(scope="module")
def smollm2():
    return vlmlab.load("smollm2")


def test_chats_hold_the_language_models_own_greedy_answers(smollm2):
    prompts = ["What is the capital of France?", "Tell me a story about a lost cat."]
    samples = replay_chats(smollm2, prompts, max_new_tokens=24, repetition_penalty=1.0)
    answers = smollm2.generate(prompts, max_new_tokens=24)
    assert [s.task for s in samples] == ["text", "text"] and all(s.n_images == 0 for s in samples)
    for sample, prompt, answer in zip(samples, prompts, answers):
        assert [t.role for t in sample.turns] == ["user", "assistant"] and sample.turns[0].text == prompt
        text = answer.text.strip()
        assert sample.turns[1].text == (text if answer.finish_reason == "stop" else whole_sentences(text))
        assert sample.turns[1].text and text.startswith(sample.turns[1].text)
    assert answers[1].finish_reason == "length" and samples[1].turns[1].text[-1] in ".!?\"')]"


def test_recipe_source_generates_once_into_the_run_folder(smollm2, tmp_path, monkeypatch):
    spec = {"source": "replay", "language_model": "smollm2", "n": 3, "max_new_tokens": 48}
    calls = []
    real = replay.replay_chats

    def counted(lm, prompts, **kw):
        calls.append(prompts)
        return real(smollm2, prompts, **kw)

    monkeypatch.setattr(replay, "replay_chats", counted)
    source = sample_source(spec, seed=0, run=tmp_path)
    drawn = [source(i) for i in range(6)]
    asked = {s.turns[0].text for s in drawn}
    assert len(asked) >= 2 and asked <= set(replay_prompts(3))  # an answer with no full sentence is dropped
    assert all(s.task == "text" and not s.image_paths for s in drawn)
    again = sample_source(spec, seed=0, run=tmp_path)  # a resumed run reads the folder back
    assert [again(i).turns[1].text for i in range(6)] == [s.turns[1].text for s in drawn] and len(calls) == 1
    folders = list(tmp_path.glob("replay-*"))
    assert len(folders) == 1 and (folders[0] / "data.json").is_file()
    sample_source({**spec, "n": 4}, seed=0, run=tmp_path)  # another spec, another folder
    assert len(calls) == 2 and len(list(tmp_path.glob("replay-*"))) == 2
    mixed = sample_source({"mix": [{"weight": 1, "source": "scenes", "tasks": "color"}, {"weight": 1, **spec}]},
                          seed=0, run=tmp_path)
    assert {mixed(i).task for i in range(20)} == {"vqa", "text"} and len(calls) == 2


def test_recipe_source_errors_are_named(tmp_path):
    with pytest.raises(ConfigError, match="generated into a run folder"):
        sample_source({"source": "replay", "language_model": "smollm2"})
    with pytest.raises(ConfigError, match="needs 'language_model'"):
        replay_folder({"n": 3}, tmp_path)
    with pytest.raises(ConfigError, match="unknown field.*temperature"):
        replay_folder({"language_model": "smollm2", "temperature": 0.7}, tmp_path)
    with pytest.raises(ConfigError, match="not a decoder language model"):
        replay_chats("scenes-clip", ["Hi!"])
