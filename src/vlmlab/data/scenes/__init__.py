"""Synthetic diagnostic scenes: procedurally rendered images with exact ground truth, and every
VLM task (captions, VQA, OCR, grounding, pointing, multi-image, multi-turn, classification)
generated from them. Deterministic: the same seed and config give the same bytes anywhere.

See docs/scenes.md for the tasks, formats, splits and difficulty knobs.
"""

from vlmlab.data.scenes.sample import ANSWER_KINDS, IMAGE_TOKEN, Answer, Sample, Turn, load_image
from vlmlab.data.scenes.scene import (
    COLOR_NAMES, COLORS, HELD_OUT, MAX_ROTATION, PRESETS, SHAPES, SIZES, SPLITS, WORDS, Background, Kind, Scene,
    SceneConfig, SceneObject, SceneWord, allowed_kinds, derive_seed, is_held_out, split_of, split_seed,
)
from vlmlab.data.scenes.stream import SceneStream
from vlmlab.data.scenes.tasks import (
    CLASSES, DEFAULT_MIX, FAMILIES, FAMILY_OF, NO_POINTS, TASKS, TEMPLATES, Query, TaskContext, TaskMix,
    caption_refs, chance_levels, class_names, classification_label, classification_sample, describe,
    generate_sample, image_text_pair,
)

__all__ = [
    "ANSWER_KINDS", "CLASSES", "COLORS", "COLOR_NAMES", "DEFAULT_MIX", "FAMILIES", "FAMILY_OF", "HELD_OUT",
    "IMAGE_TOKEN", "MAX_ROTATION", "NO_POINTS", "PRESETS", "SHAPES", "SIZES", "SPLITS", "TASKS", "TEMPLATES",
    "WORDS", "Answer", "Background", "Kind", "Query", "Sample", "Scene", "SceneConfig", "SceneObject",
    "SceneStream", "SceneWord", "TaskContext", "TaskMix", "Turn", "allowed_kinds", "caption_refs",
    "chance_levels", "class_names", "classification_label", "classification_sample", "derive_seed", "describe",
    "generate_sample", "image_text_pair", "is_held_out", "load_image", "split_of", "split_seed",
]
