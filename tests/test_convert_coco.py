"""COCO / Flickr30k conversion end to end on the inline executor (no Ray): exact report counts, verify, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convert_fixtures import ALL_FILES, GOOD_FILES, awkward_images, coco_official
from vlptune.cli import main
from vlptune.data.convert.captioned import parse_coco_official, parse_karpathy
from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.pipeline import STATE_DIR, ConversionInterrupted, ConvertOptions, convert
from vlptune.data.convert.report import REPORT_NAME
from vlptune.data.schema import DataError
from vlptune.data.shards import MANIFEST_NAME, decode_image, iter_records, read_manifest, verify

SMALL = ImageOptions(max_short_side=96, max_long_side=160)


def options(out: Path, **kw) -> ConvertOptions:
    base = {"images": SMALL, "shard_size": 3, "executor": "inline", "max_bad_fraction": 0.5}
    return ConvertOptions(out=out, **{**base, **kw})


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    base = tmp_path_factory.mktemp("coco")
    files, images = coco_official(base)
    out = base / "out"
    summary = convert(parse_coco_official(files, images), options(out))
    return {"base": base, "files": files, "images": images, "out": out, "summary": summary}


def test_coco_official_report_counts_are_exact(coco):
    report = json.loads((coco["out"] / REPORT_NAME).read_text())
    bad = {reason: v["count"] for reason, v in report["bad"].items()}
    assert bad == {
        "duplicate_id": 1,  # plain_0 listed twice
        "empty_caption": 1,  # "   "
        "unknown_image": 1,  # a caption of image 999
        "missing_file": 1,
        "zero_byte_image": 1,
        "truncated_image": 1,
        "image_too_small": 1,
    }
    assert report["inputs"] == {"images": 13, "captions": 27}  # 12 listed + the duplicate; 2 per image + 3 extra
    assert report["fixes"] == {
        "exif_rotated": 1,
        "extension_mismatch": 1,
        "mode_converted": 2,
        "reencoded_from_other_format": 3,
        "resized": 1,
        "sixteen_bit": 1,
    }
    assert report["bad"]["missing_file"]["examples"][0].startswith("coco-111")
    assert coco["summary"]["images_stored"] == len(GOOD_FILES) == 8


def test_coco_official_shards_verify_and_hold_the_records(coco):
    out = coco["out"]
    assert verify(out) == []
    manifest = read_manifest(out)
    assert manifest["counts"]["image_text"] == {"train": 6, "val": 2}  # val: plain_1, cmyk (zero.jpg dropped)
    assert manifest["counts"]["retrieval"] == {"val": 4}  # 2 captions each
    assert manifest["source"]["name"] == "coco" and manifest["images"]["max_short_side"] == 96
    records = {r["image_id"]: r for r in iter_records(out, "image_text")}
    assert sorted(records) == sorted(f"coco-{100 + ALL_FILES.index(n)}" for n in GOOD_FILES)
    plain = records[f"coco-{100 + ALL_FILES.index('plain_0.jpg')}"]
    assert plain["captions"] == ["a photo of plain_0 number one", "another view of plain_0", "un café à Zürich, très ☕ bon"]
    assert all(plain["phrases"]) and all(
        cap[p["start"] : p["end"]] == p["text"] for cap, ph in zip(plain["captions"], plain["phrases"]) for p in ph
    )  # spaCy's noun chunks
    for record in records.values():
        image = decode_image(record["image"], record["image_id"])
        assert image.size == (record["width"], record["height"]) and min(image.size) <= 96
    assert (out / "convert.log").is_file() and not (out / STATE_DIR).exists()


def test_the_cli_converts_and_verify_passes(coco, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["data", "convert", "coco", "--annotations", *map(str, coco["files"]), "--images", str(coco["images"]), "--out", str(out)]
    small = ["--max-short-side", "96", "--max-long-side", "160", "--shard-size", "3", "--executor", "inline", "--max-bad-fraction", "0.5", "--quiet"]
    assert main(args + small) == 0
    printed = capsys.readouterr().out
    assert "truncated_image" in printed and "8 images stored of 12 read" in printed
    assert shard_bytes(out) == shard_bytes(coco["out"])  # same bytes as the API
    assert main(["data", "verify", str(out)]) == 0
    # the default --max-bad-fraction (5%) refuses this fixture (7 of 40 records dropped), exit 2, report written, no manifest
    again = tmp_path / "strict"
    assert main(args[:-1] + [str(again)] + small[:-3] + ["--quiet"]) == 2
    assert "more than --max-bad-fraction 5.0%" in capsys.readouterr().err
    assert (again / REPORT_NAME).is_file() and not (again / MANIFEST_NAME).exists()


def test_bad_inputs_exit_2_with_the_file_named(coco, tmp_path, capsys):
    assert main(["data", "convert", "coco", "--annotations", str(tmp_path / "captions_train2014.json"), "--images", ".", "--out", str(tmp_path / "o")]) == 2
    assert "captions_train2014.json: COCO captions file not found" in capsys.readouterr().err
    broken = tmp_path / "captions_val2014.json"
    broken.write_text(json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": []}))
    assert main(["data", "convert", "coco", "--annotations", str(broken), "--images", ".", "--out", str(tmp_path / "o")]) == 2
    assert "images[0]: missing field(s) ['id']" in capsys.readouterr().err
    assert main(["data", "convert", "coco", "--annotations", *map(str, coco["files"]), "--images", ".", "--out", str(coco["out"])]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err


def test_a_resumed_conversion_is_byte_identical_to_an_uninterrupted_one(coco, tmp_path):
    parsed = parse_coco_official(coco["files"], coco["images"])
    out = tmp_path / "resumed"
    with pytest.raises(ConversionInterrupted):
        convert(parsed, options(out, stop_after_shards=2))
    assert not (out / MANIFEST_NAME).exists() and len(list(out.rglob("*.parquet"))) == 2  # unfinished: readers refuse it
    assert verify(out)[0].endswith("manifest not found (the directory exists but has no manifest: an unfinished write?)")
    summary = convert(parse_coco_official(coco["files"], coco["images"]), options(out, resume=True))
    assert summary["resumed_shards"] == 2
    assert shard_bytes(out) == shard_bytes(coco["out"])
    assert (out / REPORT_NAME).read_text().split('"inputs"')[1] == (coco["out"] / REPORT_NAME).read_text().split('"inputs"')[1]
    with pytest.raises(DataError, match="nothing to resume"):
        convert(parsed, options(out, resume=True))


def test_resume_with_other_options_is_refused(coco, tmp_path):
    out = tmp_path / "other"
    with pytest.raises(ConversionInterrupted):
        convert(parse_coco_official(coco["files"], coco["images"]), options(out, stop_after_shards=1))
    with pytest.raises(DataError, match="used other inputs or options"):
        convert(parse_coco_official(coco["files"], coco["images"]), options(out, resume=True, shard_size=4))


def _karpathy(base: Path, dataset: str) -> Path:
    awkward_images(base / "imgs" / "val2014")
    images = []
    for i, name in enumerate(["plain_0.jpg", "plain_1.jpg", "big.jpg", "cmyk.jpg", "rotated.jpg", "png_named.jpg"]):
        split = ["train", "restval", "val", "test", "restval", "test"][i]
        entry = {"filepath": "val2014", "filename": name, "split": split, "sentences": [{"raw": f"caption {k} of {name}"} for k in range(6)]}
        entry["cocoid" if dataset == "coco" else "imgid"] = 500 + i
        images.append(entry)
    path = base / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


def test_karpathy_splits_with_restval_into_train(tmp_path):
    path = _karpathy(tmp_path, "coco")
    parsed = parse_karpathy(path, tmp_path / "imgs", "coco", restval_into="train")
    assert [t.split for t in parsed.tasks] == ["train", "train", "val", "test", "train", "test"]
    summary = convert(parsed, options(tmp_path / "out", shard_size=8))
    assert summary["counts"]["image_text"] == {"test": 2, "train": 3, "val": 1}
    assert summary["counts"]["retrieval"] == {"test": 10, "val": 5}  # 5 captions per val/test image, not 6
    kept = parse_karpathy(path, tmp_path / "imgs", "coco")
    assert [t.split for t in kept.tasks].count("restval") == 2
    assert kept.tasks[0].image_id == "coco-500"


def test_flickr30k_ids_are_the_file_stems(tmp_path):
    parsed = parse_karpathy(_karpathy(tmp_path, "flickr30k"), tmp_path / "imgs", "flickr30k")
    assert [t.image_id for t in parsed.tasks][:2] == ["flickr30k-plain_0", "flickr30k-plain_1"]
    assert verify(convert(parsed, options(tmp_path / "f30k"))["out_dir"]) == []


def test_schema_version_1_datasets_still_read_and_a_newer_one_is_refused(coco, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from vlptune.data.shards import sha256_file, write_manifest

    old = tmp_path / "v1"
    shutil.copytree(coco["out"], old)
    manifest = read_manifest(old)
    for entries in manifest["shards"]["image_text"].values():
        for entry in entries:  # a version-1 shard: without the column version 2 added
            path = old / entry["path"]
            pq.write_table(pq.read_table(path).drop_columns(["caption_boxes"]), path)
            entry["sha256"] = sha256_file(path)
    write_manifest(old, {**manifest, "schema_version": 1})
    assert verify(old) == []
    records = list(iter_records(old, "image_text"))
    assert len(records) == 8 and all(r["caption_boxes"] is None for r in records)
    write_manifest(old, {**manifest, "schema_version": 3})
    with pytest.raises(DataError, match="field 'schema_version' is 3; this vlptune reads schema versions 1, 2"):
        read_manifest(old)
