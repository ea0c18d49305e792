"""Task generators: every VLM task as a conversation about procedurally built scenes.

Each fine-grained task (`TASKS[name]`) is a function ``(TaskContext) -> (scenes, turns)``;
`generate_sample(task, seed, split, config)` runs it with a deterministic RNG and wraps the result
in a `Sample`. Rules every generator follows:

* answer first: the answer is drawn (uniformly, or 50/50 for yes/no) before the scene, and the
  scene is built to satisfy it, so the answer distribution is balanced and carries no prior;
* every answer is then computed from the finished scene graph by a question function
  (`count_qa`, `spatial_qa`, ...), never copied from the plan, so a plan that went wrong cannot
  produce a false answer;
* a question refers to an object only by its minimal unique description (shape, then colour +
  shape, then size + colour + shape, leaving out the attribute asked about); a draw in which a
  referent is not unique, a relation is not clear-cut or a count ties raises `Unsatisfiable` and
  `generate_sample` draws again with the next attempt's seed.

The question functions take any scene, so multi-turn dialogues reuse them on one random scene.
"""

from __future__ import annotations

import math
import random
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from vlmlab.data.coords import format_box, format_points
from vlmlab.data.scenes.sample import IMAGE_TOKEN, Answer, Sample, Turn
from vlmlab.data.scenes.scene import (
    ALL_KINDS, COLOR_NAMES, MAX_ATTEMPTS, SHAPES, SIZES, WORDS, Kind, Scene, SceneConfig, SceneObject,
    Spec, Unsatisfiable, allowed_kinds, build_scene, derive_seed, describe_kind, is_held_out, split_seed,
)
from vlmlab.errors import InputError

QA = tuple[str, str, Answer]  # question text, answer text, ground truth

# --- phrasing -----------------------------------------------------------------------------------

# Every question and prompt template, by task. `{p}` plural noun phrase, `{one}` singular, `{s}`
# singular with article, `{d}` / `{a}` / `{b}` referring expressions, `{box}` a box in coords.format_box form.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "count": ("How many {p} are there?", "How many {p} are in the image?", "Count the {p}.",
              "What is the number of {p}?"),
    "exist": ("Is there {s}?", "Are there any {p}?", "Does the image contain {s}?", "Is there {s} in the image?"),
    "color": ("What color is the {d}?", "What is the color of the {d}?", "Which color does the {d} have?"),
    "shape": ("What shape is the {d}?", "What is the shape of the {d}?", "Which shape does the {d} have?"),
    "size": ("What size is the {d}?", "Is the {d} small or large?", "Is the {d} large or small?"),
    "spatial_yn": ("Is the {a} {rel} the {b}?", "Is the {a} located {rel} the {b}?"),
    "spatial_x": ("Is the {a} to the left or to the right of the {b}?", "Is the {a} left or right of the {b}?"),
    "spatial_y": ("Is the {a} above or below the {b}?", "Is the {a} higher or lower than the {b}? Answer above or below."),
    "nearest": ("Which object is closest to the {a}?", "What is the nearest object to the {a}?",
                "Which object is nearest to the {a}?"),
    "compare": ("Are there {cmp} {p} than {q}?", "Does the image have {cmp} {p} than {q}?"),
    "ocr_word": ("What word is written in the image?", "What does the text in the image say?",
                 "Read the word in the image."),
    "ocr_word_at": ("What word is written in the region {box}?", "Read the word inside {box}."),
    "ocr_where": ("Where is the word {w} written?", "Give the bounding box of the text {w}.",
                  "Locate the word {w}."),
    "caption_short": ("Describe the image briefly.", "Write a short caption for this image.",
                      "What is in this picture? Answer in one sentence."),
    "caption_detailed": ("Describe the image in detail.", "Give a detailed description of every object in the image.",
                         "Describe each object in the image and where it is."),
    "ground": ("Where is the {d}?", "Give the bounding box of the {d}.", "Locate the {d}.",
               "Find the {d} and give its box."),
    "refer": ("Describe the object in {box}.", "What object is in the region {box}?", "Name the object inside {box}."),
    "point": ("Point to every {one}.", "Point to all {p}.", "Where are the {p}? Point to them."),
    "multi_image_more": ("Which image has more {p}, the first or the second?",
                         "Are there more {p} in the first image or in the second?"),
    "multi_image_both": ("Is there {s} in both images?", "Do both images contain {s}?"),
    "multi_image_which": ("Which image contains {s}, the first or the second?", "In which image is there {s}, the first or the second?"),
    "classify": ("What is this object?", "Name the object in the image.", "What object is shown?"),
}
NO_POINTS = "There are none."  # the pointing answer when nothing matches (value [])
REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty")


def article(phrase: str) -> str:
    """`phrase` with "a" / "an" in front."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Query:
    """A set of objects named by some attributes ("red objects", "circles", "small blue stars")."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None

    def matches(self, k: Kind | SceneObject) -> bool:
        return ((self.color is None or k.color == self.color) and (self.shape is None or k.shape == self.shape)
                and (self.size is None or k.size == self.size))

    def phrase(self, n: int = 2) -> str:
        """Noun phrase, plural unless n == 1."""
        words = [w for w in (self.size, self.color) if w]
        noun = self.shape or "object"
        return " ".join(words + [noun if n == 1 else noun + "s"])

    def spec(self) -> Spec:
        return Spec(color=self.color, shape=self.shape, size=self.size)

    def count(self, scene: Scene) -> int:
        return sum(self.matches(o) for o in scene.objects)


def of_kind(k: Kind | SceneObject, attrs: Sequence[str]) -> Query:
    return Query(**{a: getattr(k, a) for a in attrs})


