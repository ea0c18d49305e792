"""Image splitting: a large image as a grid of tiles plus a downscaled global view (Idefics3, SmolVLM).

A vision tower trained at one tile size (say 512 x 512) reads a bigger image as several tiles:
`TiledImageProcessor` resizes the longest edge to `size["longest_edge"]`, then both edges up to
multiples of the tile size (`max_image_size["longest_edge"]`, aspect ratio kept as
transformers keeps it), cuts rows x cols tiles row by row and appends the whole image resized
to one tile (the global view). An image that fits in one tile, or any image with
`do_image_splitting` false, is only the global view (rows = cols = 0). Then rescale and
normalise. This reproduces transformers' `Idefics3ImageProcessorPil` bit for bit: every resize
is PIL's on uint8 pixels, with the same rounding of sizes; its preprocessor_config.json is read
and written here. How the tiles are written in the prompt is the family's business
(`models/idefics3.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from PIL import Image

from vlmlab.checkpoints.hf import read_json, write_json
from vlmlab.errors import ConfigError, ImageError
from vlmlab.vision.preprocess import (
    MAX_BYTES, MAX_PIXELS, PREPROCESSOR_CONFIG, SIGLIP_MEAN, SIGLIP_STD, ImageSource, _check_pixel_fields, _flag,
    _positive_int, open_images, to_pixel_values, to_rgb,
)

LANCZOS = int(Image.Resampling.LANCZOS)  # 1
MAX_IMAGE_SIZE = 4096  # transformers' cap on the resized image's longest edge
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 nests the image processor's fields here
HF_TYPE = "Idefics3ImageProcessor"


@dataclass
class TiledImages:
    pixel_values: torch.Tensor  # (tiles of all images, 3, tile, tile): each image's tiles, then its global view
    grids: list[tuple[int, int]]  # (rows, cols) of each image's tiles; (0, 0): the global view only


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest edge at `longest` (the other truncated, then rounded up to
    an even number, as transformers does), then capped at MAX_IMAGE_SIZE."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of `tile`: the long edge first, the short edge from
    the aspect ratio (truncated), then rounded up too."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def _longest_edge(value: Any, name: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or set(value) != {"longest_edge"}:
        raise ConfigError(f"field '{name}' must be {{'longest_edge': n}}, got {value!r}")
    return {"longest_edge": _positive_int(value["longest_edge"], f"field '{name}.longest_edge'")}


@dataclass
class TiledImageProcessor:
    """Idefics3 / SmolVLM preprocessing as data; call it on images. Field names and defaults are
    those of transformers' Idefics3ImageProcessor (`size` may also be {'height', 'width'}: resize
    to exactly that first)."""

    size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 4 * 364})
    max_image_size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 364})
    resample: int = LANCZOS
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = SIGLIP_MEAN
    image_std: tuple[float, float, float] = SIGLIP_STD
    do_convert_rgb: bool = True
    do_pad: bool = True  # transformers pads batches to equal tile counts; kept for its config only

    def __post_init__(self) -> None:
        if isinstance(self.size, Mapping) and set(self.size) == {"height", "width"}:
            self.size = {k: _positive_int(self.size[k], f"field 'size.{k}'") for k in ("height", "width")}
        else:
            self.size = _longest_edge(self.size, "size")
        self.max_image_size = _longest_edge(self.max_image_size, "max_image_size")
        for name in ("do_resize", "do_image_splitting", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            _flag(getattr(self, name), f"field '{name}'")
        _check_pixel_fields(self)

    @property
    def tile(self) -> int:
        return self.max_image_size["longest_edge"]

    @classmethod
    def for_tile(cls, tile: int) -> "TiledImageProcessor":
        """The defaults at a tile size (a model folder without a preprocessor config)."""
        return cls(size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile})

    # -- HF config ----------------------------------------------------------------------------

    HF_FIELDS = ("size", "max_image_size", "resample", "do_resize", "do_image_splitting", "do_rescale",
                 "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = PREPROCESSOR_CONFIG) -> "TiledImageProcessor":
        """From an Idefics3ImageProcessor config dict; missing (or null) fields take its defaults."""
        if not isinstance(hf, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        hf_type = hf.get("image_processor_type", HF_TYPE)
        if not isinstance(hf_type, str) or hf_type.removesuffix("Fast").removesuffix("Pil") != HF_TYPE:
            raise ConfigError(f"{source}: image_processor_type {hf_type!r} is not supported (expected {HF_TYPE})")
        try:
            return cls(**{k: hf[k] for k in cls.HF_FIELDS if hf.get(k) is not None})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        values = {k: getattr(self, k) for k in self.HF_FIELDS}
        values.update(image_mean=list(self.image_mean), image_std=list(self.image_std))
        return {"image_processor_type": HF_TYPE, **values}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "TiledImageProcessor | None":
        """The folder's image processor: processor_config.json's `image_processor` (transformers 5
        writes it there), else preprocessor_config.json (4.x); None when neither has one."""
        folder = Path(folder)
        nested = read_json(folder / PROCESSOR_CONFIG, PROCESSOR_CONFIG, optional=True)
        if isinstance(nested, Mapping) and nested.get("image_processor") is not None:
            return cls.from_hf(nested["image_processor"], source=f"{folder / PROCESSOR_CONFIG}: image_processor")
        path = folder / PREPROCESSOR_CONFIG
        return cls.from_hf(read_json(path, PREPROCESSOR_CONFIG), source=str(path)) if path.is_file() else None

    def to_folder(self, folder: str | os.PathLike) -> None:
        """Write preprocessor_config.json (read by transformers 4.x and 5)."""
        write_json(Path(folder) / PREPROCESSOR_CONFIG, self.to_hf())

    # -- processing ---------------------------------------------------------------------------

    def split(self, image: Image.Image) -> tuple[list[np.ndarray], int, int]:
        """One RGB image -> its uint8 (tile, tile, 3) tiles row by row, then the global view; and
        (rows, cols), (0, 0) when only the global view is made."""
        t = self.tile
        if self.do_resize:
            h, w = ((self.size["height"], self.size["width"]) if "height" in self.size
                    else longest_edge_size(image.height, image.width, self.size["longest_edge"]))
            image = image.resize((w, h), resample=self.resample)
        rows = cols = 0
        tiles = []
        if self.do_image_splitting:
            h, w = tile_multiple_size(image.height, image.width, t)
            image = image.resize((w, h), resample=self.resample)
            if h > t or w > t:
                rows, cols = h // t, w // t
                array = np.asarray(image)
                tiles = [array[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
        tiles.append(np.asarray(image.resize((t, t), resample=self.resample)))
        return tiles, rows, cols

    def __call__(self, images: ImageSource | Iterable[ImageSource], *, max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_BYTES) -> TiledImages:
        """Every image's tiles and global view as one (N, 3, tile, tile) float32 batch, with each
        image's grid. Images as `ImageProcessor` takes them (paths, bytes, files, PIL images)."""
        arrays, grids = [], []
        for image in open_images(images, max_pixels=max_pixels, max_bytes=max_bytes):
            if self.do_convert_rgb:
                image = to_rgb(image)
            elif image.mode != "RGB":
                raise ImageError(f"image has mode {image.mode!r}; with do_convert_rgb=false only RGB images "
                                 "can be used")
            tiles, rows, cols = self.split(image)
            arrays += tiles
            grids.append((rows, cols))
        return TiledImages(to_pixel_values(arrays, self), grids)

    def view(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of a width x height original the model sees: all of it (tiles and the
        global view cover the whole image)."""
        return 0.0, 0.0, float(width), float(height)
