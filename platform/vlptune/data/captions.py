"""Captions of the synthetic world: noun phrases for objects, relations, positions, counts.

:func:`make_captions` draws distinct captions that are true of a scene from
the caption kinds of a :class:`CaptionStyle` (an object, a list of objects, a
count, a relation between two objects, a position in the image), each built
from what the scene holds (relations and positions from its boxes:
:func:`relation_holds`, :func:`position_holds`). Pure text from a
:class:`~vlptune.data.scenes.Scene` and its own random stream; no spaCy (noun
phrases are :mod:`vlptune.data.phrases`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from vlptune.data.scenes import Scene, SceneObject, rng_for, weighted_choice
from vlptune.data.schema import DataError

# ---------------------------------------------------------------------------
# words
# ---------------------------------------------------------------------------

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
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "big": ("big", "large"),
}
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a uniform background"),
    "noise": ("a noisy background", "a grainy background"),
    "gradient": ("a gradient background", "a shaded background"),
    "stripes": ("a striped background",),
    "checker": ("a checkered background", "a checkerboard background"),
}

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


# ---------------------------------------------------------------------------
# descriptions, relations, captions
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
    groups: list[tuple[str | None, str | None, int]] = []
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


def relation_sentence(scene: Scene, rnd: random.Random, a: SceneObject, rel: str,
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
    return relation_sentence(scene, rnd, *rnd.choice(rels), style)[0]


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


class CaptionMaker(Protocol):
    """One kind of caption: a sentence true of the scene, or None when the scene has nothing of that kind."""

    def __call__(self, scene: Scene, rnd: random.Random, style: CaptionStyle = ..., /) -> str | None: ...


CAPTION_MAKERS: dict[str, CaptionMaker] = {
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
        kind = weighted_choice(rnd, chosen.kind_weights)
        text = CAPTION_MAKERS[kind](scene, rnd, chosen)
        if text is not None and text not in captions:
            captions.append(text)
    return captions