# Minimal unique descriptions, in order, for each attribute a question may not mention.
REFERENCE_LEVELS: dict[tuple[str, ...], tuple[tuple[str, ...], ...]] = {
    (): (("shape",), ("color", "shape"), ("size", "color", "shape")),
    ("color",): (("shape",), ("size", "shape")),
    ("shape",): (("color",), ("size", "color")),
    ("size",): (("shape",), ("color", "shape")),
}


def describe(scene: Scene, i: int, exclude: tuple[str, ...] = ()) -> str | None:
    """The minimal unique description of object i ("star", "red star", "small red star"), without
    the attributes in `exclude`; None if no such description picks out object i alone."""
    o = scene.objects[i]
    for level in REFERENCE_LEVELS[exclude]:
        q = of_kind(o, level)
        if q.count(scene) == 1:
            return describe_kind(o, level)
    return None


# --- context ------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _pool(split: str, color: str | None, shape: str | None, size: str | None, held: bool) -> tuple[Kind, ...]:
    return tuple(k for k in allowed_kinds(split)
                 if (color is None or k.color == color) and (shape is None or k.shape == shape)
                 and (size is None or k.size == size) and (not held or is_held_out(k.color, k.shape)))


@dataclass
class TaskContext:
    """What a generator draws from: its RNG, the scene config, the split and the sample's seed."""

    rng: random.Random
    config: SceneConfig
    split: str
    seed: int

    def pick(self, options: Sequence):
        return options[self.rng.randrange(len(options))]

    def kind(self, color: str | None = None, shape: str | None = None, size: str | None = None) -> Kind:
        """A random kind allowed in this split with the given attributes. In the compositional split
        half of the draws are held-out combinations when one fits, so questions test them often."""
        if self.split == "compositional" and self.rng.random() < 0.5:
            held = _pool(self.split, color, shape, size, True)
            if held:
                return self.pick(held)
        pool = _pool(self.split, color, shape, size, False)
        if not pool:
            raise Unsatisfiable("no allowed kind")
        return self.pick(pool)

    def query(self, types: Sequence[tuple[str, ...]]) -> Query:
        return of_kind(self.kind(), self.pick(types))

    def scene(self, required: Sequence[Spec] = (), forbid: Callable[[Kind], bool] | None = None,
              **kwargs) -> tuple[Scene, list[int]]:
        return build_scene(self.rng, self.config, self.split, self.seed, required=required, forbid=forbid, **kwargs)

    def referent(self, kind: Kind, exclude: tuple[str, ...] = ()) -> tuple[list[Spec], Callable[[Kind], bool]]:
        """Specs and a distractor predicate that make `kind`'s minimal description (without
        `exclude`) land on a random level: the target, plus a confuser that shares the previous
        level's attributes (so the shorter description is ambiguous)."""
        levels = REFERENCE_LEVELS[exclude]
        n = self.rng.randrange(len(levels))
        specs = [Spec(kind.color, kind.shape, kind.size)]
        if n:
            (extra,) = [a for a in levels[n] if a not in levels[n - 1]]
            value = getattr(kind, extra)
            specs.append(Spec(**{a: getattr(kind, a) for a in levels[n - 1]},
                              avoid=lambda k, a=extra, v=value: getattr(k, a) == v))
        return specs, of_kind(kind, levels[n]).matches


def _either(*preds: Callable[[Kind], bool]) -> Callable[[Kind], bool]:
    return lambda k: any(p(k) for p in preds)


def _user(text: str, n_images: int = 1) -> Turn:
    return Turn("user", (IMAGE_TOKEN + "\n") * n_images + text)


def _dialogue(scene: Scene, *qas: QA) -> tuple[list[Scene], list[Turn]]:
    turns: list[Turn] = []
    for n, (q, a, ans) in enumerate(qas):
        turns.append(_user(q) if n == 0 else Turn("user", q))
        turns.append(Turn("assistant", a, ans))
    return [scene], turns


def _need(qa: QA | None) -> QA:
    if qa is None:
        raise Unsatisfiable("the question is not determined by this scene")
    return qa


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


# --- question functions (ground truth from the scene graph) -------------------------------------

COUNT_QUERIES = (("color",), ("shape",), ("size",), ("color", "shape"), ("size", "shape"))
EXIST_QUERIES = (("color",), ("shape",), ("color", "shape"), ("size", "color", "shape"))
POINT_QUERIES = (("color",), ("shape",), ("color", "shape"), ("size", "color", "shape"))
MULTI_QUERIES = (("color",), ("shape",), ("color", "shape"))


def count_qa(ctx: TaskContext, scene: Scene, q: Query) -> QA:
    n = str(q.count(scene))
    return ctx.pick(TEMPLATES["count"]).format(p=q.phrase()), n, Answer("count", "vqa", n)


def exist_qa(ctx: TaskContext, scene: Scene, q: Query) -> QA:
    a = _yes_no(q.count(scene) > 0)
    return ctx.pick(TEMPLATES["exist"]).format(s=article(q.phrase(1)), p=q.phrase()), a, Answer("exist", "vqa", a)


def attribute_qa(ctx: TaskContext, scene: Scene, i: int, attr: str) -> QA | None:
    """What color / shape / size is object i (described without that attribute)?"""
    d = describe(scene, i, (attr,))
    if d is None:
        return None
    a = getattr(scene.objects[i], attr)
    return ctx.pick(TEMPLATES[attr]).format(d=d), a, Answer(attr, "vqa", a)


def relation(scene: Scene, a: int, b: int, axis: str) -> str | None:
    """Where object a is relative to b on an axis ("left"/"right" or "above"/"below"), when their
    boxes are apart on that axis by a clear margin (2% of the image side); None otherwise."""
    A, B = scene.objects[a].box, scene.objects[b].box
    lo, hi, side = (0, 2, scene.width) if axis == "x" else (1, 3, scene.height)
    margin = max(1, round(0.02 * side))
    if A[hi] + margin <= B[lo]:
        return "left" if axis == "x" else "above"
    if B[hi] + margin <= A[lo]:
        return "right" if axis == "x" else "below"
    return None


