"""Scene graphs: the vocabulary, `SceneConfig`, the data splits, and a constrained scene sampler.

A scene is a seed plus a config: `Scene.sample(seed, config)` draws objects (shape, colour, size,
centre, rotation), optional words and clutter specks, and a background, with Python's
`random.Random` seeded from the seed (never the global RNG, never `hash()`). The graph alone
renders the image (`render.py`), so a graph read back from JSON gives the same pixels.

Task generators (`tasks.py`) use `build_scene` directly: it takes the objects a question needs
("exactly 3 red circles and nothing else red and circular") and fills in the rest.

Coordinates are pixels, origin top left, x right, y down. A box is ``(x0, y0, x1, y1)`` with
x1, y1 exclusive (the box of pixel columns x0 .. x1 - 1), so its continuous extent is [x0, x1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from vlmlab.data.scenes import render
from vlmlab.errors import ConfigError, DataError, InputError

# --- vocabulary ---------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond")
# Well separated, saturated colours; none is grey, so background, specks and word ink (all
# achromatic) never share a pixel value with an object.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (240, 215, 25),
    "green": (35, 160, 55),
    "cyan": (25, 195, 210),
    "blue": (35, 75, 215),
    "purple": (135, 55, 195),
    "pink": (240, 115, 185),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape")  # the order they are written in
# Words that may be written in a scene: no colour or shape names, so text never answers a question.
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "MAP", "BOX", "KEY", "CUP", "HAT", "PEN", "BUS", "FOX", "OWL",
    "BEE", "EGG", "JAM", "LOG", "NUT", "OAK", "SKY", "TOY", "VAN", "WEB", "ZIP", "MILK",
    "FROG", "LAMP", "BOOK", "DOOR", "FISH", "KITE", "MOON", "ROSE", "SHIP", "TREE", "WOLF", "BIRD",
    "CAKE", "RAIN", "SNOW", "GOLD", "QUIZ", "ECHO", "A7", "K9", "X42", "404", "2026", "B12",
)
MAX_ROTATION = 15  # degrees: a square rotated this much still reads as a square, not a diamond

# Colour-shape combinations that never appear in train/val/test and appear in every
# compositional scene (CLEVR-CoGenT style). Each colour is held out with exactly one shape.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "square"), ("orange", "hexagon"), ("yellow", "circle"), ("green", "star"),
    ("cyan", "triangle"), ("blue", "diamond"), ("purple", "circle"), ("pink", "triangle"),
)

# --- splits -------------------------------------------------------------------------------------

# Global scene seeds of each split: [start, stop). A sample is addressed by (split, index) and its
# global seed is start + index, so splits can never share a scene.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "val": (1_000_000_000, 1_010_000_000),
    "test": (1_010_000_000, 1_020_000_000),
    "compositional": (1_020_000_000, 1_030_000_000),
}


def split_seed(split: str, index: int) -> int:
    """The global seed of sample `index` of `split` (InputError outside the split's range)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    start, stop = SPLITS[split]
    if not 0 <= index < stop - start:
        raise InputError(f"seed {index} is outside split {split!r}: expected 0 <= seed < {stop - start}")
    return start + index


def split_of(seed: int) -> str:
    """The split a global seed belongs to."""
    for name, (start, stop) in SPLITS.items():
        if start <= seed < stop:
            return name
    raise InputError(f"global seed {seed} is in no split (0 <= seed < {max(s for _, s in SPLITS.values())})")


class Kind(NamedTuple):
    """What an object is, independent of where: the attributes questions talk about."""

    color: str
    shape: str
    size: str


ALL_KINDS: tuple[Kind, ...] = tuple(Kind(c, s, z) for c in COLOR_NAMES for s in SHAPES for z in SIZES)
_HELD_OUT_SET = frozenset(HELD_OUT)


def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in _HELD_OUT_SET


def allowed_kinds(split: str) -> tuple[Kind, ...]:
    """Kinds that may appear in a scene of `split`: held-out combinations only in "compositional"."""
    return _ALLOWED[split]


_ALLOWED = {
    split: ALL_KINDS if split == "compositional" else tuple(k for k in ALL_KINDS if not is_held_out(k.color, k.shape))
    for split in SPLITS
}


def derive_seed(*parts: int | str) -> int:
    """A 64-bit seed from ints and strings, the same in every process (unlike `hash()`)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little")


# --- config -------------------------------------------------------------------------------------

BACKGROUNDS = ("plain", "noise", "gradient")


@dataclass(frozen=True)
class SceneConfig:
    """How scenes look: canvas, object counts and sizes, background, difficulty knobs.

    Object sizes are fractions of the shorter canvas side (an unrotated shape of size s is s pixels
    wide); the gap between the small and large ranges keeps "small"/"large" unambiguous.
    """

    width: int = 224
    height: int = 224
    min_objects: int = 2
    max_objects: int = 10
    small_size: tuple[float, float] = (0.075, 0.095)
    large_size: tuple[float, float] = (0.14, 0.18)
    background: str = "random"  # plain | noise | gradient | random (one of the three per scene)
    allow_rotation: bool = True  # rotate shapes by up to +-MAX_ROTATION degrees
    max_overlap: float = 0.0  # fraction of an object's area one other object may cover (0: none)
    min_visible: float = 0.6  # with overlap: fraction of each object that must stay visible
    color_jitter: int = 0  # per-object RGB offset in [-j, j] around the named colour
    p_words: float = 0.25  # probability that a scene has written words (OCR tasks always do)
    max_words: int = 2
    word_scale: int = 0  # font scale (5x7 glyphs times this); 0: shorter side / 112
    clutter: int = 0  # number of small grey specks (not objects) under the objects

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"SceneConfig.{name} = {getattr(self, name)!r}: expected {expected}")

        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 32 <= v <= 4096:
                raise bad(name, "an integer in [32, 4096]")
        if not 0 <= self.min_objects <= self.max_objects:
            raise bad("min_objects", f"0 <= min_objects <= max_objects ({self.max_objects})")
        if not 1 <= self.max_objects <= 40:
            raise bad("max_objects", "an integer in [1, 40]")
        for name in ("small_size", "large_size"):
            lo, hi = getattr(self, name)
            if not 0.02 <= lo <= hi <= 0.4:
                raise bad(name, "(lo, hi) with 0.02 <= lo <= hi <= 0.4")
        if self.large_size[0] < 1.3 * self.small_size[1]:
            raise bad("large_size", f"a lower bound at least 1.3x small_size's upper bound ({self.small_size[1]})")
        if self.background not in BACKGROUNDS + ("random",):
            raise bad("background", f"one of {', '.join(BACKGROUNDS + ('random',))}")
        if not 0.0 <= self.max_overlap <= 0.5:
            raise bad("max_overlap", "a fraction in [0, 0.5]")
        if not 0.5 <= self.min_visible <= 1.0:
            raise bad("min_visible", "a fraction in [0.5, 1]")
        if not 0 <= self.color_jitter <= 20:
            raise bad("color_jitter", "an integer in [0, 20]")
        if not 0.0 <= self.p_words <= 1.0:
            raise bad("p_words", "a probability in [0, 1]")
        if not 0 <= self.max_words <= 6:
            raise bad("max_words", "an integer in [0, 6]")
        if not 0 <= self.word_scale <= 16:
            raise bad("word_scale", "an integer in [0, 16] (0: automatic)")
        if not 0 <= self.clutter <= 500:
            raise bad("clutter", "an integer in [0, 500]")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SceneConfig":
        """A difficulty preset ("easy", "medium" = the defaults, "hard"), with field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown SceneConfig preset {name!r}; expected one of {', '.join(PRESETS)}")
        return dataclasses.replace(cls(**PRESETS[name]), **overrides)

    @property
    def short_side(self) -> int:
        return min(self.width, self.height)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SceneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"SceneConfig has no field {unknown[0]!r}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    "easy": dict(min_objects=1, max_objects=10, background="plain", allow_rotation=False, p_words=0.0,
                 color_jitter=0, clutter=0),
    "medium": {},
    "hard": dict(min_objects=3, max_objects=12, background="noise", max_overlap=0.25, min_visible=0.6,
                 color_jitter=16, p_words=0.5, max_words=3, clutter=40),
}


