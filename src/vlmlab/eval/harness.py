"""The scenes benchmark harness: score any vlmlab model on synthetic scenes through the public API.

A generative model (one with `ask`) answers every assistant turn of every sample: it gets the
conversation up to that turn, with the true answers of earlier turns (teacher forcing, so one
wrong answer does not spoil the rest of a dialogue), and the sample's images. A dual encoder
(one with `embed_image` / `embed_text`) is scored on zero-shot classification and retrieval.
Nothing here knows a model family: later models plug in by offering those methods.

Scoring, per answer kind (`vlmlab.data.scenes.ANSWER_KINDS`):
  vqa: normalised exact match; anls: ANLS; box: IoU >= 0.5 after parsing the answer's box;
  points: one predicted point inside each target's visible mask (`point_correct`);
  caption: CIDEr-D (and BLEU-4) over the task's corpus.
The overall score is the mean over the non-caption tasks (each task weighs the same); captions
are reported beside it, on their own scale.

The model calls. Generative models:
    model.ask(messages, images=[PIL images], max_new_tokens=N) -> str | object with `.text`
where `messages` is a list of {"role", "content"} dicts whose first user content holds one
"<image>" placeholder per image (the LLaVA convention, as in `Sample.messages()`).
Dual encoders: `model.classify(images, labels) -> scores (N, C)` if offered (else cosine
similarity of `embed_image(images)` and `embed_text(["a photo of a <label>."])`), and
`embed_image` / `embed_text` for retrieval.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from vlmlab.data.scenes import (
    COLOR_NAMES, NO_POINTS, SHAPES, SPLITS, TASKS, Answer, Sample, SceneConfig, chance_levels, class_names,
    classification_sample, generate_sample, image_text_pair,
)
from vlmlab.eval.metrics import (
    anls, bleu, box_iou, cider_d, parse_box, parse_points_answer, point_correct, retrieval_recall, vqa_accuracy,
    zero_shot_top1,
)
from vlmlab.errors import InputError

BENCHES = ("scenes",)
DEFAULT_N = 20  # samples per task


@dataclass
class Prediction:
    """One scored assistant turn."""

    sample: Sample
    turn: int  # index into sample.turns
    answer: Answer
    text: str  # what the model said
    score: float | None  # None for captions (scored per corpus)
    parsed: Any = None  # the parsed box / points, for the report picture


@dataclass
class Report:
    """Scores per task, the overall score, and the predictions behind them."""

    model: str
    split: str
    scores: dict[str, float]  # task -> mean score (captions: CIDEr-D)
    counts: dict[str, int]  # task -> scored answers
    overall: float | None
    extra: dict[str, float] = field(default_factory=dict)  # caption BLEU-4, retrieval R@K, ...
    chance: dict[str, float | None] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "bench": "scenes", "split": self.split, "overall": self.overall,
            "scores": self.scores, "counts": self.counts, "extra": self.extra, "chance": self.chance,
            "seconds": round(self.seconds, 3),
            "examples": [
                {"id": p.sample.id, "task": p.answer.task, "turn": p.turn, "prediction": p.text,
                 "truth": p.sample.turns[p.turn].text, "score": p.score}
                for p in self.predictions[:200]
            ],
        }


def is_generative(model: Any) -> bool:
    return callable(getattr(model, "ask", None))


def is_dual_encoder(model: Any) -> bool:
    return callable(getattr(model, "embed_image", None)) and callable(getattr(model, "embed_text", None))


def bench_samples(split: str, n: int, tasks: Iterable[str] | None = None, config: SceneConfig | None = None,
                  start: int = 0) -> list[Sample]:
    """Samples start..start+n-1 of `split` for each task (every task but `classify` by default)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    names = list(tasks) if tasks is not None else [t for t in TASKS if t != "classify"]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(TASKS)}")
    return [generate_sample(t, start + i, split, config) for t in names for i in range(n)]


# ---- scoring one answer --------------------------------------------------------------------------


