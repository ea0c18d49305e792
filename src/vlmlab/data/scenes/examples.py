"""The examples of docs/scenes.md: one sample per task, its images, and its conversation.

    python -m vlmlab.data.scenes.examples docs/images     # writes scenes_<task>.png, prints markdown

Box and point answers also get an ``_answer.png`` with the answer drawn on the image (docs only).
tests/test_scenes.py checks that docs/scenes.md shows exactly these conversations.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from vlmlab.data.scenes.sample import Answer, Sample
from vlmlab.data.scenes.scene import SceneConfig
from vlmlab.data.scenes.tasks import generate_sample, point_on

DOC_CONFIG = SceneConfig(width=224, height=224, background="plain", p_words=0.0)
HARD_CONFIG = SceneConfig.preset("hard", p_words=1.0)

# (task, sample index in the val split, config): indices picked for readable examples.
EXAMPLES: list[tuple[str, int, SceneConfig]] = [
    ("caption_short", 2, DOC_CONFIG),
    ("caption_detailed", 2, DOC_CONFIG),
    ("count", 4, DOC_CONFIG),
    ("exist", 1, DOC_CONFIG),
    ("color", 1, DOC_CONFIG),
    ("shape", 2, DOC_CONFIG),
    ("size", 1, DOC_CONFIG),
    ("spatial", 1, DOC_CONFIG),
    ("nearest", 3, DOC_CONFIG),
    ("compare", 1, DOC_CONFIG),
    ("ocr_word", 5, HARD_CONFIG),
    ("ocr_where", 1, DOC_CONFIG),
    ("ground", 3, DOC_CONFIG),
    ("refer", 1, DOC_CONFIG),
    ("point", 6, DOC_CONFIG),
    ("multi_image_more", 1, DOC_CONFIG),
    ("multi_image_both", 2, DOC_CONFIG),
    ("multi_image_which", 1, DOC_CONFIG),
    ("multi_turn", 2, DOC_CONFIG),
    ("classify", 1, DOC_CONFIG),
]


def example_samples() -> list[Sample]:
    return [generate_sample(task, seed, "val", config) for task, seed, config in EXAMPLES]


def conversation_text(sample: Sample) -> str:
    """The conversation as it appears in the docs (one line per turn)."""
    return "\n".join(f"{'USER' if t.role == 'user' else 'ASSISTANT'}: {t.text}".replace("\n", "\\n")
                     for t in sample.turns)


def image_names(task: str, sample: Sample) -> list[str]:
    """File names of an example's images (without the `_answer` drawing)."""
    if sample.n_images == 1:
        return [f"scenes_{task}.png"]
    return [f"scenes_{task}_{k}.png" for k in range(sample.n_images)]


def write_examples(out_dir: str | Path) -> list[tuple[Sample, list[str]]]:
    """Write the example images; returns each sample with its image file names."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (task, _, _), sample in zip(EXAMPLES, example_samples()):
        names = image_names(task, sample)
        for image, name in zip(sample.images, names):
            image.save(out / name, optimize=True)
        answer = sample.turns[-1].answer
        if answer is not None and answer.kind in ("box", "points") and answer.value:
            names.append(f"scenes_{task}_answer.png")
            _draw_answer(sample, answer).save(out / names[-1], optimize=True)
        written.append((sample, names))
    return written


def _draw_answer(sample: Sample, answer: Answer) -> Image.Image:
    """The answer's box (magenta frame) or points (black dots) drawn on a copy of the image."""
    scene = sample.scenes[answer.image]
    image = sample.images[answer.image].copy()
    draw = ImageDraw.Draw(image)
    if answer.kind == "box":
        x0, y0, x1, y1 = answer.value
        draw.rectangle((x0 - 1, y0 - 1, x1, y1), outline=(255, 0, 255), width=2)
    else:
        for i in answer.value:
            x, y = point_on(scene, i)
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=(255, 255, 255), fill=(0, 0, 0), width=2)
    return image


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/images")
    for sample, names in write_examples(out):
        print(f"### {sample.id}\n")
        print(" ".join(f"![{n}](images/{n})" for n in names) + "\n")
        print("```text\n" + conversation_text(sample) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