# --- the graph ----------------------------------------------------------------------------------

Box = tuple[int, int, int, int]


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    rgb: tuple[int, int, int]  # exact pixel colour (the named colour plus jitter)
    size_px: float  # width of the unrotated shape in pixels
    center: tuple[float, float]
    rotation: int  # degrees, clockwise on screen
    box: Box  # exact pixel box of the drawn shape before occlusion (x1, y1 exclusive)

    @property
    def kind(self) -> Kind:
        return Kind(self.color, self.shape, self.size)


@dataclass
class SceneWord:
    text: str
    x: int  # top-left corner of the bitmap
    y: int
    scale: int
    ink: int  # 0 (black) or 255 (white), whichever contrasts with the background
    box: Box  # exact pixel box of the ink


@dataclass
class Background:
    kind: str  # plain | noise | gradient
    level: int  # grey level (gradient: at the start)
    level2: int = 0  # gradient: grey level at the end
    direction: tuple[int, int] = (1, 0)  # gradient: (dx, dy), each in {-1, 0, 1}
    amplitude: int = 0  # noise: +- grey levels
    seed: int = 0  # noise: PCG64 seed

    def array(self, width: int, height: int) -> np.ndarray:
        return render.background_array(self.kind, width, height, self.level, self.level2,
                                       self.direction, self.amplitude, self.seed)

    @property
    def mean_level(self) -> float:
        return (self.level + self.level2) / 2 if self.kind == "gradient" else float(self.level)


