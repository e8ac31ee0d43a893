"""Downstream records of the synthetic world: VQA, visual entailment, NLVR2-style pairs.

:func:`make_vqa` asks one question of each kind a scene allows (colour, shape,
count, existence) with scored answers; :func:`make_ve` makes three hypotheses
per image (entailed, neutral, contradicted); :func:`make_nlvr2` pairs an image
with another of its split under a statement that is true about half of the
time. Each draws from its own random stream of (seed, split, index).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from vlptune.data.captions import (
    CAPTION_KIND_WEIGHTS,
    CAPTION_MAKERS,
    CAPTION_TRIES_PER_CAPTION,
    NUMBER_WORDS,
    PLURALS,
    SHAPE_SYNONYMS,
    describe,
    described_relation_holds,
    refer,
    relation_sentence,
    true_relations,
    with_article,
)
from vlptune.data.scenes import (
    COLOUR_NAMES,
    OBJECT_COUNT_WEIGHTS,
    SHAPES,
    Scene,
    rng_for,
    sample_scene,
    weighted_choice,
)
from vlptune.data.schema import VE_LABELS

COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {"purple": ("violet",)}

VQA_MAIN_SCORE = 1.0
VQA_SYNONYM_SCORE = 0.3
VQA_NUMBER_WORD_SCORE = 0.3
VQA_KINDS: tuple[str, ...] = ("colour", "shape", "count", "existence")
VQA_COUNT_ZERO_P = 0.2
VQA_YES_P = 0.5  # existence questions: share whose answer is yes
OPPOSITE_RELATION = {"left": "right", "right": "left", "above": "below", "below": "above"}
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
        text, da, db = relation_sentence(scene, rnd, a, OPPOSITE_RELATION[rel], b)
        if not described_relation_holds(scene, da, OPPOSITE_RELATION[rel], db):
            return text
        # the descriptions also fit another pair for which the opposite is true
        return _ve_contradiction(scene, rnd)
    obj = rnd.choice(unique_shape)
    wrong_colour = rnd.choice([c for c in COLOUR_NAMES if c != obj.colour])
    return f"the {rnd.choice(SHAPE_SYNONYMS[obj.shape])} is {wrong_colour}"


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
        kind = weighted_choice(rnd, CAPTION_KIND_WEIGHTS)
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
