"""Scoring functions of the VLM benchmark: VQA answers, counts, captions, boxes, points, OCR, dual encoders.

Every scorer takes model text or parsed values and returns a float in [0, 1] (CIDEr-D is on its
usual 0-10 scale). Answer parsers never raise on model text: an answer they cannot read parses to
``None`` and is scored as wrong. Bad arguments from the caller (length mismatches, empty inputs)
raise `vlmlab.errors.InputError` naming the argument.

The reference implementations we match:
- `normalize_answer` / `vqa_accuracy`: the official VQA evaluation (``vqaEval.py``).
- `bleu` / `cider_d`: ``pycocoevalcap`` ``Bleu(4)`` and ``Cider()``, to 1e-9 on the same tokens.
- `anls`: the ST-VQA / DocVQA definition.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Hashable

import numpy as np

from vlmlab.data.coords import Point, parse_box, parse_points  # parse_box re-exported: one place for all parsers
from vlmlab.errors import InputError

__all__ = [
    "normalize_answer", "vqa_accuracy",
    "tokenize_caption", "bleu", "cider_d",
    "box_iou", "box_accuracy",
    "point_correct", "point_accuracy", "parse_points_answer",
    "zero_shot_top1", "retrieval_recall",
    "levenshtein", "anls",
    "parse_count", "parse_yes_no", "parse_box", "parse_points",
    "summarize",
]

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation and accuracy (official vqaEval.py)
# ---------------------------------------------------------------------------------------------

# A subset of the official map. As there, it maps apostrophe-less spellings to the apostrophe form
# (the official punctuation step keeps apostrophes), so "dont" and "don't" normalise alike.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't",
    "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's",
    "mightnt": "mightn't", "mustnt": "mustn't", "shes": "she's", "shouldnt": "shouldn't",
    "shouldve": "should've", "thats": "that's", "theres": "there's", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
    "wouldve": "would've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]
_WORD_TO_DIGIT = {w: str(i) for i, w in enumerate(_NUMBER_WORDS)}
# The official map stops at "ten" and also maps "none" to "0"; we keep "none" and extend to twenty.
_DIGIT_MAP = {**_WORD_TO_DIGIT, "none": "0"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official punctuation list (apostrophe, colon, '*', '#', '$', '%', '&' are not in it).
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # what the official (buggy) "(?!<=\d)(\.)(?!\d)" does
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _vqa_punctuation(text: str) -> str:
    out = text
    thousands = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # As the official code: a mark next to a space (or any "1,000" in the text) is deleted,
        # otherwise it separates words ("red/blue" -> "red blue").
        if (p + " " in text or " " + p in text) or thousands:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """VQA-normalised answer: punctuation, lowercase, number words -> digits, articles, contractions.

    Follows the official VQA evaluation step by step: newlines/tabs to spaces and strip; its
    punctuation rule (periods are dropped unless a digit follows, so "3.5" keeps its decimal point
    and "Two." loses its trailing period); lowercase; "none" and "zero".."twenty" -> digits (the
    official map stops at "ten"); drop a/an/the; apostrophe-less contractions -> apostrophe form;
    single spaces. Answer prefixes ("The answer is") are kept, as in VQA.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _vqa_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _DIGIT_MAP.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy of one prediction: exact normalised match for one answer, VQA v2 formula for a list.

    With a list of human answers, as the official code: for each answer left out, the prediction
    scores min(1, #matches among the others / 3); the result is the mean over the leave-one-out
    subsets (10 answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0). A one-element list is a
    single ground truth (the leave-one-out formula would always give 0 there). Unlike the official
    code, ground-truth answers get the full normalisation, since ours are not pre-normalised.
    """
    pred = normalize_answer(prediction)
    if isinstance(answers, str):
        return float(pred == normalize_answer(answers))
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        raise InputError("vqa_accuracy: `answers` is an empty list; expected at least one answer")
    if len(gts) == 1:
        return float(pred == gts[0])
    total_matches = sum(g == pred for g in gts)
    accs = [min(1.0, (total_matches - (g == pred)) / 3) for g in gts]
    return sum(accs) / len(accs)


# ---------------------------------------------------------------------------------------------
# Captions: BLEU and CIDEr-D as pycocoevalcap computes them
# ---------------------------------------------------------------------------------------------

_NON_WORD = re.compile(r"[^\w\s]")


def tokenize_caption(text: str) -> list[str]:
    """Caption tokens for BLEU/CIDEr: lowercase, every punctuation mark -> space, split on whitespace.

    A dependency-free stand-in for the PTB tokenizer of coco-caption ("man's" -> "man s",
    "red-and-blue" -> "red and blue"); applied to candidates and references alike.
    """
    return _NON_WORD.sub(" ", text.lower()).split()


def _ngram_counts(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _caption_corpus(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                    who: str) -> list[tuple[list[str], list[list[str]]]]:
    if not candidates:
        raise InputError(f"{who}: `candidates` is empty; expected at least one caption")
    if set(candidates) != set(references):
        missing = sorted(map(str, set(candidates) ^ set(references)))[:5]
        raise InputError(f"{who}: `candidates` and `references` must have the same ids; differ on {missing}")
    corpus = []
    for key in candidates:
        refs = references[key]
        if isinstance(refs, str) or len(refs) == 0:
            raise InputError(f"{who}: references[{key!r}] must be a non-empty list of strings")
        corpus.append((tokenize_caption(candidates[key]), [tokenize_caption(r) for r in refs]))
    return corpus


def bleu(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n exactly as pycocoevalcap's ``Bleu(n)`` (its BLEU-n value), for comparable numbers.

    Clipped n-gram counts summed over the corpus; per caption the reference length closest to the
    candidate's (ties -> the shorter); brevity penalty on the corpus lengths; pycocoevalcap's
    smoothing: each precision is (correct + 1e-15) / (guessed + 1e-9), length ratio likewise.
    """
    if n < 1:
        raise InputError(f"bleu: n must be >= 1, got {n}")
    tiny, small = 1e-15, 1e-9
    testlen = reflen = 0
    guess = [0] * n
    correct = [0] * n
    for cand, refs in _caption_corpus(candidates, references, "bleu"):
        max_ref: dict[tuple[str, ...], int] = {}
        for ref in refs:
            for gram, c in _ngram_counts(ref, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), c)
        length = len(cand)
        testlen += length
        reflen += min((abs(len(r) - length), len(r)) for r in refs)[1]
        for k in range(n):
            guess[k] += max(0, length - k)
        for gram, c in _ngram_counts(cand, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    score = 1.0
    for k in range(n):
        score *= float(correct[k] + tiny) / (guess[k] + small)
    score **= 1.0 / n
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D exactly as pycocoevalcap's ``Cider()``, for numbers comparable with papers.

    TF-IDF vectors of 1..4-grams with document frequencies from the references of this corpus;
    per n the clipped cosine similarity min(cand, ref) * ref / (|cand| |ref|), times a Gaussian
    length penalty (sigma 6); mean over n and over references, x10, mean over the corpus.
    The penalty's "length" is pycocoevalcap's bigram count (words - 1, 0 for an empty caption);
    it differs from the word-count difference only where the similarity is 0 anyway.
    """
    n, sigma = 4, 6.0
    corpus = _caption_corpus(candidates, references, "cider_d")
    cooked = [(_ngram_counts(c, n), [_ngram_counts(r, n) for r in refs]) for c, refs in corpus]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for _, refs in cooked:
        doc_freq.update({gram for ref in refs for gram in ref})
    log_docs = np.log(float(len(cooked)))

    def vectorize(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = float(tf) * (log_docs - np.log(max(1.0, doc_freq.get(gram, 0))))
            vec[k][gram] = w
            norm[k] += w ** 2
            if k == 1:
                length += tf
        return vec, [float(np.sqrt(x)) for x in norm], length

    scores = []
    for cand_counts, refs in cooked:
        vec, norm, length = vectorize(cand_counts)
        total = np.zeros(n)
        for ref_counts in refs:
            vec_r, norm_r, length_r = vectorize(ref_counts)
            penalty = np.e ** (-(float(length - length_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = 0.0
                for gram, w in vec[k].items():
                    w_r = vec_r[k].get(gram, 0.0)
                    val += min(w, w_r) * w_r
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(np.mean(total) / len(refs) * 10.0)
    return float(np.mean(np.array(scores)))


# ---------------------------------------------------------------------------------------------
# Boxes and points
# ---------------------------------------------------------------------------------------------

def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when they do not overlap or one is empty."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    area_a = (ax1 - ax0) * (ay1 - ay0)
    area_b = (bx1 - bx0) * (by1 - by0)
    if ax1 <= ax0 or ay1 <= ay0 or bx1 <= bx0 or by1 <= by0:
        return 0.0
    iw = min(ax1, bx1) - max(ax0, bx0)
    ih = min(ay1, by1) - max(ay0, by0)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (area_a + area_b - inter)


def box_accuracy(preds: Sequence[Sequence[float] | None], truths: Sequence[Sequence[float]],
                 threshold: float = 0.5) -> float:
    """Fraction of predicted boxes with IoU >= `threshold` against their truth; None (unparseable) is wrong."""
    if len(preds) != len(truths):
        raise InputError(f"box_accuracy: {len(preds)} predictions but {len(truths)} ground-truth boxes")
    if not preds:
        raise InputError("box_accuracy: no predictions to score")
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"box_accuracy: threshold must be in (0, 1], got {threshold}")
    hits = sum(p is not None and box_iou(p, t) >= threshold for p, t in zip(preds, truths))
    return hits / len(preds)


_POINT_TAG = re.compile(r"<\s*points?\b", re.I)
_NEGATIVE = re.compile(r"\b(?:none|no|nothing|not\s+any|zero)\b", re.I)


def parse_points_answer(text: str, width: int, height: int) -> list[Point] | None:
    """Points of a pointing answer in pixels; [] for a "none" answer without tags; None if unreadable.

    An answer with no point tags that says "none", "no", "nothing", "not any" or "zero" (as in
    the generator's "There are none.") is the empty answer; tags that do not parse make it None.
    """
    points = parse_points(text, width, height)
    if points is not None:
        return points
    if _POINT_TAG.search(text) is None and _NEGATIVE.search(text) is not None:
        return []
    return None


def _masks(target_masks: Any) -> np.ndarray:
    if hasattr(target_masks, "detach"):
        target_masks = target_masks.detach().cpu().numpy()
    masks = np.asarray(target_masks, dtype=bool)
    if masks.ndim != 3:
        raise InputError(f"point_correct: target_masks must have shape (n_targets, H, W), got {masks.shape}")
    return masks


def point_correct(points: Sequence[Sequence[float]] | None, target_masks: Any) -> bool:
    """Whether one pointing answer is right: one point inside each target's mask, no target twice.

    The number of points must equal the number of targets and a one-to-one assignment (bipartite
    matching) must put every point inside its own target's visible pixels; a point falls in pixel
    (floor(x), floor(y)), and points outside the image miss. With zero targets only [] is right.
    None (an unparseable answer) is always wrong.
    """
    masks = _masks(target_masks)
    if points is None:
        return False
    n_targets, height, width = masks.shape
    if len(points) != n_targets:
        return False
    # hits[i] = the targets whose mask contains point i
    hits: list[list[int]] = []
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            return False
        px, py = math.floor(x), math.floor(y)
        if not (0 <= px < width and 0 <= py < height):
            return False
        hits.append([t for t in range(n_targets) if masks[t, py, px]])
    owner = [-1] * n_targets  # owner[t] = the point assigned to target t (Kuhn's augmenting paths)

    def assign(i: int, seen: list[bool]) -> bool:
        for t in hits[i]:
            if not seen[t]:
                seen[t] = True
                if owner[t] < 0 or assign(owner[t], seen):
                    owner[t] = i
                    return True
        return False

    return all(assign(i, [False] * n_targets) for i in range(len(points)))


def point_accuracy(list_of_points: Sequence[Sequence[Sequence[float]] | None], list_of_masks: Sequence[Any]) -> float:
    """Fraction of pointing answers that `point_correct` accepts."""
    if len(list_of_points) != len(list_of_masks):
        raise InputError(f"point_accuracy: {len(list_of_points)} answers but {len(list_of_masks)} mask stacks")
    if not list_of_points:
        raise InputError("point_accuracy: no answers to score")
    return sum(point_correct(p, m) for p, m in zip(list_of_points, list_of_masks)) / len(list_of_points)


# ---------------------------------------------------------------------------------------------
# Dual encoders: zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------

def _as_array(x: Any, name: str, ndim: int, who: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly bf16 or on a GPU
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise InputError(f"{who}: `{name}` must have {ndim} dimensions, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise InputError(f"{who}: `{name}` contains NaN; expected comparable scores")
    return arr


def zero_shot_top1(scores: Any, labels: Sequence[int] | Any) -> float:
    """Top-1 accuracy of class scores [N, C] against labels [N]; a tie with the true class counts as wrong."""
    s = _as_array(scores, "scores", 2, "zero_shot_top1")
    y = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).astype(np.int64).reshape(-1)
    if s.shape[0] != y.shape[0] or s.shape[0] == 0:
        raise InputError(f"zero_shot_top1: scores has {s.shape[0]} rows but labels has {y.shape[0]} entries "
                         "(expected the same, non-zero)")
    if y.min() < 0 or y.max() >= s.shape[1]:
        raise InputError(f"zero_shot_top1: labels must be in [0, {s.shape[1]}), got {y.min()}..{y.max()}")
    true = s[np.arange(len(y)), y]
    rivals = s.copy()
    rivals[np.arange(len(y)), y] = -np.inf
    return float(np.mean(true > rivals.max(axis=1)))


def retrieval_recall(similarity: Any, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image Recall@K of a similarity matrix [N_images, N_texts].

    ``text_to_image[j]`` is the image that text j describes. Image->text: an image is a hit at K
    if any of its texts ranks within the top K of its row; images with no text are only
    distractors for text->image. Text->image: a text is a hit if its image ranks within the top K
    of its column. Ties are broken pessimistically: a wrong item scoring equal to the best right
    one ranks above it. K larger than the number of candidates gives 1.0.
    Keys: ``i2t_R@K`` and ``t2i_R@K`` (fractions in [0, 1]).
    """
    who = "retrieval_recall"
    sim = _as_array(similarity, "similarity", 2, who)
    n_img, n_txt = sim.shape
    owner = np.asarray(list(text_to_image), dtype=np.int64).reshape(-1)
    if owner.shape[0] != n_txt or n_txt == 0:
        raise InputError(f"{who}: text_to_image has {owner.shape[0]} entries but similarity has {n_txt} "
                         "text columns (expected the same, non-zero)")
    if owner.min() < 0 or owner.max() >= n_img:
        raise InputError(f"{who}: text_to_image must hold image indices in [0, {n_img}), "
                         f"got {owner.min()}..{owner.max()}")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise InputError(f"{who}: ks must be positive integers, got {list(ks)}")

    positive = np.zeros_like(sim, dtype=bool)
    positive[owner, np.arange(n_txt)] = True
    # i2t: rank of an image's best text = number of other texts scoring at least as high
    has_text = positive.any(axis=1)
    best = np.where(positive, sim, -np.inf).max(axis=1, keepdims=True)
    i2t_rank = (~positive & (sim >= best)).sum(axis=1)[has_text]
    # t2i: rank of a text's image = number of other images scoring at least as high
    true = sim[owner, np.arange(n_txt)]
    t2i_rank = (~positive & (sim >= true[None, :])).sum(axis=0)

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{int(k)}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"t2i_R@{int(k)}"] = float(np.mean(t2i_rank < k))
    return out


# ---------------------------------------------------------------------------------------------
# OCR: ANLS
# ---------------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one question (ST-VQA / DocVQA): max over answers of 1 - NLD if NLD < threshold, else 0.

    NLD is the Levenshtein distance over the longer string's length, on lowercased, stripped
    strings; two empty strings are identical. The benchmark's ANLS is the mean over questions.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise InputError("anls: `answers` is an empty list; expected at least one answer")
    pred = prediction.strip().lower()
    best = 0.0
    for ans in answers:
        gt = ans.strip().lower()
        longest = max(len(pred), len(gt))
        nld = levenshtein(pred, gt) / longest if longest else 0.0
        if nld < threshold:
            best = max(best, 1.0 - nld)
    return best


# ---------------------------------------------------------------------------------------------
# Answer parsers (never raise on model text)
# ---------------------------------------------------------------------------------------------

_COUNT = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?!\.?\d)|\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.I)
_NO_COUNT = re.compile(r"\b(?:none|no|nothing)\b", re.I)