def score_answer(sample: Sample, answer: Answer, text: str) -> tuple[float | None, Any]:
    """(score in [0, 1] or None for captions, the parsed location if any) of one model answer."""
    image = sample.images[answer.image]
    w, h = image.size
    if answer.kind == "vqa":
        return vqa_accuracy(text, answer.value), None
    if answer.kind == "anls":
        return anls(text, answer.value), None
    if answer.kind == "box":
        box = parse_box(text, w, h)
        return (1.0 if box is not None and box_iou(box, answer.value) >= 0.5 else 0.0), box
    if answer.kind == "points":
        points = parse_points_answer(text, w, h)
        masks = sample.scenes[answer.image].object_masks()[list(answer.value)] if answer.value else np.zeros((0, h, w), bool)
        return (1.0 if point_correct(points, masks) else 0.0), points
    if answer.kind == "caption":
        return None, None
    raise InputError(f"sample {sample.id}: unknown answer kind {answer.kind!r}")


def _text(out: Any) -> str:
    return out if isinstance(out, str) else str(getattr(out, "text", out))


# ---- the two model kinds -------------------------------------------------------------------------


def _evaluate_generative(model: Any, samples: Sequence[Sample], max_new_tokens: int,
                         progress: Callable[[int], None]) -> list[Prediction]:
    preds = []
    for sample in samples:
        messages = sample.messages()
        for i, turn in enumerate(sample.turns):
            if turn.role != "assistant" or turn.answer is None:
                continue
            out = _text(model.ask(messages[:i], images=sample.images, max_new_tokens=max_new_tokens))
            score, parsed = score_answer(sample, turn.answer, out)
            preds.append(Prediction(sample, i, turn.answer, out, score, parsed))
        progress(1)
    return preds


def _summarise(preds: Sequence[Prediction]) -> tuple[dict[str, float], dict[str, int], dict[str, float], float | None]:
    by_task: dict[str, list[Prediction]] = defaultdict(list)
    for p in preds:
        by_task[p.answer.task].append(p)
    scores, counts, extra = {}, {}, {}
    for task, ps in sorted(by_task.items()):
        counts[task] = len(ps)
        if ps[0].answer.kind == "caption":
            cands = {k: p.text for k, p in enumerate(ps)}
            refs = {k: list(p.answer.value) for k, p in enumerate(ps)}
            scores[task] = cider_d(cands, refs)
            extra[f"{task}_bleu4"] = bleu(cands, refs)
        else:
            scores[task] = float(np.mean([p.score for p in ps]))
    plain = [v for t, v in scores.items() if by_task[t][0].answer.kind != "caption"]
    return scores, counts, extra, (float(np.mean(plain)) if plain else None)


# Zero-shot tasks on single-object scenes: (labels of the split, prompt template, the true label).
ZERO_SHOT = {
    "zero_shot": (lambda split: class_names(split), "a photo of a {}.",
                  lambda obj: f"{obj.color} {obj.shape}"),
    "zero_shot_shape": (lambda split: list(SHAPES), "a photo of a {}.", lambda obj: obj.shape),
    "zero_shot_color": (lambda split: list(COLOR_NAMES), "a photo of a {} object.", lambda obj: obj.color),
}


def _zero_shot_scores(model: Any, images: list, labels: list[str], template: str) -> np.ndarray:
    if callable(getattr(model, "classify", None)):
        return np.asarray(model.classify(images, labels, templates=[template]), dtype=np.float64)
    return _cosine(np.asarray(model.embed_image(images), np.float64),
                   np.asarray(model.embed_text([template.format(label) for label in labels]), np.float64))


def _evaluate_dual(model: Any, split: str, n: int, config: SceneConfig | None,
                   progress: Callable[[int], None]) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    cls_samples = [classification_sample(i, split, config) for i in range(n)]
    images = [s.images[0] for s in cls_samples]
    objects = [s.scenes[0].objects[0] for s in cls_samples]
    scores, counts = {}, {}
    for task, (labels_of, template, truth_of) in ZERO_SHOT.items():
        labels = labels_of(split)
        truth = [labels.index(truth_of(obj)) for obj in objects]
        scores[task] = zero_shot_top1(_zero_shot_scores(model, images, labels, template), truth)
        counts[task] = n
    progress(n)
    pairs = [image_text_pair(i, split, config) for i in range(n)]
    pi = np.asarray(model.embed_image([p.image for p in pairs]), dtype=np.float64)
    pt = np.asarray(model.embed_text([p.caption for p in pairs]), dtype=np.float64)
    progress(n)
    recall = retrieval_recall(_cosine(pi, pt), list(range(n)))
    for key in ("i2t_R@1", "t2i_R@1"):
        scores[f"retrieval_{key}"] = recall[key]
        counts[f"retrieval_{key}"] = n
    return scores, counts, recall


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return a @ b.T


