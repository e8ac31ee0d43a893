"""Visual Genome conversion (inline executor, no Ray): region captions with boxes, objects, COCO eval images dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert_fixtures import GOOD_FILES, ROTATED_RAW_SIZE, VG_COCO_TEST_ID, vg_id, visual_genome
from vlptune.cli import main
from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.pipeline import ConvertOptions, convert
from vlptune.data.convert.report import REPORT_NAME
from vlptune.data.convert.vg import coco_eval_ids, parse_vg
from vlptune.data.shards import decode_image, iter_records, read_manifest, verify

SMALL = ImageOptions(max_short_side=96, max_long_side=160)


@pytest.fixture(scope="module")
def vg(tmp_path_factory):
    base = tmp_path_factory.mktemp("vg")
    paths = visual_genome(base)
    parsed = parse_vg(
        paths["image_data"], paths["regions"], paths["objects"], paths["images"], paths["attributes"], coco_eval_ids(paths["karpathy"]), max_classes=3
    )
    out = base / "out"
    summary = convert(parsed, ConvertOptions(out=out, images=SMALL, shard_size=4, executor="inline", max_bad_fraction=0.5))
    return {"paths": paths, "out": out, "summary": summary}


def test_vg_report_counts_are_exact(vg):
    report = json.loads((vg["out"] / REPORT_NAME).read_text())
    assert {r: v["count"] for r, v in report["bad"].items()} == {
        "in_coco_eval": 1,  # image 50 (coco_id in COCO test)
        "missing_file": 1,
        "zero_byte_image": 1,
        "truncated_image": 1,
        "image_too_small": 1,
        "empty_caption": 1,  # the "  " phrase of image 1
        "unknown_image": 3,  # two regions and an object of image 777
    }
    # 12 listed + image 50; 2 regions per listed image + the empty one + 2 of image 777 (image 50's are skipped)
    assert report["inputs"] == {"images": 13, "captions": 12 * 2 + 1 + 2, "objects": 12 + 1 + 1}
    assert report["fixes"]["object_outside_vocabulary"] == 1  # the zebra
    assert report["bad"]["in_coco_eval"]["examples"] == [f"vg-50: coco_id {VG_COCO_TEST_ID}"]


def test_vg_records_hold_region_captions_boxes_and_objects(vg):
    out = vg["out"]
    assert verify(out) == []
    manifest = read_manifest(out)
    assert manifest["counts"] == {"image_text": {"train": len(GOOD_FILES)}}  # VG feeds pretraining: no retrieval table
    assert manifest["vocabularies"]["classes"] == ["dog", "cat", "tree"]  # most frequent first, ties by name; lower-cased
    assert manifest["vocabularies"]["attributes"] == ["small", "red"]
    records = {r["image_id"]: r for r in iter_records(out, "image_text")}
    assert sorted(records) == sorted(f"vg-{vg_id(n)}" for n in GOOD_FILES)
    for record in records.values():
        assert len(record["captions"]) == 2 and len(record["caption_boxes"]) == 2
        assert all(len(o["box"]) == 4 and o["name"] in ("dog", "cat", "tree") for o in record["objects"])
    rot = records[f"vg-{vg_id('rotated.jpg')}"]
    image = np.asarray(decode_image(rot["image"], rot["image_id"]).convert("RGB")).astype(int)
    assert image.shape[:2] == (ROTATED_RAW_SIZE[0], ROTATED_RAW_SIZE[1])  # upright: 80 wide, 120 high
    (obj,) = rot["objects"]
    x0, y0, x1, y1 = (int(round(v)) for v in obj["box"])
    inside = image[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]
    assert inside.size and (inside[..., 0] > 180).all() and (inside[..., 2] < 80).all()  # the box lands on the red patch after the rotation
    assert rot["caption_boxes"][0] == obj["box"]  # the region box moved the same way
    assert obj["attributes"] == [manifest["vocabularies"]["attributes"].index("red")]


def test_the_vg_cli_drops_coco_eval_images_and_verify_passes(vg, tmp_path, capsys):
    p = vg["paths"]
    out = tmp_path / "vg"
    args = ["data", "convert", "vg", "--image-data", str(p["image_data"]), "--regions", str(p["regions"]), "--objects", str(p["objects"])]
    args += ["--attributes", str(p["attributes"]), "--images", str(p["images"]), "--drop-coco-eval", str(p["karpathy"]), "--max-classes", "3"]
    args += [
        "--out",
        str(out),
        "--max-short-side",
        "96",
        "--max-long-side",
        "160",
        "--shard-size",
        "4",
        "--executor",
        "inline",
        "--max-bad-fraction",
        "0.5",
        "--quiet",
    ]
    assert main(args) == 0
    assert "in_coco_eval" in capsys.readouterr().out
    assert main(["data", "verify", str(out)]) == 0
    assert sorted(q.name for q in (out / "image_text").iterdir()) == sorted(q.name for q in (vg["out"] / "image_text").iterdir())