def spatial_qa(ctx: TaskContext, scene: Scene, a: int, b: int, axis: str, want_yes: bool | None = None) -> QA | None:
    """Yes/no ("Is the A left of the B?") or choice ("left or right?") about two objects.
    For yes/no, `want_yes` picks which relation is asked so the answer comes out as wanted."""
    rel = relation(scene, a, b, axis)
    da, db = describe(scene, a), describe(scene, b)
    if rel is None or da is None or db is None:
        return None
    if ctx.rng.random() < 0.5:
        if want_yes is None:
            want_yes = ctx.rng.random() < 0.5
        asked = rel if want_yes else OPPOSITE[rel]
        ans = _yes_no(asked == rel)
        q = ctx.pick(TEMPLATES["spatial_yn"]).format(a=da, b=db, rel=REL_PHRASE[asked])
    else:
        ans = rel
        q = ctx.pick(TEMPLATES["spatial_" + axis]).format(a=da, b=db)
    return q, ans, Answer("spatial", "vqa", ans)


def nearest_qa(ctx: TaskContext, scene: Scene, a: int) -> QA | None:
    """Which object is closest (centre to centre) to object a? Only when the nearest is unique by
    a clear margin (next one 1.3x and 5% of the shorter side farther) and describable."""
    da = describe(scene, a)
    if da is None or len(scene.objects) < 3:
        return None
    ax, ay = scene.objects[a].center
    dist = sorted((math.hypot(o.center[0] - ax, o.center[1] - ay), j) for j, o in enumerate(scene.objects) if j != a)
    (d1, j), (d2, _) = dist[0], dist[1]
    if d2 < 1.3 * d1 or d2 - d1 < 0.05 * min(scene.width, scene.height):
        return None
    dn = describe(scene, j)
    if dn is None:
        return None
    return ctx.pick(TEMPLATES["nearest"]).format(a=da), dn, Answer("nearest", "vqa", dn)


def compare_qa(ctx: TaskContext, scene: Scene, q1: Query, q2: Query, more: bool) -> QA | None:
    """Are there more (fewer) q1 than q2? Never asked when the counts tie."""
    n1, n2 = q1.count(scene), q2.count(scene)
    if n1 == n2:
        return None
    a = _yes_no(n1 > n2 if more else n1 < n2)
    q = ctx.pick(TEMPLATES["compare"]).format(cmp="more" if more else "fewer", p=q1.phrase(), q=q2.phrase())
    return q, a, Answer("compare", "vqa", a)


def ocr_word_qa(ctx: TaskContext, scene: Scene, w: int) -> QA:
    """Which word is written (at this box, when there are several)?"""
    word = scene.words[w]
    if len(scene.words) == 1:
        q = ctx.pick(TEMPLATES["ocr_word"])
    else:
        q = ctx.pick(TEMPLATES["ocr_word_at"]).format(box=format_box(word.box, scene.width, scene.height))
    return q, word.text, Answer("ocr_word", "anls", word.text)


def ocr_where_qa(ctx: TaskContext, scene: Scene, w: int) -> QA:
    word = scene.words[w]
    return (ctx.pick(TEMPLATES["ocr_where"]).format(w=word.text), format_box(word.box, scene.width, scene.height),
            Answer("ocr_where", "box", word.box))


def ground_qa(ctx: TaskContext, scene: Scene, i: int) -> QA | None:
    d = describe(scene, i)
    if d is None:
        return None
    box = scene.objects[i].box
    return ctx.pick(TEMPLATES["ground"]).format(d=d), format_box(box, scene.width, scene.height), Answer("ground", "box", box)


def refer_qa(ctx: TaskContext, scene: Scene, i: int) -> QA | None:
    d = describe(scene, i)
    if d is None:
        return None
    q = ctx.pick(TEMPLATES["refer"]).format(box=format_box(scene.objects[i].box, scene.width, scene.height))
    return q, d, Answer("refer", "vqa", d)


def point_on(scene: Scene, i: int) -> tuple[float, float]:
    """A point surely inside object i's visible mask: the centre of the mask pixel closest to the
    mask's centroid, preferring pixels whose 4 neighbours are in the mask too (robust to rounding)."""
    x0, y0, m = scene.visible_mask(i)
    inner = np.zeros_like(m)
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    ys, xs = np.nonzero(m)
    cy, cx = ys.mean(), xs.mean()
    cand_y, cand_x = np.nonzero(inner) if inner.any() else (ys, xs)
    k = int(np.argmin((cand_y - cy) ** 2 + (cand_x - cx) ** 2))
    return x0 + int(cand_x[k]) + 0.5, y0 + int(cand_y[k]) + 0.5


def point_qa(ctx: TaskContext, scene: Scene, q: Query, image: int = 0) -> QA:
    """Point to every object of a query (left to right); "There are none." when nothing matches."""
    targets = sorted((i for i, o in enumerate(scene.objects) if q.matches(o)), key=lambda i: scene.objects[i].center)
    question = ctx.pick(TEMPLATES["point"]).format(p=q.phrase(), one=q.phrase(1))
    if not targets:
        return question, NO_POINTS, Answer("point", "points", [], image)
    pts = [point_on(scene, i) for i in targets]
    return question, format_points(pts, scene.width, scene.height, q.phrase(len(pts))), Answer("point", "points", targets, image)


# -- captions --

_REGIONS = (("in the top left", "at the top", "in the top right"),
            ("on the left", "in the center", "on the right"),
            ("in the bottom left", "at the bottom", "in the bottom right"))


