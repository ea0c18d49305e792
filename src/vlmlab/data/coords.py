"""The text formats of boxes and points: how a model writes a location, and how we read it back.

One home for both directions, so the training data and the answer parsers cannot drift apart.

Boxes follow Qwen2-VL: integer coordinates normalised to 0-1000 on each axis, top-left then
bottom-right corner, written ``(x0,y0),(x1,y1)``. Example on a 200x100 image, pixel box
(20, 10, 60, 50) -> ``(100,100),(300,500)``.

Points follow Molmo: percentages of width and height with one decimal, as XML-like tags.
One point: ``<point x="10.0" y="20.5" alt="red circle">red circle</point>``; several:
``<points x1="10.0" y1="20.5" x2="70.0" y2="8.0" alt="blue stars">blue stars</points>``.

Parsers never raise on model text: an answer that contains no well-formed location parses to
``None`` and is scored as wrong.
"""

from __future__ import annotations

import re
from html import escape, unescape

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Point = tuple[float, float]  # x, y in pixels

BOX_SCALE = 1000
POINT_SCALE = 100.0

BOX_PATTERN = re.compile(r"\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)\s*,?\s*\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)")
_NUM = r'"\s*(-?\d+(?:\.\d+)?)\s*"'
_POINT = re.compile(rf"<point\s+x\s*=\s*{_NUM}\s+y\s*=\s*{_NUM}[^>]*>")
_POINTS = re.compile(r"<points\s+([^>]*)>")
_POINTS_ATTR = re.compile(rf"([xy])(\d+)\s*=\s*{_NUM}")
POINT_TAG_PATTERN = re.compile(r"<points?\s[^>]*>")  # an opening point tag, whose x / y attributes are coordinates
# inside such a tag, one percentage: the value of x="", y="", x1="", y12="", ...
POINT_COORD_PATTERN = re.compile(r'(?:(?<=[xy]=")|(?<=[xy]\d=")|(?<=[xy]\d\d="))(\d{1,3}(?:\.\d+)?)(?=")')


def _norm(value: float, size: int, scale: float) -> float:
    return min(max(value / size * scale, 0.0), scale)


def format_box(box: Box, width: int, height: int) -> str:
    """Pixel box -> ``(x0,y0),(x1,y1)`` in 0-1000 integer coordinates."""
    x0, y0, x1, y1 = box
    q = [round(_norm(x0, width, BOX_SCALE)), round(_norm(y0, height, BOX_SCALE)),
         round(_norm(x1, width, BOX_SCALE)), round(_norm(y1, height, BOX_SCALE))]
    return f"({q[0]},{q[1]}),({q[2]},{q[3]})"


def parse_box(text: str, width: int, height: int) -> Box | None:
    """The first well-formed box in `text`, in pixels; None if there is none or it is empty/out of range."""
    m = BOX_PATTERN.search(text)
    if m is None:
        return None
    x0, y0, x1, y1 = (int(v) for v in m.groups())
    if max(x0, y0, x1, y1) > BOX_SCALE or x1 <= x0 or y1 <= y0:
        return None
    return (x0 / BOX_SCALE * width, y0 / BOX_SCALE * height, x1 / BOX_SCALE * width, y1 / BOX_SCALE * height)


def find_boxes(text: str, width: int, height: int) -> list[Box]:
    """Every well-formed box in `text`, in pixels (malformed or empty ones are skipped)."""
    return [box for m in BOX_PATTERN.finditer(text) if (box := parse_box(m.group(0), width, height)) is not None]


def format_points(points: list[Point], width: int, height: int, label: str) -> str:
    """Pixel points -> one Molmo ``<point>`` tag (one point) or ``<points>`` tag (several)."""
    if not points:
        raise ValueError("format_points needs at least one point")
    alt = escape(label, quote=True)
    coords = [(_norm(x, width, POINT_SCALE), _norm(y, height, POINT_SCALE)) for x, y in points]
    if len(coords) == 1:
        (x, y), = coords
        return f'<point x="{x:.1f}" y="{y:.1f}" alt="{alt}">{alt}</point>'
    attrs = " ".join(f'x{i}="{x:.1f}" y{i}="{y:.1f}"' for i, (x, y) in enumerate(coords, 1))
    return f'<points {attrs} alt="{alt}">{alt}</points>'


def parse_points(text: str, width: int, height: int) -> list[Point] | None:
    """Every point in the ``<point>`` / ``<points>`` tags of `text`, in pixels; None if there are none.

    A ``<points>`` tag whose numbered x/y attributes do not pair up, or any coordinate outside
    0-100, makes the whole answer unparseable (None).
    """
    found: list[Point] = []
    for m in _POINT.finditer(text):
        found.append((float(m.group(1)), float(m.group(2))))
    for m in _POINTS.finditer(text):
        xs: dict[int, float] = {}
        ys: dict[int, float] = {}
        for axis, idx, val in _POINTS_ATTR.findall(m.group(1)):
            (xs if axis == "x" else ys)[int(idx)] = float(val)
        if not xs or xs.keys() != ys.keys():
            return None
        found.extend((xs[i], ys[i]) for i in sorted(xs))
    if not found or any(not (0.0 <= v <= POINT_SCALE) for p in found for v in p):
        return None
    return [(x / POINT_SCALE * width, y / POINT_SCALE * height) for x, y in found]


def strip_tags(text: str) -> str:
    """Model text with point tags replaced by their inner label (for display and text metrics)."""
    text = re.sub(r"<points?\s[^>]*>(.*?)</points?>", lambda m: m.group(1), text, flags=re.S)
    return unescape(text)
