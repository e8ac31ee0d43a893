"""Parquet shards: writing (atomic), the manifest, verification, reading.

Layout of a dataset directory::

    DIR/manifest.json
    DIR/<table>/<split>-<NNNNN>.parquet

Every file is written atomically: to `<name>.tmp` first, then `os.replace`d
onto its final name, so a reader never sees half a shard and an interrupted
run leaves no file that looks finished. The manifest is written last; a
directory without one is an unfinished (or foreign) dataset and readers
refuse it.

The manifest holds the schema version, who wrote it, the vocabularies
(classes, attributes, segmentation classes, roi_feature_dim), the record
counts per table and split, and per shard its path (relative to DIR), record
count and sha256. `verify` checks the shards against it.

Readers: `read_manifest`, `list_shards`, `read_table`, `iter_records`; image
helpers `decode_image`, `decode_segmentation` raise `DataError` naming the
record. Decoding is left to the caller (the dataset decodes lazily, per
sample, and skips and counts the corrupt ones).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlptune.data.schema import (
    READABLE_SCHEMA_VERSIONS,
    RECORD_ID_FIELD,
    SCHEMA_VERSION,
    TABLES,
    DataError,
    complete_optional_columns,
    present_columns,
    schema_for,
    validate_schema,
)
from vlptune.io import atomic_write_bytes

MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
SHARD_INDEX_DIGITS = 5
DEFAULT_SHARD_SIZE = 1024
ROW_GROUP_SIZE = 256  # rows per Parquet row group: the unit a lazy reader fetches
PARQUET_COMPRESSION = "zstd"
HASH_CHUNK_BYTES = 1 << 20
SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COMPRESS_LEVEL = 1  # zlib level: synthetic images gain little from more effort
PNG_FILTER_UP = 2
PNG_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)

VOCABULARY_KEYS = ("classes", "attributes", "segmentation_classes", "roi_feature_dim")
MANIFEST_KEYS = ("schema_version", "created_by", "vocabularies", "counts", "shards")
SHARD_ENTRY_KEYS = ("path", "records", "sha256")


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`, e.g. 'train-00003.parquet'."""
    return f"{split}-{index:0{SHARD_INDEX_DIGITS}d}{SHARD_SUFFIX}"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def _fsync_and_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(image: Image.Image | np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of a uint8 array (HxW grey, HxWx3 RGB, HxWx4 RGBA) or a PIL image.

    A direct encoder (PNG "Up" filter on every row, then zlib): 2-3x faster
    than PIL's adaptive-filter encoder on small images, and deterministic.
    Any PNG reader (PIL included) decodes it.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise DataError(f"encode_png: expected uint8 pixels, found {arr.dtype}")
    if arr.ndim == 2:
        channels = 1
    elif arr.ndim == 3 and arr.shape[2] in PNG_COLOUR_TYPES:
        channels = arr.shape[2]
    else:
        raise DataError(f"encode_png: expected HxW, HxWx3 or HxWx4 pixels, found shape {arr.shape}")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise DataError(f"encode_png: empty image of shape {arr.shape}")
    rows = arr.reshape(h, w * channels)
    raw = np.empty((h, w * channels + 1), dtype=np.uint8)
    raw[:, 0] = PNG_FILTER_UP
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 wrap-around = mod 256
    header = struct.pack(">IIBBBBB", w, h, 8, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level))
            + _png_chunk(b"IEND", b""))


def decode_image(data: bytes | None, record_id: str = "?") -> Image.Image:
    """Decode image bytes (PNG, JPEG, ...) to an RGB PIL image.

    Raises DataError naming `record_id` and the field when the bytes are
    missing, truncated or not an image.
    """
    return decode_image_draft(data, record_id)[0]