def region(scene: Scene, x: float, y: float) -> str:
    """Which ninth of the image a point is in, as a phrase."""
    col = min(2, int(3 * x / scene.width))
    row = min(2, int(3 * y / scene.height))
    return _REGIONS[row][col]


def background_phrase(scene: Scene) -> str:
    bg = scene.background
    if bg.kind == "noise":
        return "noisy gray"
    if bg.kind == "gradient":
        return "gray gradient"
    return "plain " + ("light gray" if bg.level > 150 else "dark gray" if bg.level < 100 else "gray")


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _inventory(objects: Sequence[SceneObject], words: Sequence[str]) -> str:
    """'two red circles, a blue star and the word "CAT"', grouped by colour + shape in first-seen order."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    items = [article(f"{c} {s}") if n == 1 else f"{_number(n)} {c} {s}s" for (c, s), n in groups.items()]
    items += [f'the word "{w}"' for w in words]
    return _join(items)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def caption_refs(scene: Scene, detailed: bool) -> list[str]:
    """Reference captions of a scene (several phrasings and orders of the same content). The
    first detailed reference names every object with its size and position: it identifies the
    image, and is the caption of image-text pairs."""
    objs = scene.objects
    n = len(objs)
    bg = background_phrase(scene)
    by_x = sorted(objs, key=lambda o: o.center)
    by_y = sorted(objs, key=lambda o: (o.center[1], o.center[0]))
    by_count = sorted(objs, key=lambda o: (-sum(p.color == o.color and p.shape == o.shape for p in objs),
                                           COLOR_NAMES.index(o.color), SHAPES.index(o.shape)))
    texts = [w.text for w in sorted(scene.words, key=lambda w: (w.x, w.y))]
    n_objects = f"{_number(n)} object{'s' if n != 1 else ''}"
    if not detailed:
        if n == 0 and not texts:
            return [f"An empty {bg} image.", f"Nothing but a {bg} background.", f"A {bg} background with no objects."]
        return [
            _cap(_inventory(by_x, texts)) + ".",
            f"{_cap(n_objects)}: {_inventory(by_count, texts)}." if n else _cap(_inventory(by_x, texts)) + ".",
            f"{_cap(_inventory(by_x, texts))} on a {bg} background.",
            f"A picture of {_inventory(by_count, texts)}.",
        ]
    word_sents = [f'The word "{w.text}" is written {region(scene, (w.box[0] + w.box[2]) / 2, (w.box[1] + w.box[3]) / 2)}.'
                  for w in sorted(scene.words, key=lambda w: (w.x, w.y))]
    speck_sent = ["Small gray specks are scattered over the image."] if scene.specks else []
    bg_sent = f"The background is {'a ' + bg if bg == 'gray gradient' else bg}."
    there = f"There {'is' if n == 1 else 'are'} {n_objects}."
    r1 = [bg_sent, there] + [f"{_cap(article(describe_kind(o)))} is {region(scene, *o.center)}." for o in by_x]
    r2 = [there] + [f"There is {article(describe_kind(o))} {region(scene, *o.center)}." for o in by_y] + [bg_sent]
    parts = [f"{article(describe_kind(o))} {region(scene, *o.center)}" for o in by_x]
    r3 = [f"{_cap(n_objects)} on a {bg} background" + (": " + "; ".join(parts) if parts else "") + "."]
    return [" ".join(r + word_sents + speck_sent) for r in (r1, r2, r3)]


def caption_qa(ctx: TaskContext, scene: Scene, detailed: bool) -> QA:
    task = "caption_detailed" if detailed else "caption_short"
    refs = caption_refs(scene, detailed)
    return ctx.pick(TEMPLATES[task]), ctx.pick(refs), Answer(task, "caption", refs)


# --- generators: answer first, then a scene that realises it ------------------------------------

def gen_count(ctx: TaskContext):
    q = ctx.query(COUNT_QUERIES)
    k = ctx.rng.randint(0, min(10, ctx.config.max_objects))
    scene, _ = ctx.scene([q.spec()] * k, forbid=q.matches)
    return _dialogue(scene, count_qa(ctx, scene, q))


def _near_misses(ctx: TaskContext, q: Query) -> list[Spec]:
    """0-2 objects that share all but one of the query's attributes (hard negatives)."""
    attrs = [a for a in ("color", "shape", "size") if getattr(q, a) is not None]
    if len(attrs) < 2:
        return []
    specs = []
    for _ in range(ctx.rng.randint(0, 2)):
        drop = ctx.pick(attrs)
        keep = [a for a in attrs if a != drop]
        specs.append(Spec(**{a: getattr(q, a) for a in keep}, avoid=q.matches))
    return specs


def gen_exist(ctx: TaskContext):
    q = ctx.query(EXIST_QUERIES)
    k = ctx.rng.randint(1, 3) if ctx.rng.random() < 0.5 else 0
    scene, _ = ctx.scene([q.spec()] * k + _near_misses(ctx, q), forbid=q.matches)
    return _dialogue(scene, exist_qa(ctx, scene, q))


def _gen_attribute(ctx: TaskContext, attr: str):
    values = {"color": COLOR_NAMES, "shape": SHAPES, "size": SIZES}[attr]
    kind = ctx.kind(**{attr: ctx.pick(values)})  # the answer, uniform over its values
    specs, forbid = ctx.referent(kind, (attr,))
    scene, idx = ctx.scene(specs, forbid=forbid)
    return _dialogue(scene, _need(attribute_qa(ctx, scene, idx[0], attr)))


def gen_color(ctx: TaskContext):
    return _gen_attribute(ctx, "color")


def gen_shape(ctx: TaskContext):
    return _gen_attribute(ctx, "shape")


def gen_size(ctx: TaskContext):
    return _gen_attribute(ctx, "size")


