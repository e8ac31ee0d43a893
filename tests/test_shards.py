"""Parquet shards: schema round trip, refusal of bad schemas, verify, atomic writes, decoding."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlptune.data import shards
from vlptune.data.schema import (
    IMAGE_TEXT_SCHEMA,
    SCHEMA_VERSION,
    SCHEMAS,
    TABLE_IMAGE_TEXT,
    TABLE_VQA,
    DataError,
    validate_schema,
)

VOCAB = {
    "classes": ["circle", "square"],
    "attributes": ["red", "blue", "small", "big"],
    "segmentation_classes": ["background", "circle", "square"],
    "roi_feature_dim": 4,
}


def png_bytes(w=12, h=8, seed=0):
    rng = np.random.default_rng(seed)
    return shards.encode_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def image_record(i: int, split: str = "train") -> dict:
    seg = np.zeros((8, 12), dtype=np.uint8)
    seg[2:6, 3:9] = 1
    return {
        "image_id": f"img-{split}-{i}",
        "split": split,
        "image": png_bytes(seed=i),
        "width": 12,
        "height": 8,
        "captions": [f"a red circle number {i}", "a circle"],
        "phrases": [
            [{"text": "a red circle number", "start": 0, "end": 19, "tok_start": 0, "tok_end": 4}],
            [{"text": "a circle", "start": 0, "end": 8, "tok_start": 0, "tok_end": 2}],
        ],
        "objects": [
            {"box": [3.0, 2.0, 9.0, 6.0], "label": 0, "name": "circle", "attributes": [0, 3], "roi_feature": [0.5, -1.0, 0.25, float(i)]},
            {"box": [0.5, 0.5, 2.5, 2.5], "label": 1, "name": "square", "attributes": [1], "roi_feature": None},
        ],
        "segmentation": shards.encode_png(seg) if i % 2 == 0 else None,
    }


def vqa_record(i: int, split: str = "train") -> dict:
    return {
        "question_id": f"q{i}",
        "split": split,
        "image_id": f"img-{split}-{i}",
        "question": "what colour is the circle?",
        "answers": [{"answer": "red", "score": 1.0}, {"answer": "crimson", "score": 0.3}],
    }


def write_small(out, n_train=7, n_val=3, shard_size=3):
    with shards.ShardWriter(out, vocabularies=VOCAB, created_by="test", shard_size=shard_size) as w:
        for i in range(n_train):
            w.add(TABLE_IMAGE_TEXT, image_record(i, "train"))
            w.add(TABLE_VQA, vqa_record(i, "train"))
        for i in range(n_val):
            w.add(TABLE_IMAGE_TEXT, image_record(i, "val"))
    return w.manifest


def test_round_trip_preserves_every_field(tmp_path):
    manifest = write_small(tmp_path)
    assert manifest["counts"] == {"image_text": {"train": 7, "val": 3}, "vqa": {"train": 7}}
    assert [e["records"] for e in manifest["shards"]["image_text"]["train"]] == [3, 3, 1]
    got = list(shards.iter_records(tmp_path, TABLE_IMAGE_TEXT, "train"))
    assert len(got) == 7
    for i, rec in enumerate(got):
        want = image_record(i)
        for key in ("image_id", "split", "image", "width", "height", "captions", "phrases", "segmentation"):
            assert rec[key] == want[key], key
        for o_got, o_want in zip(rec["objects"], want["objects"], strict=True):
            assert o_got["box"] == pytest.approx(o_want["box"])
            assert (o_got["label"], o_got["name"], o_got["attributes"]) == (o_want["label"], o_want["name"], o_want["attributes"])
            if o_want["roi_feature"] is None:
                assert o_got["roi_feature"] is None
            else:
                assert o_got["roi_feature"] == pytest.approx(o_want["roi_feature"])
    table = shards.read_table(tmp_path, TABLE_IMAGE_TEXT, "train")
    assert table.schema.equals(IMAGE_TEXT_SCHEMA)
    assert table.num_rows == 7
    assert shards.read_table(tmp_path, TABLE_IMAGE_TEXT).num_rows == 10  # all splits
    vqa = list(shards.iter_records(tmp_path, TABLE_VQA, "train"))
    assert vqa[2]["answers"][1]["answer"] == "crimson"
    assert vqa[2]["answers"][1]["score"] == pytest.approx(0.3)
    assert shards.verify(tmp_path) == []


def test_list_shards_in_order_and_unknown_table(tmp_path):
    write_small(tmp_path)
    paths = shards.list_shards(tmp_path, TABLE_IMAGE_TEXT, "train")
    assert [p.name for p in paths] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert all(p.is_file() for p in paths)
    assert shards.list_shards(tmp_path, TABLE_IMAGE_TEXT, "test") == []
    assert shards.read_table(tmp_path, TABLE_VQA, "val").num_rows == 0
    with pytest.raises(DataError, match="unknown table 'captions'"):
        shards.list_shards(tmp_path, "captions", "train")


def replace_shard_with(path, table: pa.Table):
    pq.write_table(table, path)


def test_wrong_schema_refused_naming_file_and_field(tmp_path):
    write_small(tmp_path)
    path = shards.list_shards(tmp_path, TABLE_IMAGE_TEXT, "train")[1]
    good = shards.read_shard(path, TABLE_IMAGE_TEXT)
    bad = good.set_column(good.schema.get_field_index("width"), "width", pa.array([str(v) for v in good.column("width").to_pylist()]))
    replace_shard_with(path, bad)
    with pytest.raises(DataError) as err:
        shards.read_table(tmp_path, TABLE_IMAGE_TEXT, "train")
    msg = str(err.value)
    assert str(path) in msg
    assert "width: expected int32, found string" in msg


def test_nested_field_mismatch_and_missing_column_named(tmp_path):
    path = tmp_path / "x.parquet"
    records = [image_record(0)]
    objects_type = pa.list_(
        pa.struct(
            [
                pa.field("box", pa.list_(pa.float64())),  # variable-length doubles, not 4 x float32
                pa.field("label", pa.int32()),
                pa.field("name", pa.string()),
                pa.field("attributes", pa.list_(pa.int32())),
                pa.field("roi_feature", pa.list_(pa.float32())),
            ]
        )
    )
    fields = [f if f.name != "objects" else pa.field("objects", objects_type) for f in IMAGE_TEXT_SCHEMA if f.name != "segmentation"]
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "segmentation"} for r in records], schema=pa.schema(fields))
    pq.write_table(table, path)
    with pytest.raises(DataError) as err:
        shards.read_shard(path, TABLE_IMAGE_TEXT)
    msg = str(err.value)
    assert str(path) in msg
    assert "objects[].box: expected fixed_size_list<item: float>[4], found list<" in msg
    assert "segmentation: missing column" in msg


def test_validate_schema_accepts_foreign_list_item_names_and_extra_columns():
    # Other Parquet writers name list items "element"; extra columns are ignored.
    fields = []
    for f in SCHEMAS[TABLE_VQA]:
        if f.name == "answers":
            f = pa.field("answers", pa.list_(pa.field("element", f.type.value_type)))
        fields.append(f)
    fields.append(pa.field("source", pa.string()))
    validate_schema(TABLE_VQA, pa.schema(fields), "foreign.parquet")  # no error
    with pytest.raises(DataError, match=r"foreign.parquet.*answers\[\]\.score: missing struct field"):
        broken = pa.schema(
            [f if f.name != "answers" else pa.field("answers", pa.list_(pa.struct([pa.field("answer", pa.string())]))) for f in SCHEMAS[TABLE_VQA]]
        )
        validate_schema(TABLE_VQA, broken, "foreign.parquet")


def test_verify_detects_corruption_missing_and_stale_shards(tmp_path):
    write_small(tmp_path)
    assert shards.verify(tmp_path) == []
    paths = shards.list_shards(tmp_path, TABLE_IMAGE_TEXT, "train")
    data = bytearray(paths[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    paths[0].write_bytes(bytes(data))
    paths[2].unlink()
    (tmp_path / "image_text" / "train-00099.parquet").write_bytes(paths[1].read_bytes())
    problems = shards.verify(tmp_path)
    assert len(problems) == 3, problems
    assert any(str(paths[0]) in p and "checksum mismatch" in p for p in problems)
    assert any(str(paths[2]) in p and "missing shard" in p for p in problems)
    assert any("train-00099.parquet" in p and "not listed" in p for p in problems)


def test_verify_reports_bad_manifest_and_record_count(tmp_path):
    assert "manifest not found" in shards.verify(tmp_path / "nowhere")[0]
    manifest = write_small(tmp_path)
    manifest["counts"]["image_text"]["train"] = 8
    shards.write_manifest(tmp_path, manifest)
    problems = shards.verify(tmp_path)
    assert problems == [f"{tmp_path / 'manifest.json'}: counts.image_text.train is 8, its shards list 7 records"]


def test_atomic_writes_leave_no_tmp_and_failures_no_partial_files(tmp_path):
    ok = tmp_path / "ok"
    write_small(ok)
    assert not list(ok.rglob("*.tmp"))
    assert (ok / "manifest.json").is_file()

    bad = tmp_path / "bad"
    broken = image_record(4)
    broken["width"] = "wide"  # not an int32
    with pytest.raises(DataError) as err:
        with shards.ShardWriter(bad, vocabularies=VOCAB, created_by="test", shard_size=5) as w:
            for i in range(4):
                w.add(TABLE_IMAGE_TEXT, image_record(i))
            w.add(TABLE_IMAGE_TEXT, broken)  # fills the shard: the flush fails
    msg = str(err.value)
    assert "img-train-4" in msg and "train-00000.parquet" in msg
    assert not list(bad.rglob("*.tmp"))
    assert not list(bad.rglob("*.parquet"))
    assert not (bad / "manifest.json").exists()  # unfinished: readers refuse it
    with pytest.raises(DataError, match="manifest not found.*unfinished"):
        shards.read_manifest(bad)


def test_writer_rejects_missing_and_unknown_fields(tmp_path):
    w = shards.ShardWriter(tmp_path, vocabularies=VOCAB, created_by="test")
    rec = image_record(0)
    del rec["captions"]
    with pytest.raises(DataError, match="record img-train-0: field 'captions' is missing"):
        w.add(TABLE_IMAGE_TEXT, rec)
    rec = image_record(1)
    rec["caption"] = "typo"
    with pytest.raises(DataError, match=r"unknown field\(s\) \['caption'\]"):
        w.add(TABLE_IMAGE_TEXT, rec)
    rec = image_record(2, split="../evil")
    with pytest.raises(DataError, match="split name '../evil' is not allowed"):
        w.add(TABLE_IMAGE_TEXT, rec)


def test_read_manifest_errors_name_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: not valid JSON"):
        shards.read_manifest(tmp_path)
    write_small(tmp_path)
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{path}: field 'schema_version' is {SCHEMA_VERSION + 1}"):
        shards.read_manifest(tmp_path)
    del manifest["shards"]
    manifest["schema_version"] = SCHEMA_VERSION
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"missing key\(s\) \['shards'\]"):
        shards.read_manifest(tmp_path)


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 3), (1, 1), (6, 9, 4)])
def test_encode_png_round_trips(shape):
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(shards.encode_png(arr))))
    assert decoded.shape == arr.shape
    assert np.array_equal(decoded, arr)
    if len(shape) == 2:
        assert np.array_equal(shards.decode_segmentation(shards.encode_png(arr), "r"), arr)
    if len(shape) == 3 and shape[2] == 3:
        assert np.array_equal(np.asarray(shards.decode_image(shards.encode_png(arr), "r")), arr)


def test_decode_helpers_name_the_record():
    good = png_bytes()
    assert shards.decode_image(good, "r1").size == (12, 8)
    with pytest.raises(DataError, match="record r2: field 'image' .* cannot be decoded"):
        shards.decode_image(b"not a png at all", "r2")
    with pytest.raises(DataError, match="record r3: field 'image'"):
        shards.decode_image(good[: len(good) // 2], "r3")  # truncated
    with pytest.raises(DataError, match="record r4: field 'image' is empty"):
        shards.decode_image(None, "r4")
    with pytest.raises(DataError, match="record r5: field 'segmentation' is a RGB image"):
        shards.decode_segmentation(good, "r5")
    with pytest.raises(DataError, match="record r6: field 'segmentation' .* cannot be decoded"):
        shards.decode_segmentation(b"\x89PNG garbage", "r6")
