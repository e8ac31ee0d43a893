"""Detector outputs and VG ground truth as the objects of a converted root (no Ray): scaling, filtering, features, counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from convert_fixtures import ALL_FILES, coco_official, visual_genome
from vlptune.cli import main
from vlptune.data.convert.captioned import parse_coco_official
from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.pipeline import ConvertOptions, convert
from vlptune.data.shards import iter_records, read_manifest, verify

SMALL = ImageOptions(max_short_side=96, max_long_side=160)
PLAIN0, PLAIN1 = 100 + ALL_FILES.index("plain_0.jpg"), 100 + ALL_FILES.index("plain_1.jpg")


@pytest.fixture()
def coco_root(tmp_path):
    files, images = coco_official(tmp_path)
    root = tmp_path / "coco"
    convert(parse_coco_official(files, images), ConvertOptions(out=root, images=SMALL, shard_size=4, executor="inline", max_bad_fraction=0.6, phrases=False))
    return root


def test_detections_are_scaled_filtered_and_carry_their_features(coco_root, tmp_path, capsys):
    lines = [
        {"image_id": f"coco-{PLAIN0}", "width": 192, "height": 128, "boxes": [[20, 20, 100, 60], [0, 0, 10, 10], [50, 50, 50, 80]],
         "labels": [0, 1, 1], "scores": [0.9, 0.1, 0.8], "attributes": [[1], [], []], "feature_offset": 0},
        {"image_id": f"coco-{PLAIN1}", "width": 64, "height": 80, "boxes": [[0, 0, 10, 10]], "labels": [5], "scores": [0.5], "feature_offset": 3},
        {"image_id": "coco-999", "width": 10, "height": 10, "boxes": [], "labels": [], "scores": []},
        {"image_id": f"coco-{PLAIN0}", "width": 1, "height": 1, "boxes": [], "labels": [], "scores": []},
    ]  # fmt: skip
    jsonl = tmp_path / "dets.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n{oops\n")
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    (tmp_path / "attrs.txt").write_text("brown\nsmall\n")
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "feats.npy", features)
    args = ["data", "convert", "detections", "--into", str(coco_root), "--jsonl", str(jsonl), "--classes", str(tmp_path / "classes.txt")]
    args += ["--attribute-names", str(tmp_path / "attrs.txt"), "--features", str(tmp_path / "feats.npy"), "--max-bad-fraction", "1"]
    assert main(args) == 0
    assert "objects on" in capsys.readouterr().out
    assert verify(coco_root) == []
    manifest = read_manifest(coco_root)
    assert manifest["vocabularies"]["classes"] == ["dog", "cat"] and manifest["vocabularies"]["roi_feature_dim"] == 3
    records = {r["image_id"]: r for r in iter_records(coco_root, "image_text")}
    (obj,) = records[f"coco-{PLAIN0}"]["objects"]  # score 0.1 filtered, the empty box counted
    assert obj["box"] == [10.0, 10.0, 50.0, 30.0] and obj["name"] == "dog" and obj["attributes"] == [1]  # the detector saw it at 2x
    assert obj["roi_feature"] == [0.0, 1.0, 2.0]
    assert records[f"coco-{PLAIN1}"]["objects"] == []  # label 5 is outside the 2 classes
    report = json.loads((coco_root / "conversion_report_detections.json").read_text())
    assert {r: v["count"] for r, v in report["bad"].items()} == {"bad_box": 1, "bad_label": 1, "unknown_image": 1, "bad_row": 1, "duplicate_id": 1}
    assert report["inputs"] == {"detections": 5} and report["objects"] == 1
    assert not (coco_root / ".detections").exists()


def test_vg_ground_truth_stands_in_for_a_detector_on_the_coco_images_vg_shows(coco_root, tmp_path):
    paths = visual_genome(tmp_path / "vg")
    image_data = json.loads(paths["image_data"].read_text())
    image_data[0].update(coco_id=PLAIN0, width=192, height=128)  # VG image 1 is COCO's plain_0, seen at 2x
    paths["image_data"].write_text(json.dumps(image_data))
    args = ["data", "convert", "detections", "--into", str(coco_root), "--vg-objects", str(paths["objects"]), "--vg-image-data", str(paths["image_data"])]
    assert main(args + ["--vg-attributes", str(paths["attributes"]), "--max-bad-fraction", "1"]) == 0
    assert verify(coco_root) == []
    manifest = read_manifest(coco_root)
    assert manifest["vocabularies"]["classes"] == ["dog"] and manifest["vocabularies"]["attributes"] == ["small"]
    records = {r["image_id"]: r for r in iter_records(coco_root, "image_text")}
    (obj,) = records[f"coco-{PLAIN0}"]["objects"]
    assert obj["box"] == [1.0, 1.5, 11.0, 6.5] and obj["name"] == "dog" and obj["attributes"] == [0]  # VG's [2, 3, 20, 10] xywh, halved
    assert sum(len(r["objects"]) for r in records.values()) == 1
