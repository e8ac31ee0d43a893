"""The synthetic world: determinism, truthful captions, boxes on their pixels, downstream records."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from vlptune.data import captions, downstream, scenes, shards, synth
from vlptune.data.phrases import PhraseExtractor
from vlptune.data.schema import (
    TABLE_IMAGE_TEXT,
    TABLE_NLVR2,
    TABLE_RETRIEVAL,
    TABLE_VE,
    TABLE_VQA,
    TABLES,
    DataError,
)

SIZE = 64
N_TRAIN, N_VAL, N_TEST = 70, 24, 16  # 70 > CHUNK_IMAGES: two chunks, so two workers share it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "w"
    summary = synth.make_world(root, train=N_TRAIN, val=N_VAL, test=N_TEST, image_size=SIZE, seed=3, shard_size=32)
    return root, summary


@pytest.fixture(scope="module")
def records(world):
    return list(shards.iter_records(world[0], TABLE_IMAGE_TEXT))


# ---------------------------------------------------------------------------
# an independent reader of the captions: what they claim about the objects
# ---------------------------------------------------------------------------

SIZE_WORDS = {w: s for s, ws in captions.SIZE_SYNONYMS.items() for w in ws}
NOUN_SHAPE = {w: s for s, ws in captions.SHAPE_SYNONYMS.items() for w in ws}
NOUN_SHAPE.update({captions.PLURALS[w]: s for w, s in list(NOUN_SHAPE.items())})
NUMBERS = {w: i for i, w in enumerate(captions.NUMBER_WORDS)}
_alt = lambda words: "|".join(sorted(map(re.escape, words), key=len, reverse=True))
DESC = (
    rf"(?:({_alt(SIZE_WORDS)}) )?(?:({_alt(scenes.COLOUR_NAMES)}) )?"
    rf"({_alt(NOUN_SHAPE)})\b"
)
REL_WORDS = {p: r for r, ps in captions.RELATION_PHRASES.items() for p in ps}
POS_WORDS = {p: w for w, ps in captions.POSITION_PHRASES.items() for p in ps}
RELATION_RE = re.compile(rf"\b(a|an|the) {DESC} (?:is )?({_alt(REL_WORDS)}) (a|an|the) {DESC}")
POSITION_RE = re.compile(rf"\b(a|an|the) {DESC} (?:is )?({_alt(POS_WORDS)})\b")
MENTION_RE = re.compile(rf"\b(a|an|the) {DESC}")
COUNT_RE = re.compile(
    rf"\b({_alt(NUMBERS)}|a single|just one|exactly one) (?:({_alt(scenes.COLOUR_NAMES)}) )?"
    rf"({_alt(list(NOUN_SHAPE) + ['objects', 'object', 'shapes', 'shape'])})\b"
)


def obj_view(obj: dict, attributes: list[str]) -> dict:
    names = {attributes[a] for a in obj["attributes"]}
    return {
        "shape": obj["name"],
        "colour": next(n for n in names if n in scenes.COLOURS),
        "size": next(n for n in names if n in scenes.SIZES),
        "box": obj["box"],
    }


def matches(o: dict, size_word, colour, noun) -> bool:
    return o["shape"] == NOUN_SHAPE[noun] and (colour is None or o["colour"] == colour) and (size_word is None or o["size"] == SIZE_WORDS[size_word])


def holds(a, rel, b) -> bool:
    ax0, ay0, ax1, ay1 = a["box"]
    bx0, by0, bx1, by1 = b["box"]
    return {"left": ax1 <= bx0, "right": ax0 >= bx1, "above": ay1 <= by0, "below": ay0 >= by1}[rel]


def check_caption(caption: str, objs: list[dict], width: int, height: int) -> list[str]:
    """Claims of `caption` that are false of `objs`; [] when all hold. Raises if no claim found."""
    false, claims = [], 0
    for m in MENTION_RE.finditer(caption):
        claims += 1
        art, size_w, colour, noun = m.groups()
        found = [o for o in objs if matches(o, size_w, colour, noun)]
        if not found or (art == "the" and len(found) != 1):
            false.append(f"mention {m.group(0)!r}: {len(found)} matching objects")
    for m in RELATION_RE.finditer(caption):
        claims += 1
        _, s1, c1, n1, rel, _, s2, c2, n2 = m.groups()
        if not any(holds(a, REL_WORDS[rel], b) for a in objs if matches(a, s1, c1, n1) for b in objs if b is not a and matches(b, s2, c2, n2)):
            false.append(f"relation {m.group(0)!r}")
    for m in POSITION_RE.finditer(caption):
        claims += 1
        _, s, c, n, where = m.groups()
        half = {
            "left": lambda o: o["box"][2] <= width / 2,
            "right": lambda o: o["box"][0] >= width / 2,
            "top": lambda o: o["box"][3] <= height / 2,
            "bottom": lambda o: o["box"][1] >= height / 2,
        }[POS_WORDS[where]]
        if not any(half(o) for o in objs if matches(o, s, c, n)):
            false.append(f"position {m.group(0)!r}")
    for m in COUNT_RE.finditer(caption):
        claims += 1
        number, colour, noun = m.groups()
        n = NUMBERS.get(number, 1)
        shape = NOUN_SHAPE.get(noun)
        count = sum((shape is None or o["shape"] == shape) and (colour is None or o["colour"] == colour) for o in objs)
        if count != n:
            false.append(f"count {m.group(0)!r}: there are {count}")
    if claims == 0:
        raise AssertionError(f"no claim recognised in caption {caption!r}")
    return false


def scene_objs(scene: scenes.Scene) -> list[dict]:
    return [{"shape": o.shape, "colour": o.colour, "size": o.size, "box": list(o.box)} for o in scene.objects]


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_summary_counts_match_manifest_and_tables(world):
    root, summary = world
    manifest = shards.read_manifest(root)
    assert summary["counts"] == manifest["counts"]
    assert manifest["counts"]["image_text"] == {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}
    assert manifest["counts"]["nlvr2"] == {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}
    assert manifest["counts"]["ve"] == {"train": 3 * N_TRAIN, "val": 3 * N_VAL, "test": 3 * N_TEST}
    assert set(manifest["counts"]["retrieval"]) == {"val", "test"}
    for table in TABLES:
        for split, n in manifest["counts"][table].items():
            assert shards.read_table(root, table, split).num_rows == n
    assert manifest["vocabularies"]["classes"] == list(scenes.SHAPES)
    assert manifest["vocabularies"]["roi_feature_dim"] == 32
    assert shards.verify(root) == []
    assert 0 < summary["phrase_cache"]["hit_rate"] < 1


def test_same_seed_same_bytes_whatever_the_workers_and_other_seed_differs(world, tmp_path):
    root, _ = world
    again = tmp_path / "again"
    synth.make_world(again, train=N_TRAIN, val=N_VAL, test=N_TEST, image_size=SIZE, seed=3, shard_size=32, workers=2)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) > len(TABLES)
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other"
    synth.make_world(other, train=8, val=0, image_size=SIZE, seed=4)
    a = list(shards.iter_records(root, TABLE_IMAGE_TEXT, "train"))[:8]
    b = list(shards.iter_records(other, TABLE_IMAGE_TEXT, "train"))
    assert [r["image"] for r in a] != [r["image"] for r in b]
    assert sum(ra["captions"] != rb["captions"] for ra, rb in zip(a, b)) >= 6


def test_captions_are_true_of_their_image(records, world):
    attributes = shards.read_manifest(world[0])["vocabularies"]["attributes"]
    for rec in records:
        objs = [obj_view(o, attributes) for o in rec["objects"]]
        assert len(rec["captions"]) == synth.DEFAULT_CAPTIONS_PER_IMAGE
        assert len(set(rec["captions"])) == len(rec["captions"])
        for cap in rec["captions"]:
            assert check_caption(cap, objs, rec["width"], rec["height"]) == [], (rec["image_id"], cap)


def test_captions_true_over_many_scenes_and_varied():
    kinds = Counter()
    left_right = total = 0
    for i in range(400):
        scene = scenes.sample_scene(11, "train", i, 96)
        for cap in captions.make_captions(scene, 5):
            total += 1
            left_right += bool(re.search(r"\b(left|right)\b", cap))
            assert check_caption(cap, scene_objs(scene), scene.width, scene.height) == [], cap
            kinds.update(k for k, r in (("relation", RELATION_RE), ("position", POSITION_RE), ("count", COUNT_RE)) if r.search(cap))
    assert min(kinds.values()) > 0.08 * total, kinds
    assert left_right > 0.15 * total  # description-aware flip has something to protect


def test_the_checker_catches_false_captions():
    objs = [
        {"shape": "circle", "colour": "red", "size": "big", "box": [0, 0, 10, 10]},
        {"shape": "square", "colour": "blue", "size": "small", "box": [20, 0, 30, 10]},
    ]
    assert check_caption("a red circle to the left of a blue square", objs, 40, 20) == []
    assert check_caption("a red circle to the right of a blue square", objs, 40, 20)
    assert check_caption("two blue squares", objs, 40, 20)
    assert check_caption("a tiny red disc", objs, 40, 20)
    assert check_caption("the blue block is on the left", objs, 40, 20)
    assert check_caption("there are three objects in the picture", objs, 40, 20)


def test_images_sizes_and_aspect_ratios(records):
    shapes = set()
    for rec in records:
        image = shards.decode_image(rec["image"], rec["image_id"])
        assert image.size == (rec["width"], rec["height"])
        assert min(image.size) == SIZE
        shapes.add(image.size)
    assert len(shapes) >= 3  # batches get different sizes


def test_boxes_inside_the_image_and_on_their_objects_pixels(records):
    for rec in records:
        seg = shards.decode_segmentation(rec["segmentation"], rec["image_id"])
        pixels = np.asarray(shards.decode_image(rec["image"], rec["image_id"])).astype(int)
        assert seg.shape == (rec["height"], rec["width"])
        labels = {o["label"] for o in rec["objects"]}
        assert set(np.unique(seg)) == {0} | {1 + lab for lab in labels}
        assert 1 <= len(rec["objects"]) <= 4
        for o in rec["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= rec["width"] and 0 <= y0 < y1 <= rec["height"], o
            window = seg[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
            # the thinnest shape (a star) fills ~1/3 of its box; 0.2 leaves room for pixels
            assert (window == 1 + o["label"]).mean() > 0.2, (rec["image_id"], o["name"])
            outside = np.ones_like(seg, dtype=bool)
            outside[max(0, int(y0) - 1) : int(np.ceil(y1)) + 1, max(0, int(x0) - 1) : int(np.ceil(x1)) + 1] = False
            others = [p for p in rec["objects"] if p is not o and p["label"] == o["label"]]
            if not others:  # its class appears nowhere outside its box
                assert not (seg[outside] == 1 + o["label"]).any(), (rec["image_id"], o["name"])
            # the image shows the object's colour where the map shows its class
            colour = next(scenes.ATTRIBUTES[a] for a in o["attributes"] if scenes.ATTRIBUTES[a] in scenes.COLOURS)
            box_pixels = pixels[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
            under = box_pixels[window == 1 + o["label"]]
            error = np.abs(np.median(under, axis=0) - scenes.COLOURS[colour]).max()
            assert error <= scenes.OBJECT_COLOUR_JITTER + 1, (rec["image_id"], o["name"], colour)


def test_objects_fields_and_roi_features(records):
    by_kind: dict[tuple, list[np.ndarray]] = {}
    for rec in records:
        for o in rec["objects"]:
            assert o["name"] == scenes.SHAPES[o["label"]]
            assert len(o["attributes"]) == 2
            assert len(o["roi_feature"]) == 32
            key = (o["label"], tuple(o["attributes"]))
            by_kind.setdefault(key, []).append(np.asarray(o["roi_feature"]))
    kinds = list(by_kind)
    same = [np.linalg.norm(v[0] - v[1]) for v in by_kind.values() if len(v) > 1]
    assert same and max(same) < 1.0  # noise only
    diff = [np.linalg.norm(by_kind[a][0] - by_kind[b][0]) for a in kinds for b in kinds if a[0] != b[0]]
    assert min(diff) > 2.0  # different classes are far apart


def test_noun_phrases_are_spans_of_their_caption(records):
    covered = total = 0
    for rec in records:
        assert len(rec["phrases"]) == len(rec["captions"])
        for cap, phrases in zip(rec["captions"], rec["phrases"]):
            last_end = 0
            for p in phrases:
                assert cap[p["start"] : p["end"]] == p["text"]
                assert p["start"] >= last_end and p["tok_start"] < p["tok_end"]
                assert len(cap[: p["start"]].split()) <= p["tok_start"]
                last_end = p["end"]
            for m in MENTION_RE.finditer(cap):
                total += 1
                noun = 4  # regex group of the shape noun
                covered += any(p["start"] <= m.start(noun) and m.end(noun) <= p["end"] for p in phrases)
    assert covered >= 0.95 * total  # object mentions become noun phrases


def test_phrase_cache_parses_each_distinct_caption_once():
    extractor = PhraseExtractor()
    first = extractor.phrases([["a red circle", "a blue square"], ["a red circle"]])
    assert extractor.stats()["misses"] == 2 and extractor.stats()["hits"] == 1
    second = extractor.phrases([["a blue square"]])
    assert extractor.stats()["misses"] == 2 and extractor.stats()["hits"] == 2
    assert first[0][0] == [{"text": "a red circle", "start": 0, "end": 12, "tok_start": 0, "tok_end": 3}]
    assert second[0][0] == first[0][1]


def test_vqa_answers_are_correct(world, records):
    by_id = {r["image_id"]: r for r in records}
    vqa = list(shards.iter_records(world[0], TABLE_VQA))
    assert len(vqa) >= 3 * len(records)
    yes_no = Counter()
    for q in vqa:
        objs = by_id[q["image_id"]]["objects"]
        answers = q["answers"]
        assert answers[0]["score"] == 1.0 and all(0 < a["score"] < 1 for a in answers[1:])
        main = answers[0]["answer"]
        text = q["question"]
        if text == "how many objects are in the image?":
            assert int(main) == len(objs)
        elif m := re.match(r"how many (\w+) objects are in the picture\?", text):
            colour_idx = scenes.ATTRIBUTES.index(m.group(1))
            assert int(main) == sum(colour_idx in o["attributes"] for o in objs)
        elif m := re.match(r"how many ([\w ]+) are there\?", text):
            noun = m.group(1)
            want = len(objs) if noun == "shapes" else sum(o["name"] == NOUN_SHAPE[noun] for o in objs)
            assert int(main) == want, text
        elif m := re.search(r"(?:is there an?|are there any) (\w+) ([\w ]+)\?", text):
            colour_idx = scenes.ATTRIBUTES.index(m.group(1))
            exists = any(o["name"] == NOUN_SHAPE[m.group(2)] and colour_idx in o["attributes"] for o in objs)
            assert main == ("yes" if exists else "no"), text
            yes_no[main] += 1
        elif m := re.search(r"colour (?:is|of|does) the ([\w ]+?)(?: have)?\?", text):
            target = [o for o in objs if o["name"] == NOUN_SHAPE[m.group(1)]]
            assert len(target) == 1
            assert scenes.ATTRIBUTES.index(main) in target[0]["attributes"]
        elif m := re.search(r"(?:the|is) (\w+)(?: object| shape)?\?", text):
            assert m.group(1) in scenes.COLOURS, text
            colour_idx = scenes.ATTRIBUTES.index(m.group(1))
            target = [o for o in objs if colour_idx in o["attributes"]]
            assert len(target) == 1 and target[0]["name"] == main, text
        else:
            raise AssertionError(f"unrecognised question {text!r}")
    assert yes_no["yes"] > 0.25 * sum(yes_no.values()) and yes_no["no"] > 0.25 * sum(yes_no.values())


def test_ve_has_one_hypothesis_per_label_and_contradictions_are_false(world, records):
    attributes = shards.read_manifest(world[0])["vocabularies"]["attributes"]
    by_id = {r["image_id"]: r for r in records}
    labels = Counter()
    per_image: dict[str, list[int]] = {}
    for rec in shards.iter_records(world[0], TABLE_VE):
        per_image.setdefault(rec["image_id"], []).append(rec["label"])
        labels[rec["label"]] += 1
        img = by_id[rec["image_id"]]
        objs = [obj_view(o, attributes) for o in img["objects"]]
        hyp = rec["hypothesis"]
        if rec["label"] == 0:
            assert check_caption(hyp, objs, img["width"], img["height"]) == [], hyp
        elif rec["label"] == 2 and (m := re.match(r"the (\w+) is (\w+)$", hyp)):
            target = [o for o in objs if o["shape"] == NOUN_SHAPE[m.group(1)]]
            assert len(target) == 1 and target[0]["colour"] != m.group(2), hyp
        elif rec["label"] == 2:
            with pytest.raises(AssertionError):
                assert check_caption(hyp, objs, img["width"], img["height"]) == [], hyp
    assert all(sorted(v) == [0, 1, 2] for v in per_image.values())
    assert len(per_image) == len(records)


def test_nlvr2_balanced_and_pairs_valid(world, records):
    ids = {r["image_id"]: r["split"] for r in records}
    rows = list(shards.iter_records(world[0], TABLE_NLVR2))
    assert len(rows) == len(records)
    for r in rows:
        assert r["image_id_left"] != r["image_id_right"]
        assert ids[r["image_id_left"]] == ids[r["image_id_right"]] == r["split"]
    many = [rec for i in range(300) for rec in downstream.make_nlvr2(5, "train", i, 300, 96)]
    share = sum(r["label"] for r in many) / len(many)
    assert 0.4 < share < 0.6, share
    # spot-check one statement family independently
    for r in many:
        if m := re.match(r"the two images show (\w+) shapes in total", r["statement"]):
            left = scenes.sample_scene(5, "train", int(r["image_id_left"].rsplit("-", 1)[1]), 96)
            right = scenes.sample_scene(5, "train", int(r["image_id_right"].rsplit("-", 1)[1]), 96)
            assert r["label"] == (NUMBERS[m.group(1)] == len(left.objects) + len(right.objects))


def test_retrieval_rows_point_at_real_captions(world, records):
    by_id = {r["image_id"]: r for r in records}
    rows = list(shards.iter_records(world[0], TABLE_RETRIEVAL))
    assert {r["split"] for r in rows} == {"val", "test"}
    for r in rows:
        assert by_id[r["image_id"]]["split"] == r["split"]
        assert 0 <= r["caption_index"] < len(by_id[r["image_id"]]["captions"])
    assert len(rows) == (N_VAL + N_TEST) * synth.RETRIEVAL_CAPTIONS_PER_IMAGE


def test_make_world_refuses_a_non_empty_directory_unless_overwriting(world, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        synth.make_world(tmp_path, train=2, val=0, image_size=SIZE)
    root = tmp_path / "w"
    synth.make_world(root, train=4, val=0, image_size=SIZE)
    synth.make_world(root, train=2, val=2, image_size=SIZE, overwrite=True)
    assert shards.read_manifest(root)["counts"]["image_text"] == {"train": 2, "val": 2}
    assert shards.verify(root) == []  # no stale shard of the first world left
    with pytest.raises(DataError, match="image_size must be >= 32"):
        synth.make_world(tmp_path / "tiny", train=1, val=0, image_size=16)


def _share_true_of_other_scenes(style: str, n_scenes: int = 200) -> float:
    """Share of the captions of scene i+1 that are true of scene i (what an in-batch ITM negative looks like)."""
    true = total = 0
    for i in range(n_scenes):
        scene, other = scenes.sample_scene(5, "train", i, 96), scenes.sample_scene(5, "train", i + 1, 96)
        for cap in captions.make_captions(other, 5, style):
            total += 1
            true += check_caption(cap, scene_objs(scene), scene.width, scene.height) == []
    return true / total


def test_descriptive_captions_are_true_name_colours_and_rarely_fit_another_image():
    for i in range(200):
        scene = scenes.sample_scene(5, "train", i, 96)
        for cap in captions.make_captions(scene, 5, "descriptive"):
            assert check_caption(cap, scene_objs(scene), scene.width, scene.height) == [], cap
            assert any(c in cap.split() for c in scenes.COLOUR_NAMES + ("violet",)), cap
    varied, descriptive = _share_true_of_other_scenes("varied"), _share_true_of_other_scenes("descriptive")
    assert descriptive < 0.05 and varied > 3 * descriptive, (descriptive, varied)  # measured: 0.018 vs 0.109
    with pytest.raises(DataError, match="unknown caption style 'terse'"):
        captions.make_captions(scenes.sample_scene(5, "train", 0, 96), 5, "terse")