def _two_referents(ctx: TaskContext, n_min: int = 2):
    """A scene with two uniquely describable objects a, b (random roles)."""
    s1, f1 = ctx.referent(ctx.kind())
    s2, f2 = ctx.referent(ctx.kind())
    if ctx.config.max_objects < max(n_min, len(s1) + len(s2)):
        raise Unsatisfiable("not enough objects allowed")
    lo = max(n_min, len(s1) + len(s2), ctx.config.min_objects)
    scene, idx = ctx.scene(s1 + s2, forbid=_either(f1, f2), n_objects=ctx.rng.randint(lo, ctx.config.max_objects))
    a, b = idx[0], idx[len(s1)]
    return (scene, a, b) if ctx.rng.random() < 0.5 else (scene, b, a)


def gen_spatial(ctx: TaskContext):
    want_yes = ctx.rng.random() < 0.5
    axis = ctx.pick(("x", "y"))
    scene, a, b = _two_referents(ctx)
    return _dialogue(scene, _need(spatial_qa(ctx, scene, a, b, axis, want_yes)))


def gen_nearest(ctx: TaskContext):
    scene, a, b = _two_referents(ctx, n_min=3)
    return _dialogue(scene, _need(nearest_qa(ctx, scene, a) or nearest_qa(ctx, scene, b)))


def gen_compare(ctx: TaskContext):
    attr = ctx.pick(("color", "shape"))
    v1, v2 = ctx.rng.sample({"color": COLOR_NAMES, "shape": SHAPES}[attr], 2)
    q1, q2 = Query(**{attr: v1}), Query(**{attr: v2})
    more = ctx.rng.random() < 0.5
    want_yes = ctx.rng.random() < 0.5
    top = min(5, ctx.config.max_objects - 1)
    if top < 1:
        raise Unsatisfiable("not enough objects allowed")
    hi = ctx.rng.randint(1, top)
    lo = ctx.rng.randint(0, min(hi - 1, ctx.config.max_objects - hi))
    n1, n2 = (hi, lo) if want_yes == more else (lo, hi)
    scene, _ = ctx.scene([q1.spec()] * n1 + [q2.spec()] * n2, forbid=_either(q1.matches, q2.matches))
    return _dialogue(scene, _need(compare_qa(ctx, scene, q1, q2, more)))


def _word_scene(ctx: TaskContext):
    text = ctx.pick(WORDS)  # the answer, uniform over the vocabulary
    n = ctx.rng.randint(1, max(1, ctx.config.max_words))
    scene, _ = ctx.scene(n_words=n, words=[text])
    return scene, [w.text for w in scene.words].index(text)


def gen_ocr_word(ctx: TaskContext):
    scene, w = _word_scene(ctx)
    return _dialogue(scene, ocr_word_qa(ctx, scene, w))


def gen_ocr_where(ctx: TaskContext):
    scene, w = _word_scene(ctx)
    return _dialogue(scene, ocr_where_qa(ctx, scene, w))


def gen_caption_short(ctx: TaskContext):
    scene, _ = ctx.scene()
    return _dialogue(scene, caption_qa(ctx, scene, detailed=False))


def gen_caption_detailed(ctx: TaskContext):
    scene, _ = ctx.scene()
    return _dialogue(scene, caption_qa(ctx, scene, detailed=True))


def _one_referent(ctx: TaskContext):
    specs, forbid = ctx.referent(ctx.kind())
    scene, idx = ctx.scene(specs, forbid=forbid)
    return scene, idx[0]


def gen_ground(ctx: TaskContext):
    scene, i = _one_referent(ctx)
    return _dialogue(scene, _need(ground_qa(ctx, scene, i)))


def gen_refer(ctx: TaskContext):
    scene, i = _one_referent(ctx)
    return _dialogue(scene, _need(refer_qa(ctx, scene, i)))


def gen_point(ctx: TaskContext):
    q = ctx.query(POINT_QUERIES)
    k = ctx.rng.randint(0, min(5, ctx.config.max_objects))
    scene, _ = ctx.scene([q.spec()] * k, forbid=q.matches)
    return _dialogue(scene, point_qa(ctx, scene, q))


def _pair(ctx: TaskContext, q: Query, counts: tuple[int, int]) -> list[Scene]:
    return [ctx.scene([q.spec()] * k, forbid=q.matches)[0] for k in counts]


def _two_images(scenes: list[Scene], q: str, a: str, ans: Answer) -> tuple[list[Scene], list[Turn]]:
    return scenes, [_user(q, 2), Turn("assistant", a, ans)]


def _which(n1: int, n2: int) -> str | None:
    return None if n1 == n2 else "first" if n1 > n2 else "second"


def gen_multi_image_more(ctx: TaskContext):
    q = ctx.query(MULTI_QUERIES)
    top = min(5, ctx.config.max_objects)
    hi = ctx.rng.randint(1, top)
    lo = ctx.rng.randint(0, hi - 1)
    scenes = _pair(ctx, q, (hi, lo) if ctx.rng.random() < 0.5 else (lo, hi))
    a = _which(q.count(scenes[0]), q.count(scenes[1]))
    if a is None:
        raise Unsatisfiable("tie")
    return _two_images(scenes, ctx.pick(TEMPLATES["multi_image_more"]).format(p=q.phrase()), a,
                       Answer("multi_image_more", "vqa", a))


def gen_multi_image_both(ctx: TaskContext):
    q = ctx.query(MULTI_QUERIES)
    has = (True, True) if ctx.rng.random() < 0.5 else ctx.pick(((True, False), (False, True), (False, False)))
    scenes = _pair(ctx, q, tuple(ctx.rng.randint(1, 2) if h else 0 for h in has))
    a = _yes_no(all(q.count(s) > 0 for s in scenes))
    return _two_images(scenes, ctx.pick(TEMPLATES["multi_image_both"]).format(s=article(q.phrase(1))), a,
                       Answer("multi_image_both", "vqa", a))


