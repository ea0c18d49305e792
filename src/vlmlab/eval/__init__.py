"""Evaluation: the scoring functions of the benchmark (answers, captions, boxes, points, OCR, retrieval)."""

from vlmlab.eval.metrics import (
    anls,
    bleu,
    box_accuracy,
    box_iou,
    cider_d,
    levenshtein,
    normalize_answer,
    parse_box,
    parse_count,
    parse_points,
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

__all__ = [
    "anls", "bleu", "box_accuracy", "box_iou", "cider_d", "levenshtein", "normalize_answer",
    "parse_box", "parse_count", "parse_points", "parse_points_answer", "parse_yes_no",
    "point_accuracy", "point_correct", "retrieval_recall", "summarize", "tokenize_caption",
    "vqa_accuracy", "zero_shot_top1",
]