Speck = tuple[int, int, int, int]  # x, y, side, grey


@dataclass
class Scene:
    """A scene graph. Object index = drawing order (later objects are drawn on top)."""

    width: int
    height: int
    background: Background
    objects: list[SceneObject]
    words: list[SceneWord] = field(default_factory=list)
    specks: list[Speck] = field(default_factory=list)
    seed: int = 0  # global seed of the sample the scene was drawn for (provenance)
    split: str = "train"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- sampling --

    @classmethod
    def sample(cls, seed: int, config: SceneConfig | None = None) -> "Scene":
        """The random scene of a global seed (its split is the one whose range holds the seed)."""
        config = config or SceneConfig()
        split = split_of(seed)
        for attempt in range(MAX_ATTEMPTS):
            try:
                return build_scene(random.Random(derive_seed(seed, "scene", attempt)), config, split, seed)[0]
            except Unsatisfiable:
                continue
        raise unsatisfiable_error("scene", seed, config)

    def __getstate__(self) -> dict:
        # Across processes (DataLoader workers) send the graph and the finished image only; masks
        # and other intermediates are recomputed on demand, which is far cheaper than pickling them.
        state = dict(self.__dict__)
        state["_cache"] = {"image": self._cache["image"]} if "image" in self._cache else {}
        return state

    # -- pixels --

    def _rasters(self) -> list[tuple[int, int, np.ndarray]]:
        if "rasters" not in self._cache:
            self._cache["rasters"] = [
                render.rasterize(o.shape, o.center, o.size_px, o.rotation, self.width, self.height)
                for o in self.objects
            ]
        return self._cache["rasters"]

    def _background(self) -> np.ndarray:
        if "background" not in self._cache:
            self._cache["background"] = self.background.array(self.width, self.height)
        return self._cache["background"]

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 pixels and (H, W) uint8 labels (0 = no object, i + 1 = object i)."""
        if "pixels" not in self._cache:
            bg = self._background()
            rgb = np.stack((bg, bg, bg), axis=2)
            labels = np.zeros((self.height, self.width), dtype=np.uint8)
            for x, y, side, grey in self.specks:
                rgb[y:y + side, x:x + side] = grey
            for i, (obj, (x0, y0, mask)) in enumerate(zip(self.objects, self._rasters())):
                h, w = mask.shape
                rgb[y0:y0 + h, x0:x0 + w][mask] = obj.rgb
                labels[y0:y0 + h, x0:x0 + w][mask] = i + 1
            for word in self.words:
                bitmap = render.word_bitmap(word.text, word.scale)
                h, w = bitmap.shape
                rgb[word.y:word.y + h, word.x:word.x + w][bitmap] = word.ink
            self._cache["pixels"] = (rgb, labels)
        return self._cache["pixels"]

    def render(self) -> Image.Image:
        """The RGB image (cached; copy it before drawing on it)."""
        if "image" not in self._cache:
            self._cache["image"] = Image.fromarray(self._arrays()[0], "RGB")
        return self._cache["image"]

    def object_masks(self) -> np.ndarray:
        """(n_objects, H, W) bool: the VISIBLE pixels of each object (occluded parts excluded)."""
        labels = self._arrays()[1]
        return labels[None, :, :] == np.arange(1, len(self.objects) + 1, dtype=np.uint8)[:, None, None]

    def visible_mask(self, i: int) -> tuple[int, int, np.ndarray]:
        """Object i's visible pixels as a crop of its box: (x0, y0, mask)."""
        x0, y0, x1, y1 = self.objects[i].box
        return x0, y0, self._arrays()[1][y0:y1, x0:x1] == i + 1

    # -- serialisation --

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict holding everything the image is rendered from."""
        return {
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "split": self.split,
            "background": dataclasses.asdict(self.background),
            "objects": [dataclasses.asdict(o) for o in self.objects],
            "words": [dataclasses.asdict(w) for w in self.words],
            "specks": [list(s) for s in self.specks],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        """Inverse of `to_dict`; DataError naming the field when the dict is not a scene graph."""
        try:
            bg = dict(d["background"])
            bg["direction"] = tuple(bg.get("direction", (1, 0)))
            objects = [SceneObject(**{**o, "rgb": tuple(o["rgb"]), "center": tuple(o["center"]),
                                      "box": tuple(o["box"])}) for o in d["objects"]]
            words = [SceneWord(**{**w, "box": tuple(w["box"])}) for w in d.get("words", [])]
            return cls(width=int(d["width"]), height=int(d["height"]), background=Background(**bg),
                       objects=objects, words=words, specks=[tuple(s) for s in d.get("specks", [])],
                       seed=int(d.get("seed", 0)), split=str(d.get("split", "train")))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a scene graph: {type(e).__name__}: {e}") from None


# --- sampling under constraints -----------------------------------------------------------------

MAX_ATTEMPTS = 60  # resampling attempts before a request is declared impossible for the config


class Unsatisfiable(Exception):
    """This draw cannot satisfy the request (placement failed, a constraint conflicts): draw again."""


def unsatisfiable_error(what: str, seed: int, config: SceneConfig) -> InputError:
    return InputError(
        f"could not draw a {what!r} scene for seed {seed} in {MAX_ATTEMPTS} attempts with a "
        f"{config.width}x{config.height} canvas and max_objects={config.max_objects}: "
        "use a larger canvas, fewer objects or smaller sizes"
    )


@dataclass(frozen=True)
class Spec:
    """A required object: fixed attributes (None = free) and an optional predicate it must avoid."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    avoid: Callable[[Kind], bool] | None = None

    def admits(self, k: Kind) -> bool:
        return ((self.color is None or k.color == self.color) and (self.shape is None or k.shape == self.shape)
                and (self.size is None or k.size == self.size) and not (self.avoid and self.avoid(k)))