def evaluate(
    model: Any,
    *,
    split: str = "test",
    n: int = DEFAULT_N,
    tasks: Iterable[str] | None = None,
    config: SceneConfig | None = None,
    max_new_tokens: int = 96,
    name: str | None = None,
    with_chance: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Score `model` on the scenes benchmark: `n` samples per task of `split`.

    progress(advance, total) is called as samples are scored (for a progress bar).
    """
    started = time.perf_counter()
    name = name or getattr(model, "name", type(model).__name__)
    if is_generative(model):
        samples = bench_samples(split, n, tasks, config)
        if callable(getattr(model, "watch", None)):  # the reference answerers below look samples up
            model.watch(samples)
        total = len(samples)
        preds = _evaluate_generative(model, samples, max_new_tokens, lambda k: progress and progress(k, total))
        scores, counts, extra, overall = _summarise(preds)
    elif is_dual_encoder(model):
        preds = []
        scores, counts, extra = _evaluate_dual(model, split, n, config, lambda k: progress and progress(k, 2 * n))
        overall = float(np.mean(list(scores.values())))
    else:
        raise InputError(
            f"model {name!r} ({getattr(model, 'kind', type(model).__name__)}) cannot be scored on scenes: "
            "it needs `ask` (a vision-language model) or `embed_image` and `embed_text` (a dual encoder)"
        )
    chance = {}
    if with_chance and preds:
        scored = sorted({p.answer.task for p in preds} & (set(TASKS) - {"multi_turn"}))
        levels = chance_levels(n=max(n, 50), split=split, config=config, tasks=scored)
        chance = {t: v.get("chance") for t, v in levels.items()}
    return Report(name, split, scores, counts, overall, extra, chance, preds, time.perf_counter() - started)


# ---- reference answerers ------------------------------------------------------------------------


class Oracle:
    """Answers every question with the generator's own answer (derived from the scene graph).

    It scores 100 % on every non-caption task, which checks that the harness, the answer formats
    and the parsers agree end to end. It recognises a sample by its image objects.
    """

    kind = "oracle"
    name = "oracle"

    def __init__(self) -> None:
        self._by_images: dict[int, Sample] = {}

    def watch(self, samples: Iterable[Sample]) -> "Oracle":
        for s in samples:
            self._by_images[id(s.images[0])] = s
        return self

    def ask(self, messages: list[dict], images: Sequence[Any] = (), **_: Any) -> str:
        sample = self._by_images.get(id(images[0])) if images else None
        if sample is None:
            raise InputError("the oracle only answers samples it was shown with watch()")
        return sample.turns[len(messages)].text


class Majority:
    """Answers each task with its most frequent answer on `train` (a blind, prior-only baseline).

    Points: "There are none."; boxes: the most common true box in 0-1000 coordinates; captions: the
    most common reference. Like the oracle it looks samples up by image, only to know the task.
    """

    kind = "majority"
    name = "majority"

    def __init__(self, n_train: int = 200, config: SceneConfig | None = None):
        self.n_train, self.config = n_train, config
        self._answers: dict[str, str] = {}
        self._by_images: dict[int, Sample] = {}

    def watch(self, samples: Iterable[Sample]) -> "Majority":
        for s in samples:
            self._by_images[id(s.images[0])] = s
        return self

    def _majority(self, task: str) -> str:
        if task not in self._answers:
            texts: Counter[str] = Counter()
            for i in range(self.n_train):
                s = generate_sample(self._family_task(task), i, "train", self.config)
                for t in s.turns:
                    if t.answer is not None and t.answer.task == task:
                        texts[NO_POINTS if t.answer.kind == "points" else t.text] += 1
            self._answers[task] = texts.most_common(1)[0][0] if texts else ""
        return self._answers[task]

    @staticmethod
    def _family_task(task: str) -> str:
        return task if task in TASKS else "multi_turn"

    def ask(self, messages: list[dict], images: Sequence[Any] = (), **_: Any) -> str:
        sample = self._by_images.get(id(images[0])) if images else None
        if sample is None:
            raise InputError("the majority baseline only answers samples it was shown with watch()")
        return self._majority(sample.turns[len(messages)].answer.task)


BASELINES = {"oracle": Oracle, "majority": Majority}


# ---- the report ----------------------------------------------------------------------------------


def write_report(report: Report, out: str | Path, grid: int = 16) -> tuple[Path, Path | None]:
    """Write `report.json` and (for generative models) `examples.png` into folder `out`."""
    from vlmlab.checkpoints.hf import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    atomic_write(json_path, (json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n").encode())
    if not report.predictions:
        return json_path, None
    png_path = out / "examples.png"
    example_grid(report.predictions, grid).save(png_path)
    return json_path, png_path


def _pick_examples(preds: Sequence[Prediction], k: int) -> list[Prediction]:
    """Locations first (boxes, points), one task after another, then the rest."""
    located = [p for p in preds if p.answer.kind in ("box", "points")]
    rest = [p for p in preds if p.answer.kind not in ("box", "points")]
    chosen, seen = [], set()
    for pool in (located, rest):
        for p in pool:
            if len(chosen) < k and p.answer.task not in seen:
                chosen.append(p)
                seen.add(p.answer.task)
    for p in located + rest:
        if len(chosen) < k and p not in chosen:
            chosen.append(p)
    return chosen


def example_grid(preds: Sequence[Prediction], k: int = 16, cell: int = 256):
    """A PNG-ready grid: each example's image with the true (green) and predicted (red) boxes and
    points drawn, and the question, the answer and the truth written under it."""
    from PIL import Image, ImageDraw, ImageFont

    chosen = _pick_examples(preds, k)
    cols = min(4, max(1, len(chosen)))
    rows = -(-len(chosen) // cols)
    text_h = 84
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    font = ImageFont.load_default()
    for idx, p in enumerate(chosen):
        image = p.sample.images[p.answer.image].copy()
        w, h = image.size
        draw = ImageDraw.Draw(image)
        if p.answer.kind == "box":
            draw.rectangle(p.answer.value, outline=(0, 200, 0), width=2)
            if p.parsed is not None:
                draw.rectangle(p.parsed, outline=(230, 0, 0), width=2)
        if p.answer.kind == "points":
            masks = p.sample.scenes[p.answer.image].object_masks()
            for i in p.answer.value:
                ys, xs = np.nonzero(masks[i])
                _cross(draw, (xs.mean(), ys.mean()), (0, 200, 0))
            for pt in p.parsed or []:
                _cross(draw, pt, (230, 0, 0))
        scale = cell / max(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.NEAREST)
        x0, y0 = (idx % cols) * cell, (idx // cols) * (cell + text_h)
        sheet.paste(image, (x0, y0))
        question = p.sample.turns[p.turn - 1].text.replace("<image>", "").strip() if p.turn else ""
        mark = "" if p.score is None else ("  OK" if p.score >= 0.5 else "  WRONG")
        lines = [f"[{p.answer.task}]{mark}", "Q: " + question, "A: " + p.text, "T: " + p.sample.turns[p.turn].text]
        ImageDraw.Draw(sheet).multiline_text((x0 + 4, y0 + cell + 2), "\n".join(_clip(s, 40) for s in lines),
                                             fill="black", font=font, spacing=2)
    return sheet


def _cross(draw, pt: tuple[float, float], color: tuple[int, int, int], r: int = 4) -> None:
    x, y = pt
    draw.line([(x - r, y), (x + r, y)], fill=color, width=2)
    draw.line([(x, y - r), (x, y + r)], fill=color, width=2)


def _clip(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"
