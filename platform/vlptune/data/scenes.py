"""Scenes of the synthetic world: their layout, their pixels, their RoI features.

A scene is 1 to 4 coloured shapes (:class:`SceneObject`) on a textured
background, placed by rejection sampling so that boxes barely overlap, with a
background colour far from every object colour (:func:`sample_scene`, no
pixels). :func:`render_scene` draws the RGB image and its segmentation map with
the same geometry; :func:`roi_feature` is the stand-in detector feature of an
object. Every random draw comes from :func:`rng_for`, a stream of
(seed, split, index), so a scene is a pure function of those.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from vlptune.data.schema import DataError

# ---------------------------------------------------------------------------
# the world's vocabulary: shapes, colours, sizes
# ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "heart", "hexagon",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "big")
# attribute vocabulary: colour names then size names; objects carry indices
ATTRIBUTES: tuple[str, ...] = COLOUR_NAMES + SIZES

ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (3, 2))  # width:height

# objects per image and their sizes (box side as a fraction of the shorter side)
OBJECT_COUNT_WEIGHTS: dict[int, float] = {1: 0.2, 2: 0.3, 3: 0.3, 4: 0.2}
SIZE_FRACTION: dict[str, tuple[float, float]] = {"small": (0.18, 0.25), "big": (0.36, 0.46)}
BIG_PROBABILITY = 0.5
MAX_IOU = 0.1  # placement: rejection sampling keeps IoU with every placed box below this
MAX_COVER = 0.15  # ... and the share of either box covered by the other below this
PLACEMENT_TRIES = 60
MARGIN_PX = 1
MAX_ROTATION_DEG: dict[str, float] = {
    "circle": 0.0, "square": 12.0, "triangle": 20.0, "star": 36.0,
    "cross": 15.0, "diamond": 8.0, "heart": 15.0, "hexagon": 30.0,
}
OBJECT_COLOUR_JITTER = 12  # +- per RGB channel

# backgrounds: muted colours far enough from every object colour in the image
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "noise", "gradient", "stripes", "checker")
BACKGROUND_GREY_RANGE = (60, 180)
BACKGROUND_TINT = 28
BACKGROUND_MIN_CONTRAST = 100.0  # RGB distance from every object colour in the image
BACKGROUND_MIN_TEXTURE_CONTRAST = 25.0  # between the two colours of a texture
BACKGROUND_TRIES = 30
TEXTURE_PERIODS_PER_SIDE = (5, 12)  # stripes / checker cells across the shorter side
NOISE_SIGMA: dict[str, float] = {  # per-pixel Gaussian noise (only "noise" is grainy)
    "plain": 0.0, "noise": 16.0, "gradient": 0.0, "stripes": 0.0, "checker": 0.0,
}
NOISE_TILE_SIDE = 1024  # noise is cropped from one fixed tile (images larger than it draw their own)
NOISE_TILE_SEED = 7

# detector RoI stand-in
ROI_PROTOTYPE_SEED = 20240611
ROI_COLOUR_WEIGHT = 0.5
ROI_SIZE_WEIGHT = 0.5
ROI_NOISE_SIGMA = 0.05


# ---------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------


@dataclass
class SceneObject:
    label: int
    shape: str
    colour: str
    size: str
    rgb: tuple[int, int, int]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (float, pixels)
    center: tuple[float, float]
    radius: float  # circle radius or polygon scale
    vertices: list[tuple[float, float]] | None  # None for circles

    @property
    def attributes(self) -> list[int]:
        return [ATTRIBUTES.index(self.colour), ATTRIBUTES.index(self.size)]


@dataclass
class Scene:
    seed: int
    split: str
    index: int
    image_id: str
    width: int
    height: int
    background: str
    background_colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    background_params: dict
    objects: list[SceneObject] = field(default_factory=list)


def image_id_for(split: str, index: int) -> str:
    return f"synth-{split}-{index:07d}"


def rng_for(seed: int, split: str, index: int, stream: str) -> random.Random:
    """The random stream `stream` of image (seed, split, index).

    String seeds are hashed with SHA-512 by `random`, so this is stable
    across processes and Python runs (no PYTHONHASHSEED dependence).
    """
    return random.Random(f"vlptune-synth/{seed}/{split}/{index}/{stream}")


def image_dims(image_size: int, aspect: tuple[int, int]) -> tuple[int, int]:
    """(width, height) with the shorter side = image_size."""
    w, h = aspect
    if w >= h:
        return int(round(image_size * w / h)), image_size
    return image_size, int(round(image_size * h / w))


@functools.lru_cache(maxsize=None)
def unit_shape(shape: str) -> tuple[tuple[float, float], ...]:
    """Polygon vertices of `shape` in [-1, 1]^2 (y down), centred; () for a circle."""
    if shape == "circle":
        return ()
    if shape == "square":
        pts = [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    elif shape == "triangle":
        pts = [(0.0, -0.9), (1.0, 0.9), (-1.0, 0.9)]
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
               (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    elif shape == "heart":
        raw = []
        n = 28
        for k in range(n):
            t = 2 * math.pi * k / n
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            raw.append((x, y))
        xs, ys = [p[0] for p in raw], [p[1] for p in raw]
        cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
        pts = [((x - cx) / half, (y - cy) / half) for x, y in raw]
    elif shape == "hexagon":
        pts = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    else:
        raise DataError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return tuple(pts)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    if inter <= 0:
        return 0.0
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


def _cover(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over the smaller box's area (how much of the smaller one is hidden)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _colour_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def weighted_choice(rnd: random.Random, weights: dict):
    keys = list(weights)
    return rnd.choices(keys, weights=[weights[k] for k in keys])[0]


def _sample_object(rnd: random.Random, width: int, height: int, short: int,
                   placed: list[SceneObject]) -> SceneObject | None:
    label = rnd.randrange(len(SHAPES))
    shape = SHAPES[label]
    colour = rnd.choice(COLOUR_NAMES)
    size = "big" if rnd.random() < BIG_PROBABILITY else "small"
    lo, hi = SIZE_FRACTION[size]
    radius = rnd.uniform(lo, hi) * short / 2
    rot = math.radians(rnd.uniform(-MAX_ROTATION_DEG[shape], MAX_ROTATION_DEG[shape]))
    unit = unit_shape(shape)
    if unit:
        c, s = math.cos(rot), math.sin(rot)
        local = [(radius * (x * c - y * s), radius * (x * s + y * c)) for x, y in unit]
        xs, ys = [p[0] for p in local], [p[1] for p in local]
        ext = (min(xs), min(ys), max(xs), max(ys))
    else:
        local = None
        ext = (-radius, -radius, radius, radius)
    jitter = [rnd.randint(-OBJECT_COLOUR_JITTER, OBJECT_COLOUR_JITTER) for _ in range(3)]
    r, g, b = (int(min(255, max(0, v + j))) for v, j in zip(COLOURS[colour], jitter))
    rgb = (r, g, b)
    lo_x, hi_x = MARGIN_PX - ext[0], width - MARGIN_PX - ext[2]
    lo_y, hi_y = MARGIN_PX - ext[1], height - MARGIN_PX - ext[3]
    if hi_x < lo_x or hi_y < lo_y:
        return None
    for _ in range(PLACEMENT_TRIES):
        cx, cy = rnd.uniform(lo_x, hi_x), rnd.uniform(lo_y, hi_y)
        box = (cx + ext[0], cy + ext[1], cx + ext[2], cy + ext[3])
        if all(_iou(box, o.box) < MAX_IOU and _cover(box, o.box) < MAX_COVER for o in placed):
            vertices = [(cx + x, cy + y) for x, y in local] if local is not None else None
            return SceneObject(label, shape, colour, size, rgb, box, (cx, cy), radius, vertices)
    return None


def _sample_background(rnd: random.Random, objects: list[SceneObject], short: int):
    kind = rnd.choice(BACKGROUND_KINDS)
    object_rgbs = [COLOURS[o.colour] for o in objects]

    def sample_colour():
        best, best_contrast = None, -1.0
        for _ in range(BACKGROUND_TRIES):
            g = rnd.randint(*BACKGROUND_GREY_RANGE)
            col = tuple(
                int(min(255, max(0, g + rnd.randint(-BACKGROUND_TINT, BACKGROUND_TINT))))
                for _ in range(3)
            )
            contrast = min(_colour_distance(col, o) for o in object_rgbs)
            if contrast >= BACKGROUND_MIN_CONTRAST:
                return col
            if contrast > best_contrast:
                best, best_contrast = col, contrast
        return best  # the most contrasted of the tries

    c1 = sample_colour()
    c2 = c1
    if kind in ("gradient", "stripes", "checker"):
        for _ in range(BACKGROUND_TRIES):
            c2 = sample_colour()
            if _colour_distance(c1, c2) >= BACKGROUND_MIN_TEXTURE_CONTRAST:
                break
    params = {
        "orientation": rnd.choice(("horizontal", "vertical", "diagonal")),
        "period": max(2, short // rnd.randint(*TEXTURE_PERIODS_PER_SIDE)),
        "noise_seed": rnd.getrandbits(64),
    }
    return kind, (c1, c2), params


def sample_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
    """The layout of image (seed, split, index): size, background, objects (no pixels)."""
    rnd = rng_for(seed, split, index, "scene")
    width, height = image_dims(image_size, rnd.choice(ASPECT_RATIOS))
    short = min(width, height)
    n = weighted_choice(rnd, OBJECT_COUNT_WEIGHTS)
    objects: list[SceneObject] = []
    for _ in range(n):
        obj = _sample_object(rnd, width, height, short, objects)
        if obj is not None:
            objects.append(obj)
    if not objects:  # cannot happen for sane sizes; keep the invariant explicit
        raise DataError(f"{image_id_for(split, index)}: no object fits a {width}x{height} image")
    kind, colours, params = _sample_background(rnd, objects, short)
    return Scene(seed, split, index, image_id_for(split, index), width, height,
                 kind, colours, params, objects)


# ---------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    """A fixed tile of standard-normal noise; images take seeded crops of it (fast)."""
    rng = np.random.default_rng(NOISE_TILE_SEED)
    return rng.standard_normal((NOISE_TILE_SIDE, NOISE_TILE_SIDE, 3), dtype=np.float32)


def _background_pixels(scene: Scene) -> np.ndarray:
    h, w = scene.height, scene.width
    c1 = np.asarray(scene.background_colours[0], dtype=np.float32)
    c2 = np.asarray(scene.background_colours[1], dtype=np.float32)
    p = scene.background_params
    kind = scene.background
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    if kind == "gradient":
        if p["orientation"] == "horizontal":
            t = np.broadcast_to(xs / max(1, w - 1), (h, w))
        elif p["orientation"] == "vertical":
            t = np.broadcast_to(ys / max(1, h - 1), (h, w))
        else:
            t = (xs + ys) / max(1, w + h - 2)
        pixels = c1 + t[..., None] * (c2 - c1)
    elif kind in ("stripes", "checker"):
        period = p["period"]
        if kind == "checker":
            mask = ((xs // period) + (ys // period)) % 2 == 1
        elif p["orientation"] == "horizontal":
            mask = np.broadcast_to((xs // period) % 2 == 1, (h, w))
        elif p["orientation"] == "vertical":
            mask = np.broadcast_to((ys // period) % 2 == 1, (h, w))
        else:
            mask = ((xs + ys) // period) % 2 == 1
        pixels = np.where(mask[..., None], c2, c1)
    else:
        pixels = np.broadcast_to(c1, (h, w, 3))
    sigma = NOISE_SIGMA[kind]
    if sigma > 0:
        if h <= NOISE_TILE_SIDE and w <= NOISE_TILE_SIDE:
            oy = p["noise_seed"] % (NOISE_TILE_SIDE - h + 1)
            ox = (p["noise_seed"] // NOISE_TILE_SIDE) % (NOISE_TILE_SIDE - w + 1)
            noise = _noise_tile()[oy:oy + h, ox:ox + w]
        else:
            rng = np.random.default_rng(p["noise_seed"])
            noise = rng.standard_normal((h, w, 3), dtype=np.float32)
        pixels = np.clip(pixels + sigma * noise, 0, 255)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def render_scene(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """(RGB image, uint8 segmentation map) drawn with the same geometry.

    Segmentation values: 0 background, 1 + label for an object (later
    objects are drawn over earlier ones in both).
    """
    image = Image.fromarray(_background_pixels(scene), mode="RGB")
    seg = Image.new("L", (scene.width, scene.height), 0)
    draw_img, draw_seg = ImageDraw.Draw(image), ImageDraw.Draw(seg)
    for obj in scene.objects:
        value = 1 + obj.label
        if obj.vertices is None:
            draw_img.ellipse(obj.box, fill=obj.rgb)
            draw_seg.ellipse(obj.box, fill=value)
        else:
            draw_img.polygon(obj.vertices, fill=obj.rgb)
            draw_seg.polygon(obj.vertices, fill=value)
    return image, np.asarray(seg, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _roi_prototypes(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(ROI_PROTOTYPE_SEED)
    return (
        rng.standard_normal((len(SHAPES), dim)).astype(np.float32),
        rng.standard_normal((len(COLOUR_NAMES), dim)).astype(np.float32),
        rng.standard_normal((len(SIZES), dim)).astype(np.float32),
    )


def roi_feature(obj: SceneObject, dim: int, rnd: random.Random) -> list[float]:
    """Stand-in detector RoI feature: class + colour + size prototypes plus small noise."""
    cls, col, siz = _roi_prototypes(dim)
    base = (cls[obj.label]
            + ROI_COLOUR_WEIGHT * col[COLOUR_NAMES.index(obj.colour)]
            + ROI_SIZE_WEIGHT * siz[SIZES.index(obj.size)])
    noise = np.asarray([rnd.gauss(0.0, ROI_NOISE_SIGMA) for _ in range(dim)], dtype=np.float32)
    return (base + noise).astype(np.float32).tolist()
