"""Parsers of web-scale image-text sets as img2dataset writes them (CC3M, CC12M, SBU, LAION-style).

* tar shards (webdataset): members ``KEY.jpg`` (or ``.jpeg``, ``.png``, ``.webp``),
  ``KEY.txt`` (the caption) and ``KEY.json`` (metadata; its ``caption`` is used
  when there is no ``.txt``) form one sample. The image is not read here: its
  task points at (tar, offset, size), so workers read the bytes themselves;
* Parquet (img2dataset ``--output_format parquet``): one row per sample with
  the image bytes (column ``jpg``), ``caption`` and ``key``; the parser reads
  only the key and caption columns, workers read the image column.

Image ids: ``<name>-<key>``. A sample with a caption but no image is counted
``missing_file``; a key seen twice ``duplicate_id``.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vlptune.data.convert.captioned import ImageCollector
from vlptune.data.convert.report import Report
from vlptune.data.convert.tasks import DEFAULT_MAX_CAPTION_CHARS, ImageTask, ParsedSource, empty_vocabularies
from vlptune.data.schema import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KEY_COLUMN = "key"
CAPTION_COLUMN = "caption"
IMAGE_COLUMN = "jpg"


def _safe_key(key: str) -> str:
    return key.replace("/", "_")


def parse_tars(tars: list[Path], split: str, name: str, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> ParsedSource:
    """img2dataset / webdataset tar shards (see the module docstring), in the order given, members in tar order."""
    report = Report()
    collector = ImageCollector(report, max_caption_chars)
    for tar_path in tars:
        if not Path(tar_path).is_file():
            raise DataError(f"{tar_path}: tar shard not found")
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{member.name.rsplit('/', 1)[0]}/{stem}" if "/" in member.name else stem
                    sample = samples.setdefault(key, {})
                    ext = ext.lower()
                    if ext in IMAGE_EXTENSIONS:
                        sample["image"] = {"tar": str(tar_path), "offset": member.offset_data, "size": member.size}
                        sample["name"] = base
                    elif ext in ("txt", "json"):
                        handle = tar.extractfile(member)
                        sample[ext] = handle.read().decode("utf-8", errors="replace") if handle else ""
        except tarfile.TarError as exc:
            raise DataError(f"{tar_path}: not a readable tar file: {exc}") from None
        for key, sample in samples.items():
            image_id = f"{name}-{_safe_key(key)}"
            caption = sample.get("txt")
            if caption is None and "json" in sample:
                try:
                    caption = json.loads(sample["json"]).get("caption")
                except (json.JSONDecodeError, AttributeError):
                    caption = None
            if "image" not in sample:
                report.count_input("images")
                report.count_bad("missing_file", image_id, f"{tar_path}: no image member for key {key!r}")
                continue
            if collector.image(ImageTask(image_id, split, sample["image"], name=sample["name"])):
                collector.caption(image_id, caption)
    return ParsedSource(name, collector.finish(), {}, empty_vocabularies(), report, retrieval=True, extra={"format": "webdataset"})


def parse_parquet(files: list[Path], split: str, name: str, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> ParsedSource:
    """img2dataset Parquet files: ``key``, ``caption`` and the image bytes in ``jpg``."""
    report = Report()
    collector = ImageCollector(report, max_caption_chars)
    for path in files:
        if not Path(path).is_file():
            raise DataError(f"{path}: Parquet file not found")
        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for bad files
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
        missing = [c for c in (KEY_COLUMN, CAPTION_COLUMN, IMAGE_COLUMN) if c not in schema.names]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; img2dataset Parquet has {KEY_COLUMN}, {CAPTION_COLUMN}, {IMAGE_COLUMN}; found {schema.names}"
            )
        table = pq.read_table(path, columns=[KEY_COLUMN, CAPTION_COLUMN])
        for row, (key, caption) in enumerate(zip(table.column(0).to_pylist(), table.column(1).to_pylist())):
            image_id = f"{name}-{_safe_key(str(key if key is not None else row))}"
            ref = {"parquet": str(path), "row": row, "column": IMAGE_COLUMN}
            if collector.image(ImageTask(image_id, split, ref, name=str(key))):  # no extension: nothing to check the bytes against
                collector.caption(image_id, caption)
    return ParsedSource(name, collector.finish(), {}, empty_vocabularies(), report, retrieval=True, extra={"format": "img2dataset-parquet"})