def parse_count(text: str) -> int | None:
    """The first number in an answer, as digits or a word zero..twenty; 0 for "none"/"no"; else None.

    A decimal that is not a whole number ("2.5") makes the answer unreadable (None). Only when the
    answer mentions no number does "none", "no" or "nothing" read as 0 ("There are none.").
    """
    if not isinstance(text, str):
        return None
    m = _COUNT.search(text)
    if m is not None:
        digits, word = m.groups()
        if word is not None:
            return _NUMBER_WORDS.index(word.lower())
        if len(digits) > 30:  # not a count; also keeps int() far from its digit limit
            return None
        value = float(digits) if "." in digits else int(digits)
        if value != int(value):
            return None
        return int(value)
    if _NO_COUNT.search(text) is not None:
        return 0
    return None


_YES = r"yes|yeah|yep|yup|true|correct"
_NO = r"no|nope|not|false|incorrect|\w+n't"
_YES_NO = re.compile(rf"\b(?:({_YES})|({_NO}))\b", re.I)


def parse_yes_no(text: str) -> bool | None:
    """True/False from the first yes-word (yes, yeah, true, ...) or no-word (no, not, isn't, ...); else None."""
    if not isinstance(text, str):
        return None
    m = _YES_NO.search(text.replace("\u2019", "'"))
    if m is None:
        return None
    return m.group(1) is not None


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

def summarize(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean score per task plus ``overall``, the macro mean over tasks (each task weighs the same)."""
    if not scores:
        raise InputError("summarize: no tasks to summarize")
    if "overall" in scores:
        raise InputError("summarize: 'overall' is reserved for the macro mean; rename that task")
    out: dict[str, float] = {}
    for task, values in scores.items():
        if len(values) == 0:
            raise InputError(f"summarize: task {task!r} has no scores")
        out[task] = float(np.mean(np.asarray(values, dtype=np.float64)))
    out["overall"] = float(np.mean(list(out.values())))
    return out

