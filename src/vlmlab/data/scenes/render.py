"""Pixels of a scene: shape geometry, rasterisation, the bitmap font, backgrounds.

Everything here is plain numpy integer / IEEE float arithmetic (no Pillow drawing, no fonts, no
transcendental functions on arrays), so a scene graph renders to the same bytes on any machine:

* shapes are polygons (or a circle) whose vertex coordinates are rounded to 1/64 px; a pixel
  belongs to a shape when its centre ``(x + 0.5, y + 0.5)`` is inside (even-odd rule), so there
  is no anti-aliasing and every object pixel has exactly the object's RGB;
* words are drawn with a 5x7 bitmap font scaled by an integer factor;
* backgrounds are achromatic (R = G = B): a plain grey, grey noise from PCG64's raw output, or a
  linear grey gradient computed with integers.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

# --- shapes ------------------------------------------------------------------------------------

_S3 = math.sqrt(3.0) / 2.0


def _star(points: int = 5, inner: float = 0.42) -> tuple[tuple[float, float], ...]:
    verts = []
    for k in range(2 * points):
        a = math.radians(-90.0 + 180.0 * k / points)
        r = 1.0 if k % 2 == 0 else inner
        verts.append((r * math.cos(a), r * math.sin(a)))
    return tuple(verts)


# Unit outlines: half-size 1, centred on the origin, y pointing down (image coordinates). An
# unrotated shape of size s spans s pixels in width. `None` is the circle (diameter s). The
# diamond is a tall rhombus (width 0.62 of its height) so that a square rotated by up to 15
# degrees never looks like one.
UNIT_SHAPES: dict[str, tuple[tuple[float, float], ...] | None] = {
    "circle": None,
    "square": ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)),
    "triangle": ((0.0, -_S3), (1.0, _S3), (-1.0, _S3)),
    "star": _star(),
    "hexagon": tuple((math.cos(math.radians(a)), math.sin(math.radians(a))) for a in range(0, 360, 60)),
    "diamond": ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)),
}

_GRID = 64.0  # vertices are snapped to 1/64 px, so tiny libm differences cannot move a pixel


def outline(shape: str, center: tuple[float, float], size_px: float, rotation: float) -> list[tuple[float, float]] | None:
    """Polygon vertices in pixels (snapped to 1/64 px) for a shape, or None for a circle."""
    unit = UNIT_SHAPES[shape]
    if unit is None:
        return None
    a = math.radians(rotation)
    c, s = math.cos(a) * size_px / 2.0, math.sin(a) * size_px / 2.0
    cx, cy = center
    return [(round((cx + c * x - s * y) * _GRID) / _GRID, round((cy + s * x + c * y) * _GRID) / _GRID)
            for x, y in unit]


def extent(shape: str, size_px: float, rotation: float) -> tuple[float, float, float, float]:
    """Continuous bounding box of a shape relative to its centre: (dx0, dy0, dx1, dy1)."""
    unit = UNIT_SHAPES[shape]
    if unit is None:
        r = size_px / 2.0
        return (-r, -r, r, r)
    a = math.radians(rotation)
    c, s = math.cos(a) * size_px / 2.0, math.sin(a) * size_px / 2.0
    xs = [c * x - s * y for x, y in unit]
    ys = [s * x + c * y for x, y in unit]
    return (min(xs), min(ys), max(xs), max(ys))


def _span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    """Pixel index range [i0, i1) whose centres i + 0.5 lie in [lo, hi], clipped to [0, limit)."""
    return max(0, math.ceil(lo - 0.5)), min(limit, math.floor(hi - 0.5) + 1)


def rasterize(shape: str, center: tuple[float, float], size_px: float, rotation: float,
              width: int, height: int) -> tuple[int, int, np.ndarray]:
    """The pixels of one shape: (x0, y0, mask) with `mask` a tight (h, w) bool crop at (x0, y0).

    The crop is trimmed to the set pixels, so ``(x0, y0, x0 + w, y0 + h)`` is the exact pixel box.
    """
    verts = outline(shape, center, size_px, rotation)
    if verts is None:
        cx, cy = center
        r = size_px / 2.0
        x0, x1 = _span(cx - r, cx + r, width)
        y0, y1 = _span(cy - r, cy + r, height)
        dx = np.arange(x0, x1, dtype=np.float64) + (0.5 - cx)
        dy = np.arange(y0, y1, dtype=np.float64) + (0.5 - cy)
        mask = dy[:, None] ** 2 + dx[None, :] ** 2 <= r * r
    else:
        xs = [v[0] for v in verts]
        ys = [v[1] for v in verts]
        x0, x1 = _span(min(xs), max(xs), width)
        y0, y1 = _span(min(ys), max(ys), height)
        # Even-odd rule at pixel centres: a pixel is inside when an odd number of edges cross its
        # row to the right of its centre. Per edge (xa, ya) -> (xb, yb): where it meets each row.
        k = len(verts)
        edges = np.array([(xs[i], ys[i], ys[(i + 1) % k],
                           (xs[(i + 1) % k] - xs[i]) / (ys[(i + 1) % k] - ys[i]) if ys[(i + 1) % k] != ys[i] else 0.0)
                          for i in range(k)])
        xa, ya, yb, slope = (edges[:, j:j + 1] for j in range(4))  # each (k, 1)
        py = np.arange(y0, y1, dtype=np.float64) + 0.5
        xcut = xa + (py - ya) * slope  # (k, h)
        xcut[(ya > py) == (yb > py)] = -np.inf  # the edge does not span this row
        px = np.arange(x0, x1, dtype=np.float64) + 0.5
        mask = np.logical_xor.reduce(px < xcut[:, :, None], axis=0)
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    if not rows.any():
        return x0, y0, np.zeros((0, 0), dtype=bool)
    r0, r1 = int(rows.argmax()), len(rows) - int(rows[::-1].argmax())
    c0, c1 = int(cols.argmax()), len(cols) - int(cols[::-1].argmax())
    return x0 + c0, y0 + r0, np.ascontiguousarray(mask[r0:r1, c0:c1])


# --- bitmap font ---------------------------------------------------------------------------------

# 5x7 glyphs, rows top to bottom, '#' = ink. Every glyph has ink in its top and bottom row.
_GLYPHS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
}
FONT: dict[str, np.ndarray] = {
    ch: np.array([[c == "#" for c in row] for row in rows.split()], dtype=bool) for ch, rows in _GLYPHS.items()
}
GLYPH_W, GLYPH_H = 5, 7


@lru_cache(maxsize=1024)
def word_bitmap(text: str, scale: int) -> np.ndarray:
    """Ink mask (7*scale, (6*len-1)*scale) of an uppercase word, one blank column between glyphs.

    Cached and shared: do not modify the returned array.
    """
    cols = []
    for i, ch in enumerate(text):
        if i:
            cols.append(np.zeros((GLYPH_H, 1), dtype=bool))
        cols.append(FONT[ch])
    bitmap = np.concatenate(cols, axis=1)
    bitmap = np.repeat(np.repeat(bitmap, scale, axis=0), scale, axis=1)
    bitmap.setflags(write=False)
    return bitmap


# --- backgrounds ---------------------------------------------------------------------------------

def background_array(kind: str, width: int, height: int, level: int, level2: int,
                     direction: tuple[int, int], amplitude: int, seed: int) -> np.ndarray:
    """Grey levels (height, width) uint8 of a background.

    plain: `level` everywhere. noise: `level` plus uniform integer noise in [-amplitude,
    amplitude] from the raw 64-bit output of PCG64(seed) (stable across numpy versions).
    gradient: from `level` to `level2` along `direction` (dx, dy in {-1, 0, 1}), integer maths.
    """
    if kind == "plain":
        return np.full((height, width), level, dtype=np.uint8)
    if kind == "noise":
        n = width * height
        raw = np.random.PCG64(seed).random_raw((n + 7) // 8).astype("<u8").view(np.uint8)[:n]
        noise = (raw.astype(np.int32) * (2 * amplitude + 1)) >> 8  # uniform-ish in [0, 2a]
        grey = np.clip(level - amplitude + noise, 0, 255).astype(np.uint8)
        return grey.reshape(height, width)
    if kind == "gradient":
        dx, dy = direction
        # Twice the projection of each pixel centre on the direction: an integer.
        p = dx * (2 * np.arange(width, dtype=np.int64) + 1)[None, :] + dy * (2 * np.arange(height, dtype=np.int64) + 1)[:, None]
        lo, hi = int(p.min()), int(p.max())
        grey = level + ((level2 - level) * (p - lo)) // max(hi - lo, 1)
        return np.broadcast_to(grey, (height, width)).astype(np.uint8)
    raise ValueError(f"unknown background kind {kind!r}")
