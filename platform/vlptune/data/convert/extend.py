"""Add downstream tables to a converted dataset whose images they use (``--into ROOT``): images stay stored once.

VQA v2 asks about COCO images, SNLI-VE about Flickr30k images: their
converters write the ``vqa`` / ``ve`` table into the COCO / Flickr30k root
(:func:`add_tables`), and each record names its image by ``image_id``;
a record whose image the root does not hold is dropped (``unknown_image``).
The report is written and ``--max-bad-fraction`` checked first; then the new
shards (each atomically), then the root's manifest (atomically) with the new
tables, their vocabularies and the report's name; then shards of a replaced
table that the new one lacks are removed. An interrupted first run leaves the
old manifest in force (``vlptune data verify`` names the shards it does not
list); an interrupted ``--overwrite`` may have replaced shards of the old
table in place, which ``verify`` then reports as sha256 mismatches. Either
way, running the command again finishes the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vlptune.data.convert.report import Report, check_bad_fraction, format_report, write_report
from vlptune.data.schema import TABLE_IMAGE_TEXT, DataError
from vlptune.data.shards import DEFAULT_SHARD_SIZE, list_shards, read_manifest, write_manifest, write_shard

IMAGE_FIELDS = ("image_id", "image_id_left", "image_id_right")


def root_image_ids(root: Path) -> set[str]:
    """Every ``image_id`` of the root's ``image_text`` table (all splits)."""
    ids: set[str] = set()
    for path in list_shards(root, TABLE_IMAGE_TEXT):
        ids.update(str(x) for x in pq.read_table(path, columns=["image_id"]).column(0).to_pylist())
    return ids


def keep_known(records: list[dict[str, Any]], known: set[str], table: str, id_field: str, report: Report) -> list[dict[str, Any]]:
    """The records whose images are all in ``known``; the others counted ``unknown_image``."""
    kept = []
    for record in records:
        missing = [record[f] for f in IMAGE_FIELDS if f in record and record[f] not in known]
        if missing:
            report.count_bad("unknown_image", f"{table} {record[id_field]}", f"image {missing[0]} is not in the root")
            continue
        kept.append(record)
    return kept


def add_tables(
    root: Path,
    tables: Mapping[str, list[dict[str, Any]]],
    report: Report,
    source: str,
    max_bad_fraction: float,
    overwrite: bool = False,
    vocabularies: Mapping[str, Any] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Any = None,
) -> dict[str, Any]:
    """Write ``tables`` (records already filtered) into ``root``; the updated manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    present = [t for t in tables if t in manifest["shards"]]
    if present and not overwrite:
        raise DataError(f"{root / 'manifest.json'}: already holds table(s) {present}; pass --overwrite to replace them")
    report_path = write_report(root, report, {"source": source, "into": str(root)}, name=f"conversion_report_{source}.json")
    check_bad_fraction(report, max_bad_fraction, report_path)
    for table, records in tables.items():
        by_split: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_split.setdefault(record["split"], []).append(record)
        manifest["shards"][table] = {
            s: [write_shard(root, table, s, k // shard_size, rows[k : k + shard_size]) for k in range(0, len(rows), shard_size)]
            for s, rows in sorted(by_split.items())
        }
        manifest["counts"][table] = {s: len(rows) for s, rows in sorted(by_split.items())}
    manifest["vocabularies"].update(vocabularies or {})
    manifest.setdefault("added", {})[source] = {"tables": sorted(tables), "report": report_path.name}
    write_manifest(root, manifest)
    listed = {root / e["path"] for t in tables for entries in manifest["shards"][t].values() for e in entries}
    for table in tables:  # shards of a replaced table that the new one does not have
        for stale in sorted((root / table).glob("*.parquet")):
            if stale not in listed:
                stale.unlink()
    if progress is not None:
        counts = ", ".join(f"{t} {sum(manifest['counts'][t].values())}" for t in tables)
        progress(f"added to {root}: {counts}\n{format_report(report)}\nreport: {report_path}")
    return manifest