def _draw_kind(rng: random.Random, pool: Sequence[Kind], ok: Callable[[Kind], bool]) -> Kind:
    """A uniform draw from the kinds of `pool` that pass `ok` (rejection first, then filtering)."""
    for _ in range(24):
        k = pool[rng.randrange(len(pool))]
        if ok(k):
            return k
    candidates = [k for k in pool if ok(k)]
    if not candidates:
        raise Unsatisfiable("no kind satisfies the constraints")
    return candidates[rng.randrange(len(candidates))]


def _kinds_for(rng: random.Random, split: str, required: Sequence[Spec], n_free: int,
               forbid: Callable[[Kind], bool] | None) -> list[Kind]:
    """Kinds of the required objects then `n_free` distractors (which avoid `forbid`).

    In the compositional split at least one object gets a held-out combination: a free choice is
    redrawn among held-out kinds if possible, else a held-out distractor is added.
    """
    pool = allowed_kinds(split)
    free_ok = (lambda k: not forbid(k)) if forbid else (lambda k: True)
    kinds = [_draw_kind(rng, pool, spec.admits) for spec in required]
    kinds += [_draw_kind(rng, pool, free_ok) for _ in range(n_free)]
    if split == "compositional" and not any(is_held_out(k.color, k.shape) for k in kinds):
        held = [k for k in pool if is_held_out(k.color, k.shape)]
        slots = list(range(len(kinds)))
        rng.shuffle(slots)
        for i in slots:
            ok = required[i].admits if i < len(required) else free_ok
            options = [k for k in held if ok(k)]
            if options:
                kinds[i] = options[rng.randrange(len(options))]
                break
        else:
            options = [k for k in held if free_ok(k)]
            if not options:
                raise Unsatisfiable("no held-out kind fits the constraints")
            kinds.append(options[rng.randrange(len(options))])
    return kinds


