"""Image decoding with size limits, and the CLIP / SigLIP preprocessing of transformers' PIL processors.

`load_image` behaves like `transformers.image_utils.load_image` (EXIF orientation applied, then
`convert("RGB")`), but refuses oversized files and decompression bombs before any pixel is decoded
and turns every decoding failure into an `ImageError` naming the file. `ImageProcessor` reproduces
`CLIPImageProcessorPil` / `SiglipImageProcessorPil` bit for bit: resize the uint8 image with PIL,
center-crop (zero-padding when too small), rescale in float64, cast to float32, normalise.
"""

from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmlab.checkpoints.hf import read_json, write_json
from vlmlab.errors import ConfigError, ImageError, InputError

MAX_PIXELS = 64_000_000  # 64 megapixels (8000 x 8000)
MAX_BYTES = 50 * 1024 * 1024  # 50 MiB of encoded image data

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

BICUBIC = int(Image.Resampling.BICUBIC)  # 3, what the PIL enum and HF configs call it
# PIL's filters by number (0 nearest ... 5 hamming; newer Pillows add more). transformers passes the
# number straight to PIL's resize, so every filter PIL has is accepted.
RESAMPLE_NAMES = {int(r): r.name.lower() for r in sorted(Image.Resampling)}

PREPROCESSOR_CONFIG = "preprocessor_config.json"

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

# HF type names (the "Fast"/"Pil" backend suffixes stripped) -> our family name.
HF_TYPES = {
    "CLIPImageProcessor": "clip",
    "CLIPFeatureExtractor": "clip",
    "SiglipImageProcessor": "siglip",
}
HF_TYPE_OF = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}


# ---------------------------------------------------------------------------------------------
# Decoding


def _read_source(source: ImageSource, max_bytes: int) -> tuple[str, bytes]:
    """The encoded bytes of a path / bytes / file object and the name errors should use."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, data = "image bytes", bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise ImageError(f"{name}: no such image file")
        if not path.is_file():
            raise ImageError(f"{name}: not a file")
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise ImageError(f"{name}: file is {size:,} bytes, more than the limit of {max_bytes:,} (max_bytes)")
            with open(path, "rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"{name}: cannot read image file ({e.strerror or e})") from None
    elif hasattr(source, "read"):
        raw_name = getattr(source, "name", None)
        name = str(raw_name) if isinstance(raw_name, (str, os.PathLike)) else "image stream"
        try:
            data = source.read(max_bytes + 1)
        except OSError as e:
            raise ImageError(f"{name}: cannot read image stream ({e})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise InputError(f"{name}: image stream must be opened in binary mode, read() gave {type(data).__name__}")
        data = bytes(data)
    else:
        raise InputError(
            f"an image must be a path, bytes, a binary file object or a PIL image, got {type(source).__name__}"
        )
    if len(data) > max_bytes:
        raise ImageError(f"{name}: more than the limit of {max_bytes:,} bytes (max_bytes)")
    if not data:
        raise ImageError(f"{name}: empty (0 bytes), not an image")
    return name, data


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: too many pixels: {width}x{height} = {width * height:,}, "
            f"more than the limit of {max_pixels:,} (max_pixels), refused before decoding"
        )
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")


def load_image(
    source: ImageSource, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> Image.Image:
    """Decode an image to RGB as `transformers.image_utils.load_image` does, refusing bombs first.

    EXIF orientation is applied, then PIL's `convert("RGB")`: alpha is dropped (not composited),
    16-bit / 32-bit / float greyscale is clipped to 0..255, CMYK uses PIL's plain formula. A palette
    image's transparent colour stays in `image.info["transparency"]`, which `ImageProcessor` then
    whitens exactly as the transformers processors do.
    """
    if isinstance(source, Image.Image):
        _check_pixels("image", source.width, source.height, max_pixels)
        with decoding_errors("image", max_pixels):  # a lazily opened PIL image decodes here
            return ImageOps.exif_transpose(source).convert("RGB")
    name, data = _read_source(source, max_bytes)
    with decoding_errors(name, max_pixels):
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(name, im.width, im.height, max_pixels)  # header only: nothing decoded yet
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")


@contextmanager
def decoding_errors(name: str, max_pixels: int = MAX_PIXELS) -> Iterator[None]:
    """Turn whatever Pillow raises while decoding into an ImageError naming `name`."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{name}: too many pixels, refused as a possible decompression bomb before decoding "
            f"(limit max_pixels={max_pixels:,}; Pillow: {e})"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (no image format recognised)") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode the image") from None
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageError(f"{name}: truncated or corrupt image data ({type(e).__name__}: {e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' processors convert a PIL image: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # (convert would copy an RGB image)


# ---------------------------------------------------------------------------------------------
# Config


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where} must be a positive integer, got {value!r}")
    return value


