"""Web-scale sets as img2dataset writes them (tar shards, Parquet) and plain TSV / JSON-lines pairs (inline executor)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from convert_fixtures import awkward_images
from vlptune.data.convert.captioned import parse_pairs
from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.pipeline import ConvertOptions, convert
from vlptune.data.convert.web import parse_parquet, parse_tars
from vlptune.data.shards import iter_records, verify

SMALL = ImageOptions(max_short_side=96, max_long_side=160)
SAMPLES = ["plain_0.jpg", "cmyk.jpg", "png_named.jpg", "palette_alpha.png", "truncated.jpg", "zero.jpg"]


def _opts(out: Path) -> ConvertOptions:
    return ConvertOptions(out=out, images=SMALL, shard_size=4, executor="inline", max_bad_fraction=0.6, phrases=False)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web")
    awkward_images(folder)
    return folder


def test_webdataset_tars(images, tmp_path):
    tars = []
    for t in range(2):
        path = tmp_path / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for k, name in enumerate(SAMPLES[t * 3 : t * 3 + 3]):
                key = f"{t:05d}{k:04d}"
                ext = name.rsplit(".", 1)[1]
                _add(tar, f"{key}.{ext}", (images / name).read_bytes())
                if k == 1:  # caption only in the json
                    _add(tar, f"{key}.json", json.dumps({"caption": f"json caption of {name}", "url": "http://x"}).encode())
                else:
                    _add(tar, f"{key}.txt", f"  caption of\n{name} ".encode())
                    _add(tar, f"{key}.json", b"{}")
            if t == 1:
                _add(tar, "orphan.txt", b"a caption without its image")
        tars.append(path)
    parsed = parse_tars(tars, "train", "cc3m")
    summary = convert(parsed, _opts(tmp_path / "out"))
    assert summary["report"].bad == {"missing_file": 1, "truncated_image": 1, "zero_byte_image": 1}
    records = {r["image_id"]: r for r in iter_records(tmp_path / "out", "image_text")}
    assert sorted(records) == ["cc3m-000000000", "cc3m-000000001", "cc3m-000000002", "cc3m-000010000"]
    assert records["cc3m-000000000"]["captions"] == ["caption of plain_0.jpg"]  # whitespace runs made one space
    assert records["cc3m-000000001"]["captions"] == ["json caption of cmyk.jpg"]
    assert verify(tmp_path / "out") == []


def test_img2dataset_parquet(images, tmp_path):
    rows = {"key": [f"{k:09d}" for k in range(len(SAMPLES))], "caption": [f"photo {n}" for n in SAMPLES], "jpg": [(images / n).read_bytes() for n in SAMPLES]}
    rows["caption"][2] = ""  # an empty caption: the image has no caption left and is dropped
    path = tmp_path / "00000.parquet"
    pq.write_table(pa.table(rows), path)
    summary = convert(parse_parquet([path], "train", "laion"), _opts(tmp_path / "pq"))
    assert summary["report"].bad == {"empty_caption": 1, "no_caption": 1, "truncated_image": 1, "zero_byte_image": 1}
    assert summary["counts"]["image_text"] == {"train": 3}  # plain_0, cmyk, palette_alpha
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["1"], "text": ["x"]}), bad)
    with pytest.raises(ValueError, match="missing column"):
        parse_parquet([bad], "train", "laion")


def test_tsv_and_jsonl_pairs_store_each_image_once(images, tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text(
        "plain_0.jpg\ta first caption\nplain_1.jpg\tanother one\nplain_0.jpg\ta second caption of the first image\nbroken-row\nmissing.jpg\tgone\n",
        encoding="utf-8",
    )
    parsed = parse_pairs(tsv, images, "tsv", "train", "mine")
    assert [t.image_id for t in parsed.tasks] == ["mine-00000000", "mine-00000001", "mine-00000004"]
    assert parsed.tasks[0].captions == ["a first caption", "a second caption of the first image"]
    summary = convert(parsed, _opts(tmp_path / "tsv"))
    assert summary["report"].bad == {"bad_row": 1, "missing_file": 1}
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "big.jpg", "caption": "long ' + "word " * 200 + '"}\n{"image": "cmyk.jpg"}\nnot json\n\n', encoding="utf-8")
    parsed = parse_pairs(jsonl, images, "jsonl", "val", "mine", max_caption_chars=64)
    assert len(parsed.tasks[0].captions[0]) <= 64
    assert parsed.report.bad == {"caption_truncated": 1, "empty_caption": 1, "bad_row": 1, "no_caption": 1}
    summary = convert(parsed, _opts(tmp_path / "jsonl"))
    assert summary["counts"] == {"image_text": {"val": 1}, "retrieval": {"val": 1}}
