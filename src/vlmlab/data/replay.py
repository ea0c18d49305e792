"""Text-only replay chats: a language model's own answers to everyday requests, as training data.

A vision-language model trained only on questions about images forgets part of its language
model's text chat (asked for a story, it answers like a scene description). Mixing a few of the
language model's *own* answers to text-only requests into training (`data.mix` in a recipe)
keeps that behaviour: the targets are what the model said before, so they pull it back without
teaching anything new. This module makes those chats:

    prompts = replay_prompts(150)                  # distinct templated requests, seeded
    samples = replay_chats("smollm2", prompts)     # greedy answers, batched
    write_llava_json(samples, "replay/")           # a LLaVA-JSON folder without images

Recipes name it as a data source, generated once into the run folder and read back on resume:
`{ source = "replay", language_model = "smollm2", n = 150, max_new_tokens = 200 }`.
Answers cut by `max_new_tokens` end at their last full sentence (a target that stops
mid-sentence would teach the model to stop mid-sentence); answers without one are dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlmlab.data.scenes.sample import Sample, Turn
from vlmlab.errors import ConfigError, DataError

SUBJECTS = (
    "a dragon and a knight", "a lost cat", "a robot who learns to paint", "a lighthouse keeper", "a small boat",
    "a girl who finds a key", "a talking tree", "two friends on a mountain", "a baker in a busy city",
    "an old clock", "a fox in winter", "a child's first day at school", "a ship in a storm", "a magic garden",
    "a detective and a missing hat", "a bird that cannot fly", "a train journey", "a village by the sea",
)
TOPICS = (
    "how rain forms", "photosynthesis", "how a computer works", "why the sky is blue", "gravity",
    "how vaccines work", "what a black hole is", "how bread rises", "the water cycle", "how magnets work",
    "why we have seasons", "how the heart pumps blood", "what an atom is", "how airplanes fly",
    "what inflation is", "how the internet works", "why leaves change colour", "how a rainbow forms",
)
THINGS = (
    "the Moon", "the ocean", "honey bees", "the Roman Empire", "volcanoes", "the human brain", "Mars",
    "elephants", "the Amazon rainforest", "chess", "the Eiffel Tower", "penguins", "the Sun", "music",
    "the Great Wall of China", "coffee", "trees", "the Pacific Ocean",
)
TEMPLATES = (
    ("Tell me a story about {x}.", SUBJECTS),
    ("Write a short story about {x}.", SUBJECTS),
    ("Write a short poem about {x}.", THINGS),
    ("Explain {x} in simple terms.", TOPICS),
    ("Can you explain {x}?", TOPICS),
    ("Give me three facts about {x}.", THINGS),
    ("What do you know about {x}?", THINGS),
    ("Describe {x} in a few sentences.", THINGS),
)
SMALL_TALK = (
    "Hi!", "Hello, how are you?", "What can you do?", "Thank you!", "What is the capital of France?",
    "What is 12 times 7?", "Can you give me a tip for staying focused?", "What should I cook for dinner tonight?",
)


def replay_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct requests: stories, poems, explanations, facts and small talk, in a seeded order
    (the first n of one shuffle of all of them, so a larger n extends a smaller one)."""
    everything = list(SMALL_TALK) + [t.format(x=x) for t, xs in TEMPLATES for x in xs]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= len(everything):
        raise ConfigError(f"replay: n must be an integer in 1..{len(everything)}, got {n!r}")
    order = np.random.default_rng([seed, 0x7265706C]).permutation(len(everything))
    return [everything[i] for i in order[:n]]


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


def whole_sentences(text: str) -> str:
    """`text` up to its last sentence end ('' when it has none)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else ""


def replay_chats(language_model: Any, prompts: Sequence[str], *, max_new_tokens: int = 200,
                 repetition_penalty: float = 1.1, batch_size: int = 8, progress: bool = False) -> list[Sample]:
    """One text-only Sample per prompt whose answer survives: the greedy answer of `language_model`
    (a `LanguageModel` or a name/path `vlmlab.load` reads), through its own chat template."""
    import vlmlab
    from vlmlab.infer.lm import LanguageModel

    lm = vlmlab.load(language_model) if isinstance(language_model, (str, Path)) else language_model
    if type(lm) is not LanguageModel:
        raise ConfigError(f"replay: {language_model!r} is not a decoder language model")
    samples = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        results = lm.generate(chunk, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        for k, (prompt, result) in enumerate(zip(chunk, results)):
            answer = result.text.strip() if result.finish_reason == "stop" else whole_sentences(result.text.strip())
            if answer:
                samples.append(Sample(f"replay-{start + k:05d}", "text", [],
                                      [Turn("user", prompt), Turn("assistant", answer)]))
        if progress:
            print(f"replay: {min(start + batch_size, len(prompts))}/{len(prompts)} prompts answered", flush=True)
    if not samples:
        raise DataError(f"replay: {language_model!r} gave no usable answer to {len(prompts)} prompts")
    return samples


def replay_folder(spec: dict[str, Any], root: Path, *, generate: bool = True) -> Path:
    """The LLaVA-JSON folder of a recipe's `{source = "replay", ...}` (spec without 'source'):
    `root/replay-<hash of the spec>`, generated there unless it exists (or `generate` is False:
    the other processes of a distributed run, which wait for the main one)."""
    from vlmlab.data.llava_json import DATA_FILE, write_llava_json

    spec = dict(spec)
    try:
        lm = spec.pop("language_model")
    except KeyError:
        raise ConfigError("data: a 'replay' source needs 'language_model' (whose answers to replay)") from None
    prompts = replay_prompts(spec.pop("n", 150), spec.pop("seed", 0))
    options = {k: spec.pop(k) for k in ("max_new_tokens", "repetition_penalty") if k in spec}
    if spec:
        raise ConfigError(f"data: unknown field(s) of a 'replay' source: {', '.join(sorted(spec))}")
    key = json.dumps({"language_model": str(lm), "prompts": prompts, **options}, sort_keys=True)
    folder = root / f"replay-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if generate and not (folder / DATA_FILE).is_file():
        write_llava_json(replay_chats(lm, prompts, progress=True, **options), folder)  # data.json last, atomic
    return folder


__all__ = ["replay_chats", "replay_folder", "replay_prompts", "whole_sentences"]
