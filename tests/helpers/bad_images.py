"""Bad and odd image inputs, built in memory, for the server's image intake (vlmlab.serve.media)
and its HTTP-level tests.

`CORPUS` maps a name to (image_url, expected): `expected` is a lowercase substring of the
refusal's message (compare with `message.lower()`), or None for an input that must be accepted
as an RGB image of `SIZE`. The expectations hold under the default `MediaPolicy()`.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

SIZE = (24, 16)  # (width, height) of every image here that must be accepted


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    """`data:<mime>;base64,<payload>`."""
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    """`image` saved in `fmt` (a Pillow format name) to bytes."""
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def noise(size: tuple[int, int] = SIZE, seed: int = 0) -> Image.Image:
    """A random RGB image (incompressible, so truncating its file really cuts pixel data)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png() -> bytes:
    return encode(noise(), "PNG")


def truncated_png() -> bytes:
    data = encode(noise((64, 64)), "PNG")
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = encode(noise((64, 64)), "JPEG", quality=95)
    return data[: len(data) // 2]


def zero_bytes() -> bytes:
    return b""


def png_header_only(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose valid, CRC-checked IHDR claims width x height RGB pixels; its IDAT holds
    almost nothing, so a reader that decodes it instead of refusing it from the header fails otherwise."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def decompression_bomb() -> bytes:
    """A PNG header claiming 30000 x 30000 = 900 megapixels."""
    return png_header_only(30000, 30000)


def animated_gif(frames: int = 3) -> bytes:
    images = [noise(seed=i).convert("P") for i in range(frames)]  # distinct frames: equal ones get merged
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def animated_png(frames: int = 2) -> bytes:
    images = [noise(seed=i) for i in range(frames)]
    return encode(images[0], "PNG", save_all=True, append_images=images[1:], duration=100)


def cmyk_jpeg() -> bytes:
    return encode(noise().convert("CMYK"), "JPEG", quality=95)


def gray16_png() -> bytes:
    """A 16-bit greyscale PNG (Pillow reads it as mode "I;16")."""
    ramp = np.linspace(0, 65535, SIZE[0] * SIZE[1]).astype(np.uint16).reshape(SIZE[1], SIZE[0])
    return encode(Image.fromarray(ramp), "PNG")


def mpo() -> bytes:
    """A camera-style MPO (multi-picture JPEG: a primary picture plus one more)."""
    return encode(noise(seed=1), "MPO", save_all=True, append_images=[noise(seed=2)])


def bmp() -> bytes:
    return encode(noise(), "BMP")


def svg() -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?>\n'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="24" height="16">\n'
            b'  <rect width="24" height="16" fill="red"/>\n</svg>\n')


def not_an_image() -> bytes:
    return b"hello, not an image"


def random_bytes() -> bytes:
    return random.Random(0).randbytes(256)


CORPUS: dict[str, tuple[str, str | None]] = {
    "truncated-png": (data_uri(truncated_png()), "truncated or corrupt"),
    "truncated-jpeg": (data_uri(truncated_jpeg(), "image/jpeg"), "truncated or corrupt"),
    "zero-bytes": (data_uri(zero_bytes()), "empty (0 bytes)"),
    "decompression-bomb": (data_uri(decompression_bomb()), "too many pixels"),
    "animated-gif": (data_uri(animated_gif(), "image/gif"), "animated images are not supported (3 frames)"),
    "animated-png": (data_uri(animated_png()), "animated images are not supported (2 frames)"),
    "svg-as-png": (data_uri(svg()), "svg is a vector format"),
    "svg-mime": (data_uri(svg(), "image/svg+xml"), "svg is a vector format"),
    "bmp": (data_uri(bmp(), "image/bmp"), "bmp images are not supported"),
    "not-an-image": (data_uri(not_an_image()), "data uri says image/png but the data is not an image"),
    "random-bytes": (data_uri(random_bytes(), "image/jpeg"), "data uri says image/jpeg but the data is not an image"),
    "invalid-base64": ("data:image/png;base64,iVBORw0K!!!not*base64", "invalid base64"),
    "text-plain": (data_uri(b"hello", "text/plain"), "'text/plain' is not an image type"),
    "not-base64": ("data:image/png,%89PNG%0D%0A", "must be base64-encoded"),
    "no-comma": ("data:image/png;base64", "has no comma"),
    "empty-url": ("", "empty url"),
    "bare-path": ("/etc/passwd", "is not a url"),
    "file-etc-passwd": ("file:///etc/passwd", "file:// urls are disabled"),
    "http-url": ("http://169.254.169.254/latest/meta-data/", "http(s) image urls are disabled"),
    "ftp-url": ("ftp://example.com/cat.png", "unsupported url scheme 'ftp'"),
    "cmyk-jpeg": (data_uri(cmyk_jpeg(), "image/jpeg"), None),
    "gray16-png": (data_uri(gray16_png()), None),
    "mpo": (data_uri(mpo(), "image/jpeg"), None),
}