def gen_multi_image_which(ctx: TaskContext):
    q = ctx.query(MULTI_QUERIES)
    k = ctx.rng.randint(1, 2)
    scenes = _pair(ctx, q, (k, 0) if ctx.rng.random() < 0.5 else (0, k))
    a = _which(min(q.count(scenes[0]), 1), min(q.count(scenes[1]), 1))
    if a is None:
        raise Unsatisfiable("both or neither")
    return _two_images(scenes, ctx.pick(TEMPLATES["multi_image_which"]).format(s=article(q.phrase(1))), a,
                       Answer("multi_image_which", "vqa", a))


def gen_classify(ctx: TaskContext):
    k = ctx.pick(_classes_kinds(ctx.split))
    size = ctx.pick(SIZES)
    scene, _ = ctx.scene([Spec(k.color, k.shape, size)], n_objects=1)
    label = f"{k.color} {k.shape}"
    return _dialogue(scene, (ctx.pick(TEMPLATES["classify"]), label, Answer("classify", "vqa", label)))


# -- multi-turn: question functions asked about one random scene --

def _random_object(ctx: TaskContext, scene: Scene) -> int | None:
    return ctx.rng.randrange(len(scene.objects)) if scene.objects else None


def _query_about(ctx: TaskContext, scene: Scene, types: Sequence[tuple[str, ...]]) -> Query:
    """Half the time a query about an object in the scene (so the answer is not always 0 / no)."""
    i = _random_object(ctx, scene)
    if i is not None and ctx.rng.random() < 0.5:
        return of_kind(scene.objects[i], ctx.pick(types))
    return ctx.query(types)


def _ask_on_object(fn: Callable[[TaskContext, Scene, int], QA | None]) -> Callable[[TaskContext, Scene], QA | None]:
    def ask(ctx: TaskContext, scene: Scene) -> QA | None:
        i = _random_object(ctx, scene)
        return None if i is None else fn(ctx, scene, i)
    return ask


def _ask_spatial(ctx: TaskContext, scene: Scene) -> QA | None:
    if len(scene.objects) < 2:
        return None
    a, b = ctx.rng.sample(range(len(scene.objects)), 2)
    return spatial_qa(ctx, scene, a, b, ctx.pick(("x", "y")))


def _ask_compare(ctx: TaskContext, scene: Scene) -> QA | None:
    attr = ctx.pick(("color", "shape"))
    v1, v2 = ctx.rng.sample({"color": COLOR_NAMES, "shape": SHAPES}[attr], 2)
    return compare_qa(ctx, scene, Query(**{attr: v1}), Query(**{attr: v2}), ctx.rng.random() < 0.5)


def _ask_word(fn: Callable[[TaskContext, Scene, int], QA]) -> Callable[[TaskContext, Scene], QA | None]:
    def ask(ctx: TaskContext, scene: Scene) -> QA | None:
        return fn(ctx, scene, ctx.rng.randrange(len(scene.words))) if scene.words else None
    return ask


ASKERS: dict[str, Callable[[TaskContext, Scene], QA | None]] = {
    "count": lambda ctx, s: count_qa(ctx, s, _query_about(ctx, s, COUNT_QUERIES)),
    "exist": lambda ctx, s: exist_qa(ctx, s, _query_about(ctx, s, EXIST_QUERIES)),
    "color": _ask_on_object(lambda ctx, s, i: attribute_qa(ctx, s, i, "color")),
    "shape": _ask_on_object(lambda ctx, s, i: attribute_qa(ctx, s, i, "shape")),
    "size": _ask_on_object(lambda ctx, s, i: attribute_qa(ctx, s, i, "size")),
    "spatial": _ask_spatial,
    "nearest": _ask_on_object(nearest_qa),
    "compare": _ask_compare,
    "ocr_word": _ask_word(ocr_word_qa),
    "ocr_where": _ask_word(ocr_where_qa),
    "ground": _ask_on_object(ground_qa),
    "refer": _ask_on_object(refer_qa),
    "point": lambda ctx, s: point_qa(ctx, s, _query_about(ctx, s, POINT_QUERIES)),
    "caption_short": lambda ctx, s: caption_qa(ctx, s, detailed=False),
}


def gen_multi_turn(ctx: TaskContext):
    """2-4 questions of different tasks about one random scene."""
    scene, _ = ctx.scene()
    want = ctx.rng.randint(2, 4)
    names = list(ASKERS)
    ctx.rng.shuffle(names)
    qas = []
    for name in names:
        qa = ASKERS[name](ctx, scene)
        if qa is not None:
            qas.append(qa)
            if len(qas) == want:
                break
    if len(qas) < 2:
        raise Unsatisfiable("fewer than two questions fit this scene")
    return _dialogue(scene, *qas)