def decode_image_draft(
    data: bytes | None, record_id: str = "?", draft: Callable[[int, int], tuple[int, int] | None] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image`, and the stored image's (width, height).

    ``draft(width, height)``: for a JPEG, the smallest (w, h) it is needed at
    (None: full size); PIL's draft mode then decodes it at the largest of 1/2,
    1/4 or 1/8 scale that stays at least that big (libjpeg's DCT scaling:
    several times faster than a full decode followed by a resize).
    """
    if data is None or len(data) == 0:
        raise DataError(f"record {record_id}: field 'image' is empty")
    try:
        image = Image.open(io.BytesIO(data))
        size = image.size
        if draft is not None and image.format == "JPEG" and (want := draft(*size)) is not None:
            image.draft("RGB", want)
        image.load()  # force the decode now, so truncated data fails here
    except Exception as exc:  # PIL raises several types for bad data
        raise DataError(
            f"record {record_id}: field 'image' ({len(data)} bytes) cannot be decoded: {exc}"
        ) from exc
    return (image if image.mode == "RGB" else image.convert("RGB")), size


def decode_segmentation(data: bytes | None, record_id: str = "?") -> np.ndarray:
    """Decode a segmentation PNG to a uint8 array (H, W) of class ids (0 = background)."""
    if data is None or len(data) == 0:
        raise DataError(f"record {record_id}: field 'segmentation' is empty")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise DataError(
            f"record {record_id}: field 'segmentation' ({len(data)} bytes) "
            f"cannot be decoded: {exc}"
        ) from exc
    if image.mode not in ("L", "P"):
        raise DataError(
            f"record {record_id}: field 'segmentation' is a {image.mode} image; "
            "expected a single-channel 8-bit map (mode L)"
        )
    return np.asarray(image, dtype=np.uint8)


def _check_split_name(split: str) -> None:
    if not isinstance(split, str) or not SPLIT_NAME_RE.match(split):
        raise DataError(
            f"split name {split!r} is not allowed: use letters, digits and '_' "
            "(it becomes part of shard file names)"
        )


def _record_id(table: str, record: Mapping[str, Any]) -> str:
    return str(record.get(RECORD_ID_FIELD[table], "?"))


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


class ShardWriter:
    """Buffers records per (table, split) and writes shards of `shard_size` records.

    Use as a context manager, or call `close()`; on a clean exit the manifest
    is written. On an exception no manifest is written (the directory then
    reads as unfinished) and no `.tmp` file is left behind.

        with ShardWriter(out, vocabularies=vocab, created_by="me") as w:
            w.add("image_text", {...})
        manifest = w.manifest
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        vocabularies: Mapping[str, Any],
        created_by: str,
        shard_size: int = DEFAULT_SHARD_SIZE,
        extra: Mapping[str, Any] | None = None,
    ):
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        missing = [k for k in VOCABULARY_KEYS if k not in vocabularies]
        if missing:
            raise DataError(f"vocabularies lack {missing}; expected keys {list(VOCABULARY_KEYS)}")
        self.out_dir = Path(out_dir)
        self.shard_size = int(shard_size)
        self.vocabularies = dict(vocabularies)
        self.created_by = created_by
        self.extra = dict(extra or {})
        self._buffers: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        self._shards: dict[str, dict[str, list[dict]]] = {}
        self.manifest: dict | None = None
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- records -----------------------------------------------------------

    def _check_record(self, table: str, record: Mapping[str, Any]) -> None:
        schema = schema_for(table)
        rid = _record_id(table, record)
        unknown = set(record) - set(schema.names)
        if unknown:
            raise DataError(
                f"table {table!r}, record {rid}: unknown field(s) {sorted(unknown)}; "
                f"expected {schema.names}"
            )
        for field in schema:
            if not field.nullable and record.get(field.name) is None:
                raise DataError(
                    f"table {table!r}, record {rid}: field {field.name!r} is missing "
                    f"(expected {field.type})"
                )

    def add(self, table: str, record: Mapping[str, Any]) -> None:
        if self._closed:
            raise DataError(f"{self.out_dir}: writer already closed")
        self._check_record(table, record)
        split = record["split"]
        _check_split_name(split)
        buf = self._buffers.setdefault((table, split), [])
        buf.append(record)
        if len(buf) >= self.shard_size:
            self._flush(table, split)

    def add_many(self, table: str, records) -> None:
        for record in records:
            self.add(table, record)

    # -- shards ------------------------------------------------------------

    def _flush(self, table: str, split: str) -> None:
        records = self._buffers.pop((table, split), [])
        if not records:
            return
        split_shards = self._shards.setdefault(table, {}).setdefault(split, [])
        split_shards.append(write_shard(self.out_dir, table, split, len(split_shards), records))

    def close(self) -> dict:
        """Flush every buffer, write the manifest, return it."""
        if self._closed:
            assert self.manifest is not None  # written by the close that closed it
            return self.manifest
        for table, split in sorted(self._buffers):
            self._flush(table, split)
        self._closed = True
        self.manifest = build_manifest(self.vocabularies, self.created_by, self._shards, self.extra)
        write_manifest(self.out_dir, self.manifest)
        return self.manifest

    def abort(self) -> None:
        """Drop the buffered records; write no manifest."""
        self._buffers.clear()
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def records_to_arrow(table: str, records: Sequence[Mapping[str, Any]], path: Path) -> pa.Table:
    """``records`` as an Arrow table of ``table``'s schema; DataError naming ``path`` and the offending record."""
    schema = schema_for(table)
    try:
        return pa.Table.from_pylist(list(records), schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        # find the offending record so the message can name it
        for record in records:
            try:
                pa.Table.from_pylist([record], schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as one:
                raise DataError(f"{path}: table {table!r}, record {_record_id(table, record)}: {one}") from one
        raise DataError(f"{path}: table {table!r}: {exc}") from exc


def write_shard(out_dir: str | os.PathLike, table: str, split: str, index: int, records: Sequence[Mapping[str, Any]]) -> dict:
    """Write shard ``index`` of ``table``/``split`` atomically (``.tmp``, fsync, rename); its manifest entry.

    ``records`` may be empty (a converter's chunk whose records were all bad): the shard then holds 0 rows.
    """
    _check_split_name(split)
    rel = Path(table) / shard_name(split, index)
    path = Path(out_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    arrow = records_to_arrow(table, list(records), path)
    tmp = _tmp_path(path)
    try:
        pq.write_table(arrow, tmp, compression=PARQUET_COMPRESSION, row_group_size=ROW_GROUP_SIZE)
        _fsync_and_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": rel.as_posix(), "records": len(records), "sha256": sha256_file(path)}


def build_manifest(vocabularies: Mapping[str, Any], created_by: str, shards: Mapping[str, Mapping[str, list[dict]]], extra: Mapping[str, Any] | None = None) -> dict:
    """The manifest of a dataset whose shards (per table and split, in order) are ``shards``; counts summed from them."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": created_by,
        "vocabularies": dict(vocabularies),
        "counts": {t: {s: sum(int(e["records"]) for e in shards[t][s]) for s in sorted(shards[t])} for t in TABLES if t in shards},
        "shards": {t: {s: list(shards[t][s]) for s in sorted(shards[t])} for t in TABLES if t in shards},
        **dict(extra or {}),
    }


# --------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write DIR/manifest.json atomically; return its path."""
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"manifest for {out_dir} lacks {missing}")
    path = Path(out_dir) / MANIFEST_NAME
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8")
    atomic_write_bytes(path, data)
    return path


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load and check DIR/manifest.json; DataError naming the file on any problem."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        hint = (
            " (the directory exists but has no manifest: an unfinished write?)"
            if Path(data_dir).is_dir()
            else " (no such directory)"
        )
        raise DataError(f"{path}: manifest not found{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}")
    version = manifest["schema_version"]
    if version not in READABLE_SCHEMA_VERSIONS:
        raise DataError(
            f"{path}: field 'schema_version' is {version!r}; this vlptune reads "
            f"schema versions {', '.join(map(str, READABLE_SCHEMA_VERSIONS))} (regenerate or convert the data)"
        )
    vocab = manifest["vocabularies"]
    if not isinstance(vocab, dict):
        raise DataError(f"{path}: field 'vocabularies' must be an object")
    missing = [k for k in VOCABULARY_KEYS if k not in vocab]
    if missing:
        raise DataError(f"{path}: field 'vocabularies' lacks {missing}")
    shards = manifest["shards"]
    if not isinstance(shards, dict):
        raise DataError(f"{path}: field 'shards' must be an object")
    for table, splits in shards.items():
        if table not in TABLES:
            raise DataError(f"{path}: field 'shards' names unknown table {table!r}")
        if not isinstance(splits, dict):
            raise DataError(f"{path}: field 'shards.{table}' must be an object of splits")
        for split, entries in splits.items():
            if not isinstance(entries, list):
                raise DataError(f"{path}: field 'shards.{table}.{split}' must be a list")
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict) or any(k not in entry for k in SHARD_ENTRY_KEYS):
                    raise DataError(
                        f"{path}: field 'shards.{table}.{split}[{i}]' must have keys "
                        f"{list(SHARD_ENTRY_KEYS)}"
                    )
    return manifest


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


def _shard_entries(manifest: dict, table: str, split: str | None) -> list[dict]:
    schema_for(table)  # unknown table -> DataError
    splits = manifest["shards"].get(table, {})
    if split is None:
        return [e for s in sorted(splits) for e in splits[s]]
    return list(splits.get(split, []))


def list_shards(data_dir: str | os.PathLike, table: str, split: str | None = None) -> list[Path]:
    """Shard paths of `table` (and `split`; all splits when None), in order.

    An unknown table raises DataError; a split with no records gives [].
    """
    manifest = read_manifest(data_dir)
    return [Path(data_dir) / e["path"] for e in _shard_entries(manifest, table, split)]


def read_shard(path: str | os.PathLike, table: str) -> pa.Table:
    """One shard as a pyarrow Table with exactly the columns of `table`'s schema.

    Raises DataError naming the file when it is missing, unreadable or its
    schema differs (naming the field, what was expected and what was found).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard not found")
    schema = schema_for(table)
    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for bad files
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    validate_schema(table, pfile.schema_arrow, path)
    try:
        arrow = pfile.read(columns=present_columns(table, pfile.schema_arrow))
    except Exception as exc:
        raise DataError(f"{path}: cannot read table {table!r}: {exc}") from exc
    if arrow.num_columns != len(schema.names):  # optional columns absent from this shard: nulls
        arrow = complete_optional_columns(table, arrow)
    if not arrow.schema.equals(schema):
        try:
            arrow = arrow.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
            raise DataError(f"{path}: cannot convert to the {table!r} schema: {exc}") from exc
    return arrow


def read_table(
    data_dir: str | os.PathLike, table: str, split: str | None = None
) -> pa.Table:
    """All shards of `table` / `split` (all splits when None), schema-checked, concatenated."""
    paths = list_shards(data_dir, table, split)
    if not paths:
        return schema_for(table).empty_table()
    return pa.concat_tables([read_shard(p, table) for p in paths])


def iter_records(
    data_dir: str | os.PathLike, table: str, split: str | None = None
) -> Iterator[dict]:
    """Records of `table` / `split` as python dicts, shard by shard, in order."""
    for path in list_shards(data_dir, table, split):
        arrow = read_shard(path, table)
        for batch in arrow.to_batches():
            yield from batch.to_pylist()


# --------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------


def verify(data_dir: str | os.PathLike, check_schema: bool = True) -> list[str]:
    """Problems with DIR against its manifest; [] when everything checks out.

    Reports: missing shards, sha256 mismatches, record counts that differ from
    the manifest (per shard and per split), shard schemas that do not match
    (when `check_schema`), leftover `.tmp` files and shard files the
    manifest does not list. A missing or bad manifest is itself the problem.
    """
    data_dir = Path(data_dir)
    try:
        manifest = read_manifest(data_dir)
    except DataError as exc:
        return [str(exc)]
    problems: list[str] = []
    listed: set[Path] = set()
    for table, splits in manifest["shards"].items():
        for split, entries in splits.items():
            total = 0
            for entry in entries:
                path = data_dir / entry["path"]
                listed.add(path.resolve())
                total += entry["records"]
                if not path.is_file():
                    problems.append(f"{path}: missing shard (listed in the manifest)")
                    continue
                digest = sha256_file(path)
                if digest != entry["sha256"]:
                    problems.append(
                        f"{path}: checksum mismatch (manifest sha256 {entry['sha256'][:12]}..., "
                        f"file {digest[:12]}...)"
                    )
                    continue
                try:
                    pfile = pq.ParquetFile(path)
                except Exception as exc:
                    problems.append(f"{path}: not a readable Parquet file: {exc}")
                    continue
                if pfile.metadata.num_rows != entry["records"]:
                    problems.append(
                        f"{path}: holds {pfile.metadata.num_rows} records, "
                        f"manifest says {entry['records']}"
                    )
                if check_schema:
                    try:
                        validate_schema(table, pfile.schema_arrow, path)
                    except DataError as exc:
                        problems.append(str(exc))
            counted = manifest["counts"].get(table, {}).get(split)
            if counted != total:
                problems.append(
                    f"{data_dir / MANIFEST_NAME}: counts.{table}.{split} is {counted}, "
                    f"its shards list {total} records"
                )
    for path in sorted(data_dir.rglob("*")):
        if path.name.endswith(TMP_SUFFIX):
            problems.append(f"{path}: leftover temporary file (an interrupted write)")
        elif path.suffix == SHARD_SUFFIX and path.resolve() not in listed:
            problems.append(f"{path}: shard not listed in the manifest (stale data?)")
    return problems