def _size_dict(value: Any, name: str, *, int_means: str) -> dict[str, int]:
    """HF's size forms (int, [h, w], or a dict) as {'shortest_edge': n} or {'height': h, 'width': w}."""
    where = f"field '{name}'"
    if isinstance(value, int) and not isinstance(value, bool):
        n = _positive_int(value, where)
        return {"shortest_edge": n} if int_means == "shortest_edge" else {"height": n, "width": n}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {
            "height": _positive_int(value[0], f"field '{name}[0]'"),
            "width": _positive_int(value[1], f"field '{name}[1]'"),
        }
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"shortest_edge"} and int_means == "shortest_edge":
            return {"shortest_edge": _positive_int(value["shortest_edge"], f"field '{name}.shortest_edge'")}
        if keys == {"height", "width"}:
            return {
                "height": _positive_int(value["height"], f"field '{name}.height'"),
                "width": _positive_int(value["width"], f"field '{name}.width'"),
            }
        allowed = "{'shortest_edge'} or {'height', 'width'}" if int_means == "shortest_edge" else "{'height', 'width'}"
        raise ConfigError(f"{where} must have the keys {allowed}, got {sorted(keys)}")
    raise ConfigError(f"{where} must be an integer, [height, width] or a dict, got {value!r}")


def _triple(value: Any, where: str, *, positive: bool) -> tuple[float, float, float]:
    items = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or len(items) != 3:
        raise ConfigError(f"{where} must be a number or a list of 3 numbers (R, G, B), got {value!r}")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            kind = "positive finite numbers" if positive else "finite numbers"
            raise ConfigError(f"{where} must hold {kind}, got {value!r}")
        out.append(float(v))
    return tuple(out)  # type: ignore[return-value]


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


def _check_pixel_fields(processor: Any) -> None:
    """Validate and normalise the `resample`, `rescale_factor`, `image_mean` and `image_std`
    fields every processor here has."""
    if isinstance(processor.resample, bool) or processor.resample not in RESAMPLE_NAMES:
        raise ConfigError(
            f"field 'resample' must be a PIL filter number {sorted(RESAMPLE_NAMES)} "
            f"({', '.join(f'{k}={v}' for k, v in RESAMPLE_NAMES.items())}), got {processor.resample!r}"
        )
    processor.resample = int(processor.resample)
    r = processor.rescale_factor
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise ConfigError(f"field 'rescale_factor' must be a positive number, got {r!r}")
    processor.rescale_factor = float(r)
    processor.image_mean = _triple(processor.image_mean, "field 'image_mean'", positive=False)
    processor.image_std = _triple(processor.image_std, "field 'image_std'", positive=True)