def generate_dialogue(weights: Mapping[str, float], turns: int, seed: int, split: str = "train",
                      config: SceneConfig | None = None) -> Sample:
    """`turns` questions about one scene (fewer where the scene answers fewer distinct ones), each
    of a task drawn from `weights` (over the tasks of ASKERS). LLaVA-1.5 packs the questions about
    one image into one conversation the same way: the image tokens and the prompt are read once
    for all of them, so a training step sees several answers for little more than one's cost.

    No two questions are the same, and no box or points answer locates what an earlier one did:
    "Where is the circle?" and "Locate the circle." about the one circle (or points at the same
    objects under other names) would let every answer after the first be copied from the
    conversation instead of found in the image."""
    bad = [t for t in weights if t not in ASKERS]
    if bad or not weights:
        raise InputError(f"dialogue tasks must be among {', '.join(ASKERS)}; got {', '.join(bad) or 'none'}")
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
        raise InputError(f"dialogue turns must be a positive integer, got {turns!r}")
    config = config or SceneConfig()
    gseed = split_seed(split, seed)
    names, w = list(weights), list(weights.values())
    for attempt in range(MAX_ATTEMPTS):
        ctx = TaskContext(random.Random(derive_seed(gseed, "dialogue", attempt)), config, split, gseed)
        scene, _ = ctx.scene()
        qas, asked, located = [], set(), set()
        for _ in range(4 * turns):
            qa = ASKERS[ctx.rng.choices(names, w)[0]](ctx, scene)
            place = (qa[2].kind, qa[2].image, tuple(qa[2].value)) if qa and qa[2].kind in ("box", "points") else None
            if qa is None or qa[0] in asked or place in located:
                continue
            asked.add(qa[0])
            if place is not None and place[2]:  # "There are none." may come twice
                located.add(place)
            qas.append(qa)
            if len(qas) == turns:
                break
        if qas:
            scenes, dialogue = _dialogue(scene, *qas)
            return Sample(id=f"{split}-{seed:09d}-dialogue", task="multi_turn", scenes=scenes, turns=dialogue)
    raise InputError(f"could not generate a dialogue for seed {seed} of split {split!r} in {MAX_ATTEMPTS} attempts")


# --- registry -----------------------------------------------------------------------------------

Generator = Callable[[TaskContext], tuple[list[Scene], list[Turn]]]

TASKS: dict[str, Generator] = {
    "caption_short": gen_caption_short,
    "caption_detailed": gen_caption_detailed,
    "count": gen_count,
    "exist": gen_exist,
    "color": gen_color,
    "shape": gen_shape,
    "size": gen_size,
    "spatial": gen_spatial,
    "nearest": gen_nearest,
    "compare": gen_compare,
    "ocr_word": gen_ocr_word,
    "ocr_where": gen_ocr_where,
    "ground": gen_ground,
    "refer": gen_refer,
    "point": gen_point,
    "multi_image_more": gen_multi_image_more,
    "multi_image_both": gen_multi_image_both,
    "multi_image_which": gen_multi_image_which,
    "multi_turn": gen_multi_turn,
    "classify": gen_classify,
}
FAMILIES: dict[str, tuple[str, ...]] = {
    "caption": ("caption_short", "caption_detailed"),
    "vqa": ("count", "exist", "color", "shape", "size", "spatial", "nearest", "compare", "ocr_word", "ocr_where"),
    "grounding": ("ground", "refer"),
    "pointing": ("point",),
    "multi_image": ("multi_image_more", "multi_image_both", "multi_image_which"),
    "multi_turn": ("multi_turn",),
    "classification": ("classify",),
}
FAMILY_OF: dict[str, str] = {t: f for f, ts in FAMILIES.items() for t in ts}
assert set(FAMILY_OF) == set(TASKS)


def generate_sample(task: str, seed: int, split: str = "train", config: SceneConfig | None = None) -> Sample:
    """Sample number `seed` of `split` for a task: the same (task, seed, split, config) gives the
    same sample in any process. Its scenes' global seed is `split_seed(split, seed)`."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    config = config or SceneConfig()
    gseed = split_seed(split, seed)
    for attempt in range(MAX_ATTEMPTS):
        ctx = TaskContext(random.Random(derive_seed(gseed, task, attempt)), config, split, gseed)
        try:
            scenes, turns = TASKS[task](ctx)
        except Unsatisfiable:
            continue
        return Sample(id=f"{split}-{seed:09d}-{task}", task=FAMILY_OF[task], scenes=scenes, turns=turns)
    raise InputError(
        f"could not generate a {task!r} sample for seed {seed} of split {split!r} in {MAX_ATTEMPTS} "
        f"attempts with a {config.width}x{config.height} canvas and min/max_objects="
        f"{config.min_objects}/{config.max_objects}: this task needs a larger canvas or more objects"
    )


# --- task mixes ---------------------------------------------------------------------------------

DEFAULT_MIX: dict[str, float] = {"caption": 0.15, "vqa": 0.45, "grounding": 0.15, "pointing": 0.1,
                                 "multi_image": 0.05, "multi_turn": 0.1}


class TaskMix:
    """Weights over tasks; a family name spreads its weight evenly over the family's tasks."""

    def __init__(self, weights: Mapping[str, float] | None = None):
        per_task: dict[str, float] = {}
        for name, w in (DEFAULT_MIX if weights is None else weights).items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise InputError(f"task weight of {name!r} must be a finite number >= 0, got {w!r}")
            members = FAMILIES.get(name) or ((name,) if name in TASKS else None)
            if members is None:
                raise InputError(f"unknown task or family {name!r}; tasks: {', '.join(TASKS)}; "
                                 f"families: {', '.join(FAMILIES)}")
            for t in members:
                per_task[t] = per_task.get(t, 0.0) + w / len(members)
        total = sum(per_task.values())
        if total <= 0:
            raise InputError("a task mix needs at least one task with a positive weight")
        self.weights: dict[str, float] = {t: w / total for t, w in per_task.items() if w > 0}
        self._names = list(self.weights)
        self._cum = list(np.cumsum([self.weights[t] for t in self._names]))

    @classmethod
    def parse(cls, text: str) -> "TaskMix":
        """From ``"vqa:3,caption,point:0.5"`` (weight 1 when omitted)."""
        weights: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            name, _, w = item.partition(":")
            try:
                weights[name.strip()] = weights.get(name.strip(), 0.0) + (float(w) if w else 1.0)
            except ValueError:
                raise InputError(f"bad task weight in {item!r}: expected name or name:number") from None
        if not weights:
            raise InputError(f"no tasks in {text!r}")
        return cls(weights)

    def pick(self, seed: int) -> str:
        """The task of the sample with this global seed (deterministic)."""
        u = random.Random(derive_seed(seed, "task")).random()
        return self._names[min(bisect_right(self._cum, u * self._cum[-1]), len(self._names) - 1)]

    def __repr__(self) -> str:
        return "TaskMix({" + ", ".join(f"{t!r}: {w:.3f}" for t, w in self.weights.items()) + "})"


