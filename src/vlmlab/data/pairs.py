"""Image-caption pairs (contrastive pre-training, retrieval) as JSONL: one ``{"image", "caption"}`` per line.

``image`` is a path relative to the JSONL file's folder (or absolute). Extra keys are kept in
`ImageTextPair.extra` and written back. Images are decoded lazily, on first `.image` access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from vlmlab.data.scenes.sample import load_image
from vlmlab.errors import DataError

PAIRS_FILE = "pairs.jsonl"


class ImageTextPair:
    """One image and its caption; the image is given directly or lives at `image_path`."""

    def __init__(self, id: str, caption: str, image: Image.Image | None = None, image_path: Path | None = None,
                 extra: dict[str, Any] | None = None):
        if image is None and image_path is None:
            raise ValueError("an ImageTextPair needs an image or an image_path")
        self.id, self.caption, self._image, self.image_path = id, caption, image, image_path
        self.extra = dict(extra or {})

    def __repr__(self) -> str:
        return f"ImageTextPair(id={self.id!r}, caption={self.caption!r}, image_path={self.image_path!r})"

    @property
    def image(self) -> Image.Image:
        """The RGB image (decoded from `image_path` on first access)."""
        if self._image is None:
            self._image = load_image(self.image_path, f"pair {self.id!r}")
        return self._image


def write_pairs(pairs: Iterable[ImageTextPair], out_dir: str | Path, image_dir: str = "images") -> Path:
    """Write ``out_dir/pairs.jsonl`` and one PNG per pair under ``out_dir/image_dir``; returns the JSONL path."""
    out = Path(out_dir)
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    path = out / PAIRS_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for pair in pairs:
            rel = f"{image_dir}/{pair.id}.png"
            pair.image.save(out / rel, format="PNG")
            f.write(json.dumps({"id": pair.id, "image": rel, "caption": pair.caption, **pair.extra},
                               ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def iter_pairs(path: str | Path, image_root: str | Path | None = None) -> Iterator[ImageTextPair]:
    """Pairs of a JSONL file, one by one; DataError naming the file and line for a bad line or a
    missing image file. Images are not decoded here (see `ImageTextPair.image`)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot open image-caption file: {e.strerror or e}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for key in ("image", "caption"):
                if not isinstance(rec.get(key), str):
                    raise DataError(f"{where}: missing or non-string field {key!r}")
            pid = str(rec.get("id", n))
            image_path = root / rec["image"]
            if not image_path.is_file():
                raise DataError(f"{where} (id {pid!r}): image file {image_path} does not exist")
            extra = {k: v for k, v in rec.items() if k not in ("id", "image", "caption")}
            yield ImageTextPair(pid, rec["caption"], image_path=image_path, extra=extra)


def read_pairs(path: str | Path, image_root: str | Path | None = None) -> list[ImageTextPair]:
    """All pairs of a JSONL file (see `iter_pairs`)."""
    return list(iter_pairs(path, image_root))
