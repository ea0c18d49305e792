"""vlmlab.eval.metrics: BLEU/CIDEr-D against pycocoevalcap, hand-computed cases for the rest, parser fuzzing."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from vlmlab.errors import InputError
from vlmlab.eval import (
    anls,
    bleu,
    box_accuracy,
    box_iou,
    cider_d,
    levenshtein,
    normalize_answer,
    parse_box,
    parse_count,
    parse_points_answer,
    parse_yes_no,
    point_accuracy,
    point_correct,
    retrieval_recall,
    summarize,
    tokenize_caption,
    vqa_accuracy,
    zero_shot_top1,
)

# ---------------------------------------------------------------------------------------------
# Captions: parity with pycocoevalcap (its Bleu and Cider need no Java; only its PTB tokenizer does)
# ---------------------------------------------------------------------------------------------

CANDIDATES = {
    "rep": "a red red red circle circle",                      # repeated words: clipped counts
    "short": "circle",                                        # much shorter than the references
    "long": "a big red circle next to a small blue square on a white background with some grey "
            "noise and a green triangle near the top left corner of the image",
    "empty": ".",                                             # tokenises to nothing
    "one_ref": "two blue squares",
    "exact": "a green triangle above a red circle",
    "punct": "A man's red-and-blue KITE!",
    "miss": "completely unrelated words here",
    "mid": "the blue square is left of the circle",
    "five": "three small stars in a row",
    "tie": "a blue star shape",                               # 4 words: refs of 3 and 5 equally close
}
REFERENCES = {
    "rep": ["a red circle", "one red circle on the left", "a circle that is red"],
    "short": ["a small yellow circle in the middle", "a yellow circle"],
    "long": ["a red circle and a blue square", "red circle beside blue square",
             "a circle and a square", "two shapes"],
    "empty": ["a blue star", "one star"],
    "one_ref": ["two blue squares on grey"],
    "exact": ["a green triangle above a red circle", "a triangle over a circle"],
    "punct": ["a man s red and blue kite", "a kite", "the man's kite is red-and-blue"],
    "miss": ["a purple hexagon", "one hexagon in purple"],
    "mid": ["a blue square left of a circle", "the square is to the left of the circle",
            "blue square and a circle", "a square and a circle side by side", "square left circle"],
    "five": ["three stars", "three small stars in a row", "a row of three stars",
             "three tiny stars", "small stars in a line"],
    "tie": ["a big blue star shape", "a blue star"],          # closest-length tie -> the shorter (3)
}


def _coco_inputs(keys):
    cands = {k: [" ".join(tokenize_caption(CANDIDATES[k]))] for k in keys}
    refs = {k: [" ".join(tokenize_caption(r)) for r in REFERENCES[k]] for k in keys}
    return refs, cands


SUBSETS = [list(CANDIDATES), ["rep", "short", "long"], ["exact", "mid", "five", "empty"], ["short", "punct", "tie"]]


@pytest.mark.parametrize("keys", SUBSETS, ids=lambda k: "+".join(k))
def test_bleu_matches_pycocoevalcap(keys):
    from pycocoevalcap.bleu.bleu import Bleu

    gts, res = _coco_inputs(keys)
    ref_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cands = {k: CANDIDATES[k] for k in keys}
    refs = {k: REFERENCES[k] for k in keys}
    for n in range(1, 5):  # BLEU-n for n < 4 uses the same counts, so Bleu(4) lists it too
        assert bleu(cands, refs, n=n) == pytest.approx(ref_scores[n - 1], abs=1e-9, rel=0)
    assert 0.0 < ref_scores[3] < 1.0  # the corpus is neither trivial nor perfect


@pytest.mark.parametrize("keys", SUBSETS, ids=lambda k: "+".join(k))
def test_cider_d_matches_pycocoevalcap(keys):
    from pycocoevalcap.cider.cider import Cider

    gts, res = _coco_inputs(keys)
    ref_score, _ = Cider().compute_score(gts, res)
    got = cider_d({k: CANDIDATES[k] for k in keys}, {k: REFERENCES[k] for k in keys})
    assert got == pytest.approx(float(ref_score), abs=1e-9, rel=0)
    assert ref_score > 0.1


def test_caption_tokenizer_and_perfect_match():
    assert tokenize_caption("A man's red-and-blue KITE!") == ["a", "man", "s", "red", "and", "blue", "kite"]
    assert tokenize_caption("  ...  ") == []
    cands = {1: "a red circle on the left", 2: "two blue squares next to each other"}
    refs = {1: ["a red circle on the left"], 2: ["two blue squares next to each other"]}
    assert bleu(cands, refs) == pytest.approx(1.0, abs=1e-6)


def test_caption_metric_errors():
    with pytest.raises(InputError, match="same ids"):
        bleu({1: "a"}, {2: ["a"]})
    with pytest.raises(InputError, match=r"references\[1\] must be a non-empty list"):
        cider_d({1: "a"}, {1: []})
    with pytest.raises(InputError, match=r"references\[1\] must be a non-empty list"):
        bleu({1: "a"}, {1: "a"})
    with pytest.raises(InputError, match="candidates` is empty"):
        cider_d({}, {})


# ---------------------------------------------------------------------------------------------
# VQA normalisation and accuracy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),
    ("the red circle", "red circle"),
    ("Yes", "yes"),
    ("  An   Apple\n", "apple"),
    ("3.5", "3.5"),                  # decimal point kept
    ("twenty", "20"),
    ("None", "0"),                   # as the official digit map
    ("dont", "don't"),               # contractions map to the apostrophe form
    ("red/blue", "red blue"),        # a mark between words separates them
    ("yes!", "yes"),
    ("1,000", "1000"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_single_answer():
    assert vqa_accuracy("Two.", "2") == 1.0
    assert vqa_accuracy("the red circle", "red circle") == 1.0
    assert vqa_accuracy("Yes", "yes") == 1.0
    assert vqa_accuracy("no", "yes") == 0.0
    assert vqa_accuracy("2", ["two"]) == 1.0  # one-element list = single ground truth


@pytest.mark.parametrize("k, expected", [
    (0, 0.0),
    # 1 match in 10: the 9 subsets that keep it give 1/3, the one that drops it 0 -> 9*(1/3)/10
    (1, 0.3),
    # 2 matches: 8 subsets keep both (2/3), 2 keep one (1/3) -> (8*2/3 + 2*1/3)/10 = 6/10
    (2, 0.6),
    # 3 matches: 7 subsets keep all three (1), 3 keep two (2/3) -> (7 + 3*2/3)/10 = 9/10
    (3, 0.9),
    # 4 matches: every subset keeps at least three -> 1
    (4, 1.0),
])
def test_vqa_accuracy_v2_formula(k, expected):
    answers = ["Two"] * k + ["three"] * (10 - k)
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_empty_answers():
    with pytest.raises(InputError, match="`answers` is an empty list"):
        vqa_accuracy("2", [])


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------

def test_box_iou_hand_computed():
    # overlap 5x5 = 25; union 100 + 100 - 25 = 175
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    # contained 4x4 = 16 in 100
    assert box_iou((0, 0, 10, 10), (2, 2, 6, 6)) == pytest.approx(16 / 100)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 10), (0, 0, 10, 10)) == 0.0    # degenerate
    assert box_iou((5, 5, 0, 0), (0, 0, 10, 10)) == 0.0     # inverted corners


def test_box_accuracy_hand_computed():
    truths = [(0, 0, 10, 10)] * 4
    preds = [(0, 0, 10, 10),   # IoU 1
             (5, 5, 15, 15),   # IoU 25/175 = 0.14
             None,             # unparseable answer
             (0, 0, 10, 20)]   # IoU 100/200 = 0.5, counts at threshold 0.5
    assert box_accuracy(preds, truths) == 2 / 4
    assert box_accuracy(preds, truths, threshold=0.6) == 1 / 4
    # a parsed box from model text: (100,100),(300,500) on 200x100 -> (20, 10, 60, 50)
    assert box_accuracy([parse_box("It is at (100,100),(300,500).", 200, 100)], [(20, 10, 60, 50)]) == 1.0
    assert box_accuracy([parse_box("the circle", 200, 100)], [(20, 10, 60, 50)]) == 0.0


def test_box_accuracy_errors():
    with pytest.raises(InputError, match="2 predictions but 1 ground-truth boxes"):
        box_accuracy([None, None], [(0, 0, 1, 1)])
    with pytest.raises(InputError, match="no predictions"):
        box_accuracy([], [])


# ---------------------------------------------------------------------------------------------
# Points
# ---------------------------------------------------------------------------------------------

def _two_targets() -> np.ndarray:
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 0:3, 0:3] = True   # target 0: x 0-2, y 0-2
    masks[1, 6:9, 1:3] = True   # target 1: x 1-2, y 6-8 (masks are [target, y, x])
    return masks


def test_point_correct_cases():
    m = _two_targets()
    assert point_correct([(1.0, 1.0), (1.5, 7.9)], m)           # one point in each target
    assert point_correct([(1.5, 7.9), (1.0, 1.0)], m)           # order does not matter
    assert point_correct([(2.99, 2.99), (2.5, 8.5)], m)         # floor keeps 2.99 in pixel 2
    assert not point_correct([(1.0, 1.0), (7.9, 1.5)], m)       # x/y swapped -> outside target 1
    assert not point_correct([(1.0, 1.0), (5.0, 5.0)], m)       # one point outside
    assert not point_correct([(1.0, 1.0), (2.0, 2.0)], m)       # both in the same target
    assert not point_correct([(1.0, 1.0)], m)                   # too few
    assert not point_correct([(1.0, 1.0), (1.5, 7.9), (2.0, 2.0)], m)  # too many
    assert not point_correct(None, m)                           # unparseable
    assert not point_correct([(1.0, 1.0), (1.5, 10.0)], m)      # y = H is outside the image
    assert not point_correct([(-0.5, 1.0), (1.5, 7.9)], m)      # negative coordinate


def test_point_correct_needs_matching_not_greedy():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0:2] = True     # target 0 covers pixels (0,0) and (1,0)
    masks[1, 0, 0] = True       # target 1 covers only (0,0), overlapping target 0
    # greedy would give the first point to target 0 and strand the second; matching swaps them
    assert point_correct([(0.5, 0.5), (1.5, 0.5)], masks)
    assert not point_correct([(1.5, 0.5), (1.2, 0.2)], masks)   # both only fit target 0


def test_point_correct_zero_targets():
    none = np.zeros((0, 10, 10), dtype=bool)
    assert parse_points_answer("There are none.", 10, 10) == []
    assert point_correct(parse_points_answer("There are none.", 10, 10), none)
    stray = parse_points_answer('<point x="50.0" y="50.0" alt="star">star</point>', 10, 10)
    assert stray == [(5.0, 5.0)]
    assert not point_correct(stray, none)
    assert not point_correct(None, none)


def test_parse_points_answer():
    two = '<points x1="10.0" y1="20.0" x2="50.0" y2="80.0" alt="stars">stars</points>'
    assert parse_points_answer(two, 200, 100) == [(20.0, 20.0), (100.0, 80.0)]
    assert parse_points_answer("There are no red circles.", 10, 10) == []
    assert parse_points_answer("I see a cat", 10, 10) is None
    # malformed tag plus a negative word: unreadable, not "none"
    assert parse_points_answer('<point x="500.0" y="1.0">none</point>', 10, 10) is None


def test_point_accuracy_and_errors():
    m = _two_targets()
    answers = [[(1.0, 1.0), (1.5, 7.9)], None, [(1.0, 1.0)], [(1.5, 7.9), (0.5, 0.5)]]
    assert point_accuracy(answers, [m] * 4) == 2 / 4
    assert point_accuracy([[(1.0, 1.0), (1.5, 7.9)]], [torch.from_numpy(m)]) == 1.0
    with pytest.raises(InputError, match=r"shape \(n_targets, H, W\), got \(10, 10\)"):
        point_correct([(1.0, 1.0)], m[0])
    with pytest.raises(InputError, match="1 answers but 2 mask stacks"):
        point_accuracy([None], [m, m])


# ---------------------------------------------------------------------------------------------
# Dual encoders
# ---------------------------------------------------------------------------------------------

def test_zero_shot_top1_hand_computed():
    scores = [[0.1, 0.9, 0.0],   # label 1: right
              [0.5, 0.5, 0.0],   # label 0: tied with class 1 -> counted wrong
              [0.2, 0.3, 0.6],   # label 2: right
              [1.0, 0.0, 0.0]]   # label 1: wrong
    labels = [1, 0, 2, 1]
    assert zero_shot_top1(scores, labels) == 2 / 4
    assert zero_shot_top1(torch.tensor(scores, dtype=torch.bfloat16), torch.tensor(labels)) == 2 / 4
    with pytest.raises(InputError, match="scores has 4 rows but labels has 3"):
        zero_shot_top1(scores, labels[:3])
    with pytest.raises(InputError, match=r"labels must be in \[0, 3\)"):
        zero_shot_top1(scores, [1, 0, 3, 1])


# 3 images, 5 texts: texts 0,1 describe image 0; texts 2,3 image 1; text 4 image 2
SIM = [
    [0.9, 0.1, 0.9, 0.2, 0.0],
    [0.5, 0.6, 0.7, 0.3, 0.7],
    [0.1, 0.2, 0.3, 0.3, 0.4],
]
TEXT_TO_IMAGE = [0, 0, 1, 1, 2]


def test_retrieval_recall_hand_computed():
    # i2t, rank of the best own text = wrong texts scoring >= it:
    #   image 0: best own 0.9 (t0), t2 ties at 0.9 -> rank 1
    #   image 1: best own 0.7 (t2), t4 ties at 0.7 -> rank 1
    #   image 2: own 0.4 (t4), nothing >= 0.4     -> rank 0
    #   R@1 = 1/3, R@2 = 3/3
    # t2i, rank of the own image = other images scoring >= it in the text's column:
    #   t0 [0.9,0.5,0.1] own 0.9 -> 0;  t1 [0.1,0.6,0.2] own 0.1 -> 2;  t2 [0.9,0.7,0.3] own 0.7 -> 1
    #   t3 [0.2,0.3,0.3] own 0.3, image 2 ties -> 1;  t4 [0.0,0.7,0.4] own 0.4 -> 1
    #   R@1 = 1/5, R@2 = 4/5, R@10 (K > 3 images) = 1
    expected = {"i2t_R@1": 1 / 3, "i2t_R@2": 1.0, "i2t_R@10": 1.0,
                "t2i_R@1": 1 / 5, "t2i_R@2": 4 / 5, "t2i_R@10": 1.0}
    got = retrieval_recall(SIM, TEXT_TO_IMAGE, ks=(1, 2, 10))
    assert got == pytest.approx(expected, abs=1e-12)
    assert got.keys() == expected.keys()
    assert retrieval_recall(torch.tensor(SIM), TEXT_TO_IMAGE, ks=(1, 2, 10)) == pytest.approx(expected)


def test_retrieval_recall_image_without_text_is_only_a_distractor():
    sim = [[0.9, 0.1], [0.2, 0.8], [0.95, 0.0]]  # image 2 has no text, but outranks image 0 for text 0
    got = retrieval_recall(sim, [0, 1], ks=(1,))
    # i2t over images 0 and 1 only: both rank 0 -> 1.0; t2i: text 0 loses to image 2 -> 1/2
    assert got == {"i2t_R@1": 1.0, "t2i_R@1": 0.5}


def test_retrieval_recall_errors():
    with pytest.raises(InputError, match="text_to_image has 4 entries but similarity has 5"):
        retrieval_recall(SIM, [0, 0, 1, 1])
    with pytest.raises(InputError, match=r"image indices in \[0, 3\)"):
        retrieval_recall(SIM, [0, 0, 1, 1, 3])
    with pytest.raises(InputError, match="ks must be positive integers"):
        retrieval_recall(SIM, TEXT_TO_IMAGE, ks=(0,))
    with pytest.raises(InputError, match="must have 2 dimensions"):
        retrieval_recall([0.1, 0.2], [0, 0])
    with pytest.raises(InputError, match="contains NaN"):
        retrieval_recall([[float("nan")]], [0])


# ---------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------

def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3   # k->s, e->i, +g
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2


def test_anls_hand_computed():
    assert anls("hallo", "hello") == pytest.approx(0.8)              # 1 edit / 5 chars
    assert anls("  Hello ", ["HELLO"]) == 1.0                        # lowercased, stripped
    assert anls("kitten", ["xyz", "sitting"]) == pytest.approx(4 / 7)  # 3/7 < 0.5 -> 1 - 3/7
    assert anls("ab", "ax") == 0.0                                   # NLD 1/2 is not < 0.5
    assert anls("ab", "ax", threshold=0.6) == pytest.approx(0.5)
    assert anls("abc", "xyz") == 0.0
    assert anls("", "") == 1.0
    with pytest.raises(InputError, match="`answers` is an empty list"):
        anls("a", [])


# ---------------------------------------------------------------------------------------------
# Parsers and aggregation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("There are 12 stars.", 12), ("Two.", 2), ("I count seven circles and 2 squares", 7),
    ("twenty", 20), ("There are none.", 0), ("zero", 0), ("2.0", 2), ("2.5", None),
    ("blue", None), ("", None), ("x2", None), ("9" * 5000, None),
])
def test_parse_count(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", True), ("yes, there is a red circle.", True), ("No.", False), ("It isn't.", False),
    ("There is no red circle", False), ("True", True), ("nope", False), ("blue", None), ("", None),
    ("nothing", None), ("Nobody knows", None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_parsers_never_raise_on_random_text():
    rng = random.Random(0)
    alphabet = 'abnoyes0123456789 .,()<>="\'-xy\n\tpointsPOINT%日é\u2019'
    pieces = ["<point", "<points", ' x="', ' y1="', "100.0", "(1000,", "none", "yes", "no", "twenty", "</point>"]
    for _ in range(400):
        text = "".join(rng.choice(pieces) if rng.random() < 0.2 else rng.choice(alphabet)
                       for _ in range(rng.randint(0, 60)))
        assert parse_count(text) is None or isinstance(parse_count(text), int)
        assert parse_yes_no(text) in (True, False, None)
        pts = parse_points_answer(text, 64, 48)
        assert pts is None or all(0 <= x <= 64 and 0 <= y <= 48 for x, y in pts)
        assert parse_box(text, 64, 48) is None or len(parse_box(text, 64, 48)) == 4
        assert isinstance(normalize_answer(text), str)
        assert 0.0 <= vqa_accuracy(text, ["yes", "2", text]) <= 1.0
        assert 0.0 <= anls(text, ["yes"]) <= 1.0


def test_summarize():
    # vqa mean (1+0+1+0)/4 = 0.5, count mean 1.0, overall (0.5 + 1.0)/2 = 0.75 (macro, not 5/6)
    assert summarize({"vqa": [1, 0, 1, 0], "count": [1.0, 1.0]}) == {"vqa": 0.5, "count": 1.0, "overall": 0.75}
    with pytest.raises(InputError, match="task 'ocr' has no scores"):
        summarize({"ocr": []})
    with pytest.raises(InputError, match="'overall' is reserved"):
        summarize({"overall": [1.0]})


def test_public_names_are_exported():
    import vlmlab.eval as ev
    from vlmlab.eval import metrics

    assert set(ev.__all__) == set(metrics.__all__)
    assert all(callable(getattr(ev, name)) for name in ev.__all__)
    assert not math.isnan(cider_d({1: "a b"}, {1: ["a b"]}))