# --- classification and image-text pairs --------------------------------------------------------

CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOR_NAMES for s in SHAPES)  # 48 zero-shot classes


@lru_cache(maxsize=None)
def _classes_kinds(split: str) -> tuple[Kind, ...]:
    """Colour-shape pairs (size "small" as a placeholder) a single-object scene of `split` can show:
    the 40 seen combinations, or in the compositional split only the 8 held-out ones."""
    combos = {(k.color, k.shape) for k in allowed_kinds(split)}
    if split == "compositional":
        combos = {c for c in combos if is_held_out(*c)}
    return tuple(Kind(c, s, "small") for c, s in ((k.color, k.shape) for k in ALL_KINDS if k.size == "small")
                 if (c, s) in combos)


def class_names(split: str = "train") -> list[str]:
    """The class labels that occur in a split's classification samples (a subset of CLASSES)."""
    return [f"{k.color} {k.shape}" for k in _classes_kinds(split)]


def classification_sample(seed: int, split: str = "train", config: SceneConfig | None = None) -> Sample:
    """A single-object scene; its label ("red circle") is `classification_label(sample)`."""
    return generate_sample("classify", seed, split, config)


def classification_label(sample: Sample) -> int:
    """Index into CLASSES of a classification sample's label."""
    return CLASSES.index(sample.turns[-1].answer.value)


def image_text_pair(seed: int, split: str = "train", config: SceneConfig | None = None):
    """An image and a caption that identifies it (the first detailed reference caption)."""
    from vlmlab.data.pairs import ImageTextPair

    s = generate_sample("caption_detailed", seed, split, config)
    return ImageTextPair(id=f"{split}-{seed:09d}", caption=s.turns[-1].answer.value[0], image=s.images[0])


# --- chance levels ------------------------------------------------------------------------------

def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (n, 4) against every box in b (m, 4): (n, m)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


# A question with its specifics blanked out: what a blind model can condition on.
_SPECIFICS = re.compile(r"\b(?:%s)s?\b|\(\d+,\d+\),\(\d+,\d+\)|\b[A-Z0-9]{2,}\b|<image>\n" % "|".join(
    COLOR_NAMES + SHAPES + SIZES))


def blind_question(question: str) -> str:
    """The question's wording without its colours, shapes, sizes, written words and boxes: every
    referring expression becomes one "_" (so "Is there an orange circle?" -> "Is there a _?")."""
    q = _SPECIFICS.sub("_", question)
    q = re.sub(r"_(?: _)+", "_", q)
    return re.sub(r"\ban (?=_)", "a ", q)


def chance_levels(n: int = 300, split: str = "val", config: SceneConfig | None = None,
                  tasks: Iterable[str] | None = None) -> dict[str, dict]:
    """What a blind model scores per task, over samples 0..n-1 of a split.

    chance: vqa / anls: accuracy of always giving the most frequent answer (majority class).
    points: the share of "none" answers (always saying "There are none."). box: the best hit rate
    (IoU >= 0.5) of any single constant box (tried: every target box, in image-relative
    coordinates). caption: None. question_chance (vqa / anls): the majority answer per question
    wording with colours, shapes, sizes, words and boxes blanked out (`blind_question`), i.e. a
    blind model that reads the question's form. multi_turn is left out (its turns are other tasks).
    Returns {task: {"kind", "chance", "question_chance", "majority", "n"}}.
    """
    names = list(tasks) if tasks is not None else [t for t in TASKS if t != "multi_turn"]
    out: dict[str, dict] = {}
    for task in names:
        answers: list[tuple[Answer, str, int, int]] = []
        for i in range(n):
            s = generate_sample(task, i, split, config)
            for user, bot in zip(s.turns[::2], s.turns[1::2]):
                sc = s.scenes[bot.answer.image]
                answers.append((bot.answer, blind_question(user.text), sc.width, sc.height))
        kind = answers[0][0].kind
        majority = question_chance = None
        if kind in ("vqa", "anls"):
            freq = Counter(a.value for a, _, _, _ in answers)
            majority, top = max(freq.items(), key=lambda kv: (kv[1], kv[0]))
            chance = top / len(answers)
            per_form: dict[str, Counter] = {}
            for a, form, _, _ in answers:
                per_form.setdefault(form, Counter())[a.value] += 1
            question_chance = sum(max(c.values()) for c in per_form.values()) / len(answers)
        elif kind == "points":
            chance = sum(1 for a, _, _, _ in answers if not a.value) / len(answers)
        elif kind == "box":
            boxes = np.array([[a.value[0] / w, a.value[1] / h, a.value[2] / w, a.value[3] / h]
                              for a, _, w, h in answers])
            chance = float((_iou(boxes, boxes) >= 0.5).mean(axis=1).max())
        else:
            chance = None
        out[task] = {"kind": kind, "chance": chance, "question_chance": question_chance, "majority": majority,
                     "n": len(answers)}
    return out


__all__ = [
    "CLASSES", "DEFAULT_MIX", "FAMILIES", "FAMILY_OF", "NO_POINTS", "QA", "Query", "REFERENCE_LEVELS", "TASKS",
    "TEMPLATES", "TaskContext", "TaskMix", "blind_question", "caption_refs", "chance_levels", "class_names", "classification_label",
    "classification_sample", "describe", "generate_sample", "image_text_pair", "point_on", "relation",
]