@dataclass
class ImageProcessor:
    """Preprocessing of one CLIP- or SigLIP-style checkpoint, as data; call it on images.

    `size` is {'shortest_edge': n} (resize the short side to n, the long side by truncation, as
    transformers does) or {'height': h, 'width': w} (resize to exactly that). `family` only decides
    which `image_processor_type` `to_hf` writes and which defaults `from_hf` fills in.
    """

    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    family: str = "clip"

    def __post_init__(self) -> None:
        if self.family not in HF_TYPE_OF:
            raise ConfigError(f"image processor family must be one of {sorted(HF_TYPE_OF)}, got {self.family!r}")
        self.size = _size_dict(self.size, "size", int_means="shortest_edge")
        self.crop_size = _size_dict(self.crop_size, "crop_size", int_means="square")
        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            _flag(getattr(self, name), f"field '{name}'")
        _check_pixel_fields(self)

    # -- named presets ------------------------------------------------------------------------

    @classmethod
    def clip(cls, image_size: int = 224) -> "ImageProcessor":
        """OpenAI CLIP (and LLaVA): short side to `image_size`, center crop to a square."""
        return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})

    @classmethod
    def siglip(cls, image_size: int = 224) -> "ImageProcessor":
        """SigLIP: squash to `image_size` x `image_size`, no crop, mean = std = 0.5."""
        return cls(
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_mean=SIGLIP_MEAN,
            image_std=SIGLIP_STD,
            family="siglip",
        )

    # -- HF preprocessor_config.json ----------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = PREPROCESSOR_CONFIG) -> "ImageProcessor":
        """From a CLIPImageProcessor / SiglipImageProcessor preprocessor_config.json dict.

        Missing fields take that class's defaults; old forms (`size: 224`, `crop_size: 224`,
        `CLIPFeatureExtractor`) are read the way transformers reads them. Unknown keys are ignored.
        """
        if not isinstance(hf, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        hf_type = hf.get("image_processor_type") or hf.get("feature_extractor_type") or "CLIPImageProcessor"
        if not isinstance(hf_type, str):
            raise ConfigError(f"{source}: field 'image_processor_type' must be a string, got {hf_type!r}")
        base = hf_type.removesuffix("Fast").removesuffix("Pil")
        if base not in HF_TYPES:
            raise ConfigError(
                f"{source}: image_processor_type {hf_type!r} is not supported "
                f"(supported: {', '.join(sorted(HF_TYPES))})"
            )
        family = HF_TYPES[base]
        default = cls.clip() if family == "clip" else cls.siglip()
        kwargs: dict[str, Any] = {"family": family}
        for name in (
            "size", "resample", "do_resize", "do_center_crop", "crop_size", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
        ):
            value = hf.get(name)
            kwargs[name] = getattr(default, name) if value is None else value  # null means "class default"
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The preprocessor_config.json dict transformers reads back as this processor."""
        return {
            "image_processor_type": HF_TYPE_OF[self.family],
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": dict(self.crop_size),
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageProcessor":
        """Read `folder/preprocessor_config.json`; a missing file or bad field is a ConfigError naming it."""
        path = Path(folder) / PREPROCESSOR_CONFIG
        return cls.from_hf(read_json(path, PREPROCESSOR_CONFIG), source=str(path))

    def to_folder(self, folder: str | os.PathLike) -> None:
        """Write `folder/preprocessor_config.json` (atomically)."""
        write_json(Path(folder) / PREPROCESSOR_CONFIG, self.to_hf())

    # -- processing ---------------------------------------------------------------------------

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing, by transformers' `get_resize_output_image_size` rule."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        target = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(target * long / short)  # truncation, not rounding: torchvision's rule
        return (new_long, target) if width <= height else (target, new_long)

    def view(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of a width x height original that the model
        sees after resize and centre crop, in the original's pixels (beyond the image where
        the crop pads). Coordinates a model writes relative to its input map back through it."""
        rh, rw = self.resize_size(height, width) if self.do_resize else (height, width)
        sx, sy = width / rw, height / rh
        if not self.do_center_crop:
            return 0.0, 0.0, float(width), float(height)
        ch, cw = self.crop_size["height"], self.crop_size["width"]
        top, left = (rh - ch) // 2, (rw - cw) // 2  # floor, as center_crop (negative: padding)
        return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The resized and cropped uint8 (H, W, 3) pixels of one image (before rescale / normalise)."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ImageError(f"image has mode {image.mode!r}; with do_convert_rgb=false only RGB images can be used")
        if self.do_resize:
            height, width = self.resize_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        array = np.asarray(image)
        if self.do_center_crop:
            array = center_crop(array, self.crop_size["height"], self.crop_size["width"])
        return array

    def __call__(
        self,
        images: ImageSource | Iterable[ImageSource],
        *,
        max_pixels: int = MAX_PIXELS,
        max_bytes: int = MAX_BYTES,
    ) -> torch.Tensor:
        """Pixel values (N, 3, H, W) float32 of one image or a list (paths, bytes, files, PIL images).

        Paths, bytes and files go through `load_image` (EXIF-rotated, like a path handed to the
        transformers processor); PIL images are used as given (no EXIF rotation, like transformers).
        """
        arrays = [self.pixels(image) for image in open_images(images, max_pixels=max_pixels, max_bytes=max_bytes)]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InputError(
                f"images come out in different sizes {sorted(s[:2] for s in shapes)}; batching needs "
                "do_center_crop or a fixed size {'height', 'width'}"
            )
        return to_pixel_values(arrays, self)


def open_images(images: ImageSource | Iterable[ImageSource], *, max_pixels: int = MAX_PIXELS,
                max_bytes: int = MAX_BYTES) -> list[Image.Image]:
    """One image or a list (paths, bytes, files, PIL images) as a non-empty list of decoded PIL
    images: paths, bytes and files through `load_image` (EXIF-rotated), PIL images as given."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)) or hasattr(images, "read"):
        images = [images]
    try:
        items = list(images)
    except TypeError:
        raise InputError(f"expected an image or a list of images, got {type(images).__name__}") from None
    if not items:
        raise InputError("no images given")
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            with decoding_errors("image", max_pixels):  # a lazily opened PIL image decodes here
                item.load()
        else:
            item = load_image(item, max_pixels=max_pixels, max_bytes=max_bytes)
        out.append(item)
    return out


def to_pixel_values(arrays: list[np.ndarray], processor: Any) -> torch.Tensor:
    """Equal-sized uint8 (H, W, 3) arrays -> (N, 3, H, W) float32, rescaled and normalised as
    `processor`'s do_rescale / rescale_factor / do_normalize / image_mean / image_std say.

    Each output value depends only on its byte and channel, so the arithmetic runs once on the
    256 byte values per channel and the batch is a table lookup: the same float32 results as
    computing every pixel, several times faster."""
    batch = np.stack(arrays)  # (N, H, W, 3) uint8
    table = _value_table(processor).numpy()  # (3, 256)
    out = np.empty((batch.shape[0], 3, *batch.shape[1:3]), dtype=np.float32)
    for c in range(3):  # numpy's take: single-threaded, several times faster than torch indexing here
        np.take(table[c], batch[..., c], out=out[:, c])
    return torch.from_numpy(out)


def _value_table(processor: Any) -> torch.Tensor:
    """(3, 256): the processed float32 value of every byte in every channel."""
    # transformers rescales in float64 and casts to float32, then normalises in float32.
    x = torch.arange(256, dtype=torch.float64).expand(3, 256)
    if processor.do_rescale:
        x = x * processor.rescale_factor
    x = x.to(torch.float32)
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1)
        x = (x - mean) / std
    return x


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center crop of an (H, W, C) array: floor offsets, zero padding when too small."""
    h, w = array.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return array[top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    top_pad, left_pad = (new_h - h + 1) // 2, (new_w - w + 1) // 2  # ceil
    padded[top_pad : top_pad + h, left_pad : left_pad + w] = array
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]