def _quarter(v: float) -> float:
    return round(v * 16.0) / 16.0  # positions and sizes on a 1/16 px grid: exact in JSON


def _boxes_apart(a: tuple[float, float, float, float], b: tuple[float, float, float, float], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


Raster = tuple[int, int, np.ndarray]  # x0, y0, mask crop (see render.rasterize)


def _overlap(a: Raster, b: Raster) -> int:
    """Number of pixels two rasters share."""
    ax, ay, am = a
    bx, by, bm = b
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + am.shape[1], bx + bm.shape[1]), min(ay + am.shape[0], by + bm.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0
    return int(np.count_nonzero(am[y0 - ay:y1 - ay, x0 - ax:x1 - ax] & bm[y0 - by:y1 - by, x0 - bx:x1 - bx]))


def _place_objects(rng: random.Random, config: SceneConfig, kinds: list[Kind]) -> tuple[list[SceneObject], list[Raster]]:
    """Sizes, rotations, colours and positions for `kinds` (in drawing order), or Unsatisfiable.

    Without overlap the objects' boxes stay `gap` pixels apart. With overlap, pixel intersections
    are bounded pairwise (max_overlap of either object's area), same-coloured objects never touch
    (they would merge into one blob), and every object keeps min_visible of its pixels.
    """
    W, H, short = config.width, config.height, config.short_side
    gap = max(2.0, short / 100.0)
    overlap = config.max_overlap > 0
    geo = []
    for k in kinds:
        lo, hi = config.small_size if k.size == "small" else config.large_size
        size_px = _quarter(rng.uniform(lo, hi) * short)
        rot = rng.randint(-MAX_ROTATION, MAX_ROTATION) if config.allow_rotation and k.shape != "circle" else 0
        j = config.color_jitter
        base = COLORS[k.color]
        rgb = tuple(min(255, max(0, c + rng.randint(-j, j))) for c in base) if j else base
        geo.append((size_px, rot, rgb))
    placed: dict[int, tuple[tuple[float, float, float, float], Raster, tuple[float, float]]] = {}
    # Largest first: big objects are the hard ones to fit.
    for i in sorted(range(len(kinds)), key=lambda i: -geo[i][0]):
        size_px, rot, _ = geo[i]
        dx0, dy0, dx1, dy1 = render.extent(kinds[i].shape, size_px, rot)
        lo_x, hi_x = 1.0 - dx0, W - 1.0 - dx1
        lo_y, hi_y = 1.0 - dy0, H - 1.0 - dy1
        if hi_x < lo_x or hi_y < lo_y:
            raise Unsatisfiable("object larger than the canvas")
        for _ in range(80):
            cx, cy = _quarter(rng.uniform(lo_x, hi_x)), _quarter(rng.uniform(lo_y, hi_y))
            fbox = (cx + dx0, cy + dy0, cx + dx1, cy + dy1)
            if not overlap:
                if all(_boxes_apart(fbox, p[0], gap) for p in placed.values()):
                    placed[i] = (fbox, render.rasterize(kinds[i].shape, (cx, cy), size_px, rot, W, H), (cx, cy))
                    break
                continue
            near = [j for j, p in placed.items() if not _boxes_apart(fbox, p[0], gap)]
            if any(kinds[j].color == kinds[i].color for j in near):
                continue
            raster = render.rasterize(kinds[i].shape, (cx, cy), size_px, rot, W, H)
            area = int(np.count_nonzero(raster[2]))
            ok = True
            for j in near:
                inter = _overlap(raster, placed[j][1])
                if inter > config.max_overlap * min(area, int(np.count_nonzero(placed[j][1][2]))):
                    ok = False
                    break
            if ok:
                placed[i] = (fbox, raster, (cx, cy))
                break
        else:
            raise Unsatisfiable("no room for an object")
    objects = []
    for i, k in enumerate(kinds):
        size_px, rot, rgb = geo[i]
        x0, y0, mask = placed[i][1]
        objects.append(SceneObject(shape=k.shape, color=k.color, size=k.size, rgb=rgb, size_px=size_px,
                                   center=placed[i][2], rotation=rot,
                                   box=(x0, y0, x0 + mask.shape[1], y0 + mask.shape[0])))
    if overlap:
        # Occlusion in drawing order: every object must keep min_visible of its pixels.
        labels = np.zeros((H, W), dtype=np.uint8)
        for i in range(len(kinds)):
            x0, y0, mask = placed[i][1]
            labels[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = i + 1
        visible = np.bincount(labels.ravel(), minlength=len(kinds) + 1)
        for i in range(len(kinds)):
            if visible[i + 1] < config.min_visible * np.count_nonzero(placed[i][1][2]):
                raise Unsatisfiable("an object is too occluded")
    return objects, [placed[i][1] for i in range(len(kinds))]


def _sample_background(rng: random.Random, config: SceneConfig) -> Background:
    kind = config.background if config.background != "random" else BACKGROUNDS[rng.randrange(3)]
    if kind == "plain":
        return Background("plain", rng.randint(50, 205))
    if kind == "noise":
        return Background("noise", rng.randint(70, 185), amplitude=rng.randint(10, 25), seed=rng.getrandbits(63))
    a = rng.randint(40, 215)
    b = a + rng.choice((-1, 1)) * rng.randint(50, 90)
    if not 20 <= b <= 235:
        b = a - (b - a)
    directions = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
    return Background("gradient", a, level2=b, direction=directions[rng.randrange(8)])


def word_scale(config: SceneConfig) -> int:
    return config.word_scale or max(1, round(config.short_side / 112))


def _place_words(rng: random.Random, config: SceneConfig, texts: Sequence[str], n_required: int,
                 obstacles: list[tuple[float, float, float, float]], bg: np.ndarray) -> list[SceneWord]:
    """Words placed apart from the objects and each other (required first; others are dropped
    when they do not fit). Ink is black or white, whichever contrasts with the background."""
    W, H = config.width, config.height
    gap = max(2.0, config.short_side / 100.0)
    base = word_scale(config)
    words: list[SceneWord] = []
    boxes = list(obstacles)
    for n, text in enumerate(texts):
        scale = base + rng.randint(0, 1)
        bitmap = render.word_bitmap(text, scale)
        h, w = bitmap.shape
        cols = np.flatnonzero(bitmap.any(axis=0))  # a glyph may start or end with an empty column
        placed = False
        for _ in range(60 if W - w >= 4 and H - h >= 4 else 0):
            x, y = rng.randint(2, W - w - 2), rng.randint(2, H - h - 2)
            box = (x + int(cols[0]), y, x + int(cols[-1]) + 1, y + h)
            if all(_boxes_apart(box, b, gap) for b in boxes):
                ink = 0 if bg[y:y + h, x:x + w].mean() > 127.5 else 255
                words.append(SceneWord(text=text, x=x, y=y, scale=scale, ink=ink, box=box))
                boxes.append(box)
                placed = True
                break
        if not placed and n < n_required:
            raise Unsatisfiable("no room for a word")
    return words


def build_scene(rng: random.Random, config: SceneConfig, split: str, seed: int, *,
                required: Sequence[Spec] = (), forbid: Callable[[Kind], bool] | None = None,
                n_objects: int | None = None, n_words: int | None = None,
                words: Sequence[str] = ()) -> tuple[Scene, list[int]]:
    """A scene holding the `required` objects plus distractors for which `forbid` is false.

    n_objects: total object count (default: uniform in [min_objects, max_objects], at least the
    required count). n_words: total word count (default: by p_words / max_words); `words` are
    texts that must appear. Returns the scene and the object index of each required spec.
    Raises Unsatisfiable when this draw fails (the caller draws again with another seed).
    """
    if n_objects is None:
        lo = max(len(required), config.min_objects)
        if lo > config.max_objects:
            raise Unsatisfiable("more required objects than max_objects")
        n_objects = rng.randint(lo, config.max_objects)
    if n_objects < len(required):
        raise Unsatisfiable("n_objects below the required count")
    kinds = _kinds_for(rng, split, required, n_objects - len(required), forbid)
    if len(kinds) > max(config.max_objects, n_objects):
        raise Unsatisfiable("too many objects")
    # Random drawing order, so a required object is not always at the bottom.
    order = list(range(len(kinds)))
    rng.shuffle(order)
    kinds = [kinds[i] for i in order]
    position = {src: dst for dst, src in enumerate(order)}
    objects, rasters = _place_objects(rng, config, kinds)

    background = _sample_background(rng, config)
    bg = background.array(config.width, config.height)
    if n_words is None:
        n_words = rng.randint(1, config.max_words) if config.max_words and rng.random() < config.p_words else 0
    texts = list(words)
    others = [w for w in WORDS if w not in texts]
    while len(texts) < n_words:
        texts.append(others.pop(rng.randrange(len(others))))
    obstacles = [(o.box[0], o.box[1], o.box[2], o.box[3]) for o in objects]
    placed_words = _place_words(rng, config, texts, len(words), obstacles, bg)

    specks: list[Speck] = []
    if config.clutter:
        side = max(2, round(config.short_side / 100))
        dark = background.mean_level > 127.5
        for _ in range(config.clutter):
            grey = rng.randint(0, 60) if dark else rng.randint(195, 255)
            side_i = side + rng.randint(0, 1)
            specks.append((rng.randint(0, config.width - side_i), rng.randint(0, config.height - side_i), side_i, grey))

    scene = Scene(width=config.width, height=config.height, background=background, objects=objects,
                  words=placed_words, specks=specks, seed=seed, split=split)
    scene._cache["rasters"] = rasters
    scene._cache["background"] = bg
    return scene, [position[i] for i in range(len(required))]


def describe_kind(k: Kind | SceneObject, attrs: Sequence[str] = ATTRIBUTES) -> str:
    """Noun phrase of the given attributes, in the fixed order size, colour, shape ("object" if no shape)."""
    words = [getattr(k, a) for a in ATTRIBUTES if a in attrs and a != "shape"]
    words.append(k.shape if "shape" in attrs else "object")
    return " ".join(words)


__all__ = [
    "ALL_KINDS", "ATTRIBUTES", "BACKGROUNDS", "COLORS", "COLOR_NAMES", "HELD_OUT", "MAX_ROTATION", "PRESETS",
    "SHAPES", "SIZES", "SPLITS", "WORDS", "Background", "Kind", "Scene", "SceneConfig", "SceneObject",
    "SceneWord", "Spec", "Unsatisfiable", "allowed_kinds", "build_scene", "derive_seed", "describe_kind",
    "is_held_out", "split_of", "split_seed",
]
