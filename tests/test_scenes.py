"""Synthetic scenes: determinism, pixel-exact ground truth, answers re-derived independently,
balance, splits, the stream.

The answer checks here do not call the generators' helpers: `check_answer` parses each question
with its own regular expressions, resolves referring expressions against the scene graph by
itself, and recomputes the answer (boxes and points through the public coords parsers only).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmlab.data.coords import parse_box, parse_points
from vlmlab.data.llava_json import sample_record
from vlmlab.data.scenes import (
    CLASSES, COLORS, HELD_OUT, NO_POINTS, SHAPES, SIZES, SPLITS, TASKS, Scene, SceneConfig, SceneStream,
    TaskMix, chance_levels, class_names, classification_label, classification_sample, generate_sample,
    image_text_pair, split_of, split_seed,
)
from vlmlab.errors import ConfigError, InputError

SMALL = SceneConfig(width=160, height=128)  # non-square, small: fast
CONFIGS = {
    "easy": SceneConfig.preset("easy"),
    "medium": SceneConfig(),
    "hard": SceneConfig.preset("hard"),
    "wide": SceneConfig(width=448, height=224, p_words=0.6, color_jitter=12),
    "small": SMALL,
}

# --- an independent reading of questions ---------------------------------------------------------


def resolve(scene: Scene, phrase: str) -> list[int]:
    """Indices of the objects a noun phrase ("small red circles", "objects", "star") denotes."""
    want: dict[str, str] = {}
    for word in phrase.split():
        if word in SIZES:
            want["size"] = word
        elif word in COLORS:
            want["color"] = word
        elif word in SHAPES or (word.endswith("s") and word[:-1] in SHAPES):
            want["shape"] = word.rstrip("s") if word not in SHAPES else word
        elif word not in ("object", "objects"):
            raise AssertionError(f"unknown word {word!r} in {phrase!r}")
    return [i for i, o in enumerate(scene.objects) if all(getattr(o, a) == v for a, v in want.items())]


def attrs_of(phrase: str) -> set[str]:
    out = set()
    for word in phrase.split():
        out |= {"size"} if word in SIZES else {"color"} if word in COLORS else set()
        if word.rstrip("s") in SHAPES:
            out.add("shape")
    return out


def minimal_levels(exclude: str | None) -> list[set[str]]:
    full = [{"shape"}, {"color", "shape"}, {"size", "color", "shape"}]
    if exclude is None:
        return full
    if exclude == "shape":
        return [{"color"}, {"size", "color"}]
    return [lv - {exclude} | ({"size"} if exclude == "color" and len(lv) > 1 else set()) for lv in full[:2]]


def unique(scene: Scene, phrase: str, exclude: str | None = None) -> int:
    """The one object a referring expression denotes; it must be the minimal unique description."""
    hits = resolve(scene, phrase)
    assert len(hits) == 1, f"{phrase!r} denotes {len(hits)} objects"
    (i,) = hits
    o = scene.objects[i]
    if exclude:
        assert exclude not in attrs_of(phrase), f"{phrase!r} gives away the {exclude}"
    for level in minimal_levels(exclude):
        n = sum(all(getattr(p, a) == getattr(o, a) for a in level) for p in scene.objects)
        if n == 1:
            assert attrs_of(phrase) == level, f"{phrase!r} is not the minimal description (level {level})"
            break
    return i


def group(m: re.Match) -> str:
    return next(g for g in m.groups() if g is not None)


def close_box(text: str, box, scene: Scene) -> bool:
    got = parse_box(text, scene.width, scene.height)
    tol = (scene.width / 1000 * 0.51, scene.height / 1000 * 0.51)
    return got is not None and all(abs(g - b) <= tol[k % 2] for k, (g, b) in enumerate(zip(got, box)))


def centre(o) -> tuple[float, float]:
    return o.center


def check_points(scene: Scene, answer_text: str, targets: list[int], masks: np.ndarray) -> None:
    if not targets:
        assert answer_text == NO_POINTS
        return
    pts = parse_points(answer_text, scene.width, scene.height)
    assert pts is not None and len(pts) == len(targets)
    hit = []
    for x, y in pts:
        xi, yi = int(x), int(y)
        inside = [i for i in targets if masks[i, yi, xi]]
        assert len(inside) == 1, f"point {(x, y)} is not inside a target's visible mask"
        hit.append(inside[0])
    assert sorted(hit) == sorted(targets), "each target gets exactly one point"


REGION_ROWS = {"top": 0, "bottom": 2}
REGION_COLS = {"left": 0, "right": 2}


def region_ok(scene: Scene, phrase: str, x: float, y: float) -> bool:
    words = phrase.split()
    row = next((REGION_ROWS[w] for w in words if w in REGION_ROWS), 1)
    col = next((REGION_COLS[w] for w in words if w in REGION_COLS), 1)
    return min(2, int(3 * y / scene.height)) == row and min(2, int(3 * x / scene.width)) == col


NUMBERS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def check_caption(scene: Scene, refs: list[str], detailed: bool) -> None:
    kinds = collections.Counter((o.size, o.color, o.shape) for o in scene.objects)
    combos = collections.Counter((o.color, o.shape) for o in scene.objects)
    shape_alt = "|".join(SHAPES)
    for ref in refs:
        for w in scene.words:
            assert f'"{w.text}"' in ref
    if detailed:
        m = re.search(r"There (?:is|are) (\w+) objects?\.", refs[0])
        assert m and NUMBERS[m.group(1)] == len(scene.objects)
        found = collections.Counter()
        for size, color, shape, where in re.findall(
                rf"An? (small|large) (\w+) ({shape_alt}) is ((?:in|at|on) the [a-z ]+?)\.", refs[0]):
            found[(size, color, shape)] += 1
            assert any(region_ok(scene, where, *o.center) for o in scene.objects
                       if (o.size, o.color, o.shape) == (size, color, shape)), f"{where} is wrong"
        assert found == kinds
    else:
        found = collections.Counter()
        text = refs[0].split(" and the word")[0]
        for num, color, shape in re.findall(rf"\b(an?|\w+) (\w+) ({shape_alt})s?\b", text):
            found[(color, shape)] += 1 if num.lower() in ("a", "an") else NUMBERS[num.lower()]
        assert found == combos


Q = {
    "count": re.compile(r"^(?:How many (.+) are there\?|How many (.+) are in the image\?|Count the (.+)\.|What is the number of (.+)\?)$"),
    "exist": re.compile(r"^(?:Is there an? (.+?)(?: in the image)?\?|Are there any (.+)\?|Does the image contain an? (.+)\?)$"),
    "color": re.compile(r"^(?:What color is the (.+)\?|What is the color of the (.+)\?|Which color does the (.+) have\?)$"),
    "shape": re.compile(r"^(?:What shape is the (.+)\?|What is the shape of the (.+)\?|Which shape does the (.+) have\?)$"),
    "size": re.compile(r"^(?:What size is the (.+)\?|Is the (.+) small or large\?|Is the (.+) large or small\?)$"),
    "spatial_choice": re.compile(r"^Is the (.+) (to the left or to the right of|left or right of|above or below|higher or lower than) the (.+?)\?(?: Answer above or below\.)?$"),
    "spatial_yn": re.compile(r"^Is the (.+?) (?:located )?(to the left of|to the right of|above|below) the (.+)\?$"),
    "nearest": re.compile(r"^(?:Which object is closest to the (.+)\?|What is the nearest object to the (.+)\?|Which object is nearest to the (.+)\?)$"),
    "compare": re.compile(r"^(?:Are there|Does the image have) (more|fewer) (.+) than (.+)\?$"),
    "ocr_where": re.compile(r".*(?:word|text) ([A-Z0-9]+)\b"),
    "ground": re.compile(r"^(?:Where is the (.+)\?|Give the bounding box of the (.+)\.|Locate the (.+)\.|Find the (.+) and give its box\.)$"),
    "point": re.compile(r"^(?:Point to every (.+)\.|Point to all (.+)\.|Where are the (.+)\? Point to them\.)$"),
    "multi_image_more": re.compile(r"^(?:Which image has more (.+), the first or the second\?|Are there more (.+) in the first image or in the second\?)$"),
    "multi_image_both": re.compile(r"^(?:Is there an? (.+) in both images\?|Do both images contain an? (.+)\?)$"),
    "multi_image_which": re.compile(r"^(?:Which image contains an? (.+), the first or the second\?|In which image is there an? (.+), the first or the second\?)$"),
}


def check_answer(scenes: list[Scene], question: str, text: str, ans) -> None:
    """Recompute one answer from the scene graph and compare with the text and the Answer."""
    q = question.replace("<image>\n", "")
    scene = scenes[ans.image]
    task = ans.task

    def match(key: str) -> re.Match:
        m = Q[key].match(q)
        assert m, f"unparsed {task} question {q!r}"
        return m

    if task == "count":
        n = len(resolve(scene, group(match("count"))))
        assert text == ans.value == str(n)
    elif task == "exist":
        yes = bool(resolve(scene, group(match("exist"))))
        assert text == ans.value == ("yes" if yes else "no")
    elif task in ("color", "shape", "size"):
        i = unique(scene, group(match(task)), exclude=task)
        assert text == ans.value == getattr(scene.objects[i], task)
    elif task == "spatial":
        m = Q["spatial_choice"].match(q)
        if m:
            a, rel, b = m.groups()
            axis = 0 if "left" in rel else 1
        else:
            a, rel, b = match("spatial_yn").groups()
            axis = 0 if "left" in rel or "right" in rel else 1
        ia, ib = unique(scene, a), unique(scene, b)
        A, B = scene.objects[ia], scene.objects[ib]
        # clearly separated: the boxes do not overlap on that axis
        assert A.box[axis + 2] <= B.box[axis] or B.box[axis + 2] <= A.box[axis]
        before = centre(A)[axis] < centre(B)[axis]  # a is left of / above b
        if m:
            want = ("left" if before else "right") if axis == 0 else ("above" if before else "below")
        else:
            asked_before = rel in ("to the left of", "above")
            want = "yes" if asked_before == before else "no"
        assert text == ans.value == want
    elif task == "nearest":
        ia = unique(scene, group(match("nearest")))
        ax, ay = scene.objects[ia].center
        d = sorted((np.hypot(o.center[0] - ax, o.center[1] - ay), j) for j, o in enumerate(scene.objects) if j != ia)
        assert d[1][0] >= 1.3 * d[0][0], "nearest must win by a clear margin"
        assert unique(scene, text) == d[0][1] and text == ans.value
    elif task == "compare":
        more, p1, p2 = match("compare").groups()
        n1, n2 = len(resolve(scene, p1)), len(resolve(scene, p2))
        assert n1 != n2
        assert text == ans.value == ("yes" if (n1 > n2 if more == "more" else n1 < n2) else "no")
    elif task == "ocr_word":
        if len(scene.words) == 1:
            want = scene.words[0].text
        else:
            (want,) = [w.text for w in scene.words if close_box(q, w.box, scene)]
        assert text == ans.value == want and ans.kind == "anls"
    elif task == "ocr_where":
        word = match("ocr_where").group(1)
        (w,) = [w for w in scene.words if w.text == word]
        assert tuple(ans.value) == w.box and close_box(text, w.box, scene)
    elif task == "ground":
        i = unique(scene, group(match("ground")))
        assert tuple(ans.value) == scene.objects[i].box and close_box(text, scene.objects[i].box, scene)
    elif task == "refer":
        (i,) = [i for i, o in enumerate(scene.objects) if close_box(q, o.box, scene)]
        assert unique(scene, text) == i and text == ans.value
    elif task == "point":
        targets = resolve(scene, group(match("point")))
        assert sorted(ans.value) == targets
        check_points(scene, text, targets, scene.object_masks())
    elif task.startswith("multi_image"):
        phrase = group(match(task))
        n1, n2 = (len(resolve(s, phrase)) for s in scenes)
        if task == "multi_image_more":
            assert n1 != n2
            want = "first" if n1 > n2 else "second"
        elif task == "multi_image_both":
            want = "yes" if n1 and n2 else "no"
        else:
            assert bool(n1) != bool(n2)
            want = "first" if n1 else "second"
        assert text == ans.value == want
    elif task in ("caption_short", "caption_detailed"):
        assert text in ans.value and len(ans.value) >= 3
        check_caption(scene, ans.value, task == "caption_detailed")
    elif task == "classify":
        (o,) = scene.objects
        assert text == ans.value == f"{o.color} {o.shape}"
    else:
        raise AssertionError(f"no checker for task {task!r}")


def check_sample(sample) -> None:
    turns = sample.turns
    n_img = len(sample.scenes)
    assert turns[0].role == "user" and turns[0].text.count("<image>") == n_img
    assert all("<image>" not in t.text for t in turns[1:])
    assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    for user, bot in zip(turns[::2], turns[1::2]):
        assert bot.answer is not None
        check_answer(sample.scenes, user.text, bot.text, bot.answer)


def check_pixels(scene: Scene, config: SceneConfig) -> None:
    """Boxes and masks re-derived from the rendered pixels by colour masks."""
    img = np.asarray(scene.render())
    masks = scene.object_masks()
    assert masks.shape == (len(scene.objects), scene.height, scene.width)
    rgbs = collections.Counter(o.rgb for o in scene.objects)
    for i, o in enumerate(scene.objects):
        assert len(set(o.rgb)) > 1, "object colours are chromatic"
        assert o.rotation == 0 if o.shape == "circle" else abs(o.rotation) <= 15
        lo, hi = config.small_size if o.size == "small" else config.large_size
        assert lo * config.short_side - 0.1 <= o.size_px <= hi * config.short_side + 0.1
        colour = np.all(img == np.array(o.rgb, dtype=np.uint8), axis=2)
        if rgbs[o.rgb] == 1:
            assert np.array_equal(colour, masks[i]), "the visible mask is exactly the pixels of the object's colour"
            if config.max_overlap == 0:
                ys, xs = np.nonzero(colour)
                derived = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                assert max(abs(a - b) for a, b in zip(derived, o.box)) <= 1, (derived, o.box)
    # Everything that is not an object is achromatic (background, specks, word ink).
    rest = img[~masks.any(axis=0)]
    assert (rest[:, 0] == rest[:, 1]).all() and (rest[:, 1] == rest[:, 2]).all()
    if config.max_overlap == 0:
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
    for w in scene.words:
        x0, y0, x1, y1 = w.box
        ink = np.all(img[y0:y1, x0:x1] == w.ink, axis=2)
        assert ink[:, 0].any() and ink[:, -1].any() and ink[0].any() and ink[-1].any(), "word box is tight"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_answer_is_true(name):
    config = CONFIGS[name]
    n = 12 if name != "small" else 6
    checked = collections.Counter()
    for task in TASKS:
        for i in range(n):
            s = generate_sample(task, i, "val" if i % 2 else "train", config)
            check_sample(s)
            for scene in s.scenes:
                check_pixels(scene, config)
            checked.update(a.task for a in s.answers)
    # every fine-grained task was checked
    assert set(checked) >= set(TASKS) - {"multi_turn"}


def test_compositional_answers_and_pixels():
    for task in TASKS:
        for i in range(6):
            s = generate_sample(task, i, "compositional")
            check_sample(s)
            for scene in s.scenes:
                check_pixels(scene, SceneConfig())


def test_checker_catches_wrong_answers():
    """The checker is not vacuous: corrupted answers are rejected."""
    s = generate_sample("count", 3)
    user, bot = s.turns
    bad = str(int(bot.text) + 1)
    with pytest.raises(AssertionError):
        check_answer(s.scenes, user.text, bad, type(bot.answer)("count", "vqa", bad))
    s = generate_sample("ground", 4)
    user, bot = s.turns
    x0, y0, x1, y1 = bot.answer.value
    with pytest.raises(AssertionError):
        check_answer(s.scenes, user.text, bot.text, type(bot.answer)("ground", "box", (x0 + 1, y0, x1 + 1, y1)))
    s = next(generate_sample("point", i) for i in range(50) if generate_sample("point", i).answers[0].value)
    user, bot = s.turns
    with pytest.raises(AssertionError):  # a point moved off its target
        check_answer(s.scenes, user.text, bot.text.replace('x="', 'x="1').replace('x1="', 'x1="1'), bot.answer)


def test_overlap_is_bounded_and_nothing_fully_occluded():
    config = SceneConfig.preset("hard")
    total_overlap = 0
    for seed in range(40):
        scene = Scene.sample(seed, config)
        masks = scene.object_masks()
        full = []
        for o in scene.objects:  # each object drawn alone: its whole area
            alone = Scene(scene.width, scene.height, scene.background, [o])
            full.append(np.all(np.asarray(alone.render()) == np.array(o.rgb, np.uint8), axis=2))
        for i, o in enumerate(scene.objects):
            area = full[i].sum()
            assert masks[i].sum() >= config.min_visible * area > 0, "too occluded"
            x0, y0, x1, y1 = o.box
            ys, xs = np.nonzero(full[i])
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            for j in range(i + 1, len(scene.objects)):
                inter = (full[i] & full[j]).sum()
                total_overlap += inter
                assert inter <= config.max_overlap * min(area, full[j].sum())
                if inter:
                    assert o.color != scene.objects[j].color, "same-coloured objects would merge"
    assert total_overlap > 0, "the hard preset does produce overlapping objects"


def test_determinism_in_process_and_graph_round_trip():
    for seed in (0, 17, split_seed("test", 5)):
        a, b = Scene.sample(seed, CONFIGS["hard"]), Scene.sample(seed, CONFIGS["hard"])
        assert a == b and a.render().tobytes() == b.render().tobytes()
        c = Scene.from_dict(json.loads(json.dumps(a.to_dict())))
        assert c == a and c.render().tobytes() == a.render().tobytes()
        assert np.array_equal(c.object_masks(), a.object_masks())
    assert Scene.sample(1) != Scene.sample(2)


def _digest(specs) -> str:
    h = hashlib.sha256()
    for task, seed, split, preset in specs:
        s = generate_sample(task, seed, split, SceneConfig.preset(preset))
        for im in s.images:
            h.update(im.tobytes())
        h.update(json.dumps(sample_record(s, []), sort_keys=True).encode())
    return h.hexdigest()


DIGEST_SPECS = [(t, 7, "train", "medium") for t in TASKS] + [("count", 3, "compositional", "hard"),
                                                              ("caption_detailed", 9, "val", "hard"),
                                                              ("ocr_word", 1, "test", "easy")]


def test_same_bytes_in_another_process():
    here = _digest(DIGEST_SPECS)
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import test_scenes as t; "
            "print(t._digest([tuple(x) for x in json.loads(sys.argv[2])]))")
    for hash_seed in ("1", "987"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(DIGEST_SPECS)],
                             capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == here


def test_splits_and_held_out_combinations():
    assert split_seed("train", 0) == 0 and split_of(split_seed("val", 3)) == "val"
    starts = sorted(SPLITS.values())
    assert all(a[1] <= b[0] for a, b in zip(starts, starts[1:])), "split ranges are disjoint"
    with pytest.raises(InputError, match="outside split 'val'"):
        split_seed("val", 10**9)
    with pytest.raises(InputError, match="unknown split"):
        split_seed("dev", 0)
    assert len(HELD_OUT) == 8 and len(set(HELD_OUT)) == 8
    held = set(HELD_OUT)
    for task in ("count", "caption_short", "point", "multi_image_more", "classify", "multi_turn"):
        for i in range(25):
            for scene in generate_sample(task, i, "train").scenes:
                assert not any((o.color, o.shape) in held for o in scene.objects)
            for scene in generate_sample(task, i, "compositional").scenes:
                assert any((o.color, o.shape) in held for o in scene.objects)
    for seed in range(30):
        assert not any((o.color, o.shape) in held for o in Scene.sample(seed).objects)
        assert any((o.color, o.shape) in held for o in Scene.sample(split_seed("compositional", seed)).objects)


def test_answers_are_balanced():
    def answers(task, n, split="train"):
        return [a.value for i in range(n) for a in generate_sample(task, i, split, SMALL).answers]

    for task in ("exist", "compare", "multi_image_both"):
        vals = answers(task, 160)
        assert 0.38 <= vals.count("yes") / len(vals) <= 0.62, (task, collections.Counter(vals))
    spatial = answers("spatial", 200)
    yn = [v for v in spatial if v in ("yes", "no")]
    assert len(yn) > 50 and 0.35 <= yn.count("yes") / len(yn) <= 0.65
    counts = collections.Counter(answers("count", 330, "val"))
    assert set(counts) == {str(k) for k in range(11)}
    assert max(counts.values()) < 3 * min(counts.values())
    colors = collections.Counter(answers("color", 240))
    assert set(colors) == set(COLORS) and max(colors.values()) < 2.5 * min(colors.values())
    shapes = collections.Counter(answers("shape", 180))
    assert set(shapes) == set(SHAPES) and max(shapes.values()) < 2.5 * min(shapes.values())
    sizes = answers("size", 120)
    assert 0.35 <= sizes.count("small") / len(sizes) <= 0.65
    more = answers("multi_image_more", 120) + answers("multi_image_which", 120)
    assert 0.38 <= more.count("first") / len(more) <= 0.62
    points = answers("point", 120)
    assert 0.05 <= sum(not v for v in points) / len(points) <= 0.35, "some 'none' answers, not too many"


def test_chance_levels():
    levels = chance_levels(n=40, split="val", config=SMALL, tasks=["exist", "count", "ground", "point", "caption_short"])
    assert set(levels) == {"exist", "count", "ground", "point", "caption_short"}
    assert 0.5 <= levels["exist"]["chance"] <= 0.75 and levels["exist"]["majority"] in ("yes", "no")
    assert levels["count"]["chance"] <= 0.3
    assert levels["ground"]["kind"] == "box" and 0 < levels["ground"]["chance"] < 0.3
    assert 0 < levels["point"]["chance"] < 0.5
    assert levels["caption_short"]["chance"] is None and levels["count"]["n"] == 40


def test_classification_and_pairs():
    assert len(CLASSES) == 48 == len(set(CLASSES))
    assert len(class_names("train")) == 40
    assert sorted(class_names("compositional")) == sorted(f"{c} {s}" for c, s in HELD_OUT)
    labels = set()
    for i in range(40):
        s = classification_sample(i, "train", SMALL)
        (o,) = s.scenes[0].objects
        label = classification_label(s)
        assert CLASSES[label] == f"{o.color} {o.shape}" and CLASSES[label] in class_names("train")
        labels.add(label)
    assert len(labels) > 20
    caps = [image_text_pair(i, "val", SMALL).caption for i in range(40)]
    assert len(set(caps)) == len(caps), "captions identify their images"


def test_config_validation_and_impossible_requests():
    with pytest.raises(ConfigError, match=r"SceneConfig.large_size"):
        SceneConfig(small_size=(0.1, 0.15), large_size=(0.16, 0.2))
    with pytest.raises(ConfigError, match=r"SceneConfig.width = 8"):
        SceneConfig(width=8)
    with pytest.raises(ConfigError, match="unknown SceneConfig preset 'extreme'"):
        SceneConfig.preset("extreme")
    assert SceneConfig.from_dict(json.loads(json.dumps(CONFIGS["hard"].to_dict()))) == CONFIGS["hard"]
    with pytest.raises(InputError, match="unknown task 'counting'"):
        generate_sample("counting", 0)
    crowded = SceneConfig(width=48, height=48, min_objects=30, max_objects=30, small_size=(0.3, 0.3),
                          large_size=(0.4, 0.4))
    with pytest.raises(InputError, match="could not generate a 'count' sample .* larger canvas"):
        generate_sample("count", 0, config=crowded)


def test_task_mix():
    mix = TaskMix.parse("vqa:2,pointing,caption_short:1")
    assert abs(mix.weights["point"] - 0.25) < 1e-9 and abs(mix.weights["count"] - 0.05) < 1e-9
    picks = collections.Counter(mix.pick(split_seed("train", i)) for i in range(2000))
    assert 400 <= picks["point"] <= 600 and set(picks) <= set(mix.weights)
    assert mix.pick(123) == TaskMix.parse("vqa:2,pointing,caption_short:1").pick(123)
    with pytest.raises(InputError, match="unknown task or family 'vqaa'"):
        TaskMix.parse("vqaa")
    with pytest.raises(InputError, match="bad task weight"):
        TaskMix.parse("vqa:x")
    with pytest.raises(InputError, match="positive weight"):
        TaskMix({"vqa": 0})


def _ids_and_bytes(samples):
    return [(s.id, b"".join(im.tobytes() for im in s.images)) for s in samples]


def test_stream_is_deterministic_and_sharded():
    stream = SceneStream("val", config=SMALL, base_seed=100)
    it = iter(stream)
    first = [next(it) for _ in range(12)]
    assert _ids_and_bytes(first) == _ids_and_bytes([stream.sample(n) for n in range(12)])
    fresh = iter(SceneStream("val", config=SMALL, base_seed=100))
    assert _ids_and_bytes(first) == _ids_and_bytes([next(fresh) for _ in range(12)])
    assert len({s.task for s in first}) > 2, "the default mix mixes families"

    # distributed ranks: disjoint, and together the same samples
    r0 = iter(SceneStream("val", config=SMALL, base_seed=100, rank=0, world_size=2))
    r1 = iter(SceneStream("val", config=SMALL, base_seed=100, rank=1, world_size=2))
    ids0, ids1 = [next(r0).id for _ in range(6)], [next(r1).id for _ in range(6)]
    assert not set(ids0) & set(ids1) and set(ids0) | set(ids1) == {s.id for s in first}
    with pytest.raises(InputError, match="rank"):
        SceneStream(rank=2, world_size=2)

    # DataLoader with 2 workers: each sample once, same content as in-process
    loader = torch.utils.data.DataLoader(SceneStream("val", config=SMALL, base_seed=100), batch_size=3,
                                         num_workers=2, collate_fn=list)
    got = []
    for batch in loader:
        got.extend(batch)
        if len(got) >= 12:
            break
    assert sorted(_ids_and_bytes(got)) == sorted(_ids_and_bytes(first))


def test_docs_show_the_current_examples():
    """docs/scenes.md and docs/images hold exactly what the example generator produces now."""
    from PIL import Image

    from vlmlab.data.scenes.examples import EXAMPLES, conversation_text, example_samples, image_names

    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "scenes.md").read_text()
    for (task, _, _), sample in zip(EXAMPLES, example_samples()):
        check_sample(sample)
        assert f"```text\n{conversation_text(sample)}\n```" in text, f"docs/scenes.md shows an outdated {task} example"
        for name, image in zip(image_names(task, sample), sample.images):
            assert f"(images/{name})" in text
            with Image.open(docs / "images" / name) as f:
                assert f.convert("RGB").tobytes() == image.tobytes(), f"docs/images/{name} is outdated"


def test_dialogues_pack_true_answers_about_one_scene():
    """dialogue_turns = k: samples of question tasks become k distinct questions about one scene
    (every answer checked against the scene graph); other tasks stay single; deterministic."""
    from vlmlab.data.scenes.tasks import TaskMix, generate_dialogue

    stream = SceneStream("val", TaskMix({"color": 1, "count": 1, "ground": 1, "caption_detailed": 1}),
                         base_seed=7, dialogue_turns=5)
    samples = [stream.sample(n) for n in range(16)]
    dialogues = [s for s in samples if s.id.endswith("dialogue")]
    assert dialogues and len(dialogues) < 16  # caption_detailed samples stay single
    for s in samples:
        check_sample(s)
    for s in dialogues:
        users = [t.text for t in s.turns if t.role == "user"]
        assert len(s.scenes) == 1 and 1 <= len(users) <= 5 and len(set(users)) == len(users)
        assert users[0].startswith("<image>\n") and not any("<image>" in u for u in users[1:])
        assert {a.task for a in s.answers} <= {"color", "count", "ground"}
    assert sum(len(s.answers) for s in dialogues) > 3 * len(dialogues)
    again = SceneStream("val", TaskMix({"color": 1, "count": 1, "ground": 1, "caption_detailed": 1}),
                        base_seed=7, dialogue_turns=5)
    assert _ids_and_bytes(samples) == _ids_and_bytes([again.sample(n) for n in range(16)])
    assert [t.text for t in generate_dialogue({"shape": 1}, 3, 2).turns] == \
        [t.text for t in generate_dialogue({"shape": 1}, 3, 2).turns]
    # no box or points answer locates what an earlier one did (it could be copied, not found):
    # one object, asked about three times, is located once by a box and once by points
    lone = SceneConfig(min_objects=1, max_objects=1)
    for seed in range(20):
        answers = [a for a in generate_dialogue({"ground": 3, "point": 1}, 4, seed, config=lone).answers if a.value]
        assert [a.kind for a in answers].count("box") == 1 and [a.kind for a in answers].count("points") <= 1
    with pytest.raises(InputError, match="dialogue tasks"):
        generate_dialogue({"multi_image_more": 1}, 3, 0)
    with pytest.raises(InputError, match="dialogue_turns"):
        SceneStream("val", dialogue_turns=0)
