"""A training / evaluation sample: one conversation over one or more images, with scored answers.

Images come either from scene graphs (rendered on first use) or from files (read back from a
dataset folder, decoded on first use). Either way `sample.images` is a list of RGB PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlmlab.data.scenes.scene import Scene
from vlmlab.errors import DataError

IMAGE_TOKEN = "<image>"  # placeholder for one image in a user turn (LLaVA convention)

# How each answer kind is scored (the evaluation code is the authority; this is the contract).
ANSWER_KINDS = {
    "vqa": "normalised exact match against a canonical string",
    "caption": "CIDEr / BLEU against a list of reference captions",
    "box": "IoU >= 0.5 against a pixel box (x0, y0, x1, y1)",
    "points": "every predicted point inside a target's visible mask, one per target (value: object indices)",
    "anls": "ANLS against the written word",
}


@dataclass
class Answer:
    """The ground truth of one assistant turn, for scoring."""

    task: str  # fine-grained task: count, exist, color, ..., ground, refer, point, multi_image_more, ...
    kind: str  # vqa | caption | box | points | anls
    value: Any  # vqa/anls: str; caption: list[str]; box: (x0, y0, x1, y1) pixels; points: list[int]
    image: int = 0  # which image of the sample a box / points refer to

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if self.kind in ("box", "points", "caption") else self.value
        return {"task": self.task, "kind": self.kind, "value": value, "image": self.image}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Answer":
        kind = d["kind"]
        if kind not in ANSWER_KINDS:
            raise ValueError(f"unknown answer kind {kind!r}")
        value = d["value"]
        if kind == "box":
            value = tuple(value)
        elif kind in ("points", "caption"):
            value = list(value)
        return cls(task=str(d["task"]), kind=kind, value=value, image=int(d.get("image", 0)))


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str  # the first user turn holds one IMAGE_TOKEN per image
    answer: Answer | None = None  # set on assistant turns of generated samples


@dataclass
class Sample:
    """One conversation. `scenes` has one graph per image for generated samples; samples read from
    plain LLaVA JSON have no scenes and their images come from `image_paths`."""

    id: str
    task: str  # family: caption, vqa, grounding, pointing, multi_image, multi_turn, classification, llava
    scenes: list[Scene]
    turns: list[Turn]
    image_paths: list[Path] | None = None  # images stored as files (take precedence over scenes)
    source: str | None = field(default=None, compare=False)  # where it was read from, for error messages
    _images: list[Image.Image] | None = field(default=None, repr=False, compare=False)

    @property
    def n_images(self) -> int:
        return len(self.image_paths) if self.image_paths is not None else len(self.scenes)

    @property
    def images(self) -> list[Image.Image]:
        """RGB images, one per `<image>`: loaded from `image_paths` or rendered from `scenes` (cached)."""
        if self._images is None:
            if self.image_paths is not None:
                where = self.source or f"sample {self.id!r}"
                self._images = [load_image(p, where) for p in self.image_paths]
            else:
                self._images = [s.render() for s in self.scenes]
        return self._images

    @property
    def answers(self) -> list[Answer]:
        return [t.answer for t in self.turns if t.answer is not None]

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages ({"role", "content"}), image placeholders included."""
        return [{"role": t.role, "content": t.text} for t in self.turns]


def load_image(path: str | Path, where: str) -> Image.Image:
    """Open and fully decode an image file as RGB; DataError naming the file and `where` otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except FileNotFoundError:
        raise DataError(f"{where}: image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: image file {path} does not decode: {e}") from None
