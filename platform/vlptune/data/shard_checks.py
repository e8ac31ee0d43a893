"""The checks of a training run's shard reads (docs/data.md, "Checks at train time").

* :func:`read_checked_shard`: :func:`vlptune.data.shards.read_shard` with the
  shard's checksum checked once per process (``data.verify_shards``) and every
  error naming the shard and how to check the dataset (``vlptune data verify``);
* :func:`skip_share_exceeded`: the stop reason of a run with more corrupt
  records than ``data.max_skip_fraction``; :data:`SKIPPED_KEY`, the reported count.

Light (pyarrow, no torch): ``vlptune results`` and ``vlptune train``'s summary import it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from vlptune.data.schema import DataError
from vlptune.data.shards import read_manifest, read_shard, sha256_file

# Shard files whose checksum this process has checked against the manifest: (path, size, mtime_ns, sha256).
# A run checks each shard once, when it first opens it (data.verify_shards); a rewritten file is checked again.
_CHECKED_SHARDS: set[tuple[str, int, int, str]] = set()


def verify_hint(data_dir: str | os.PathLike) -> str:
    """How to check a whole dataset, appended to every shard error of a run."""
    return f"check the dataset with: vlptune data verify {data_dir}"


def shard_entries(data_dir: str | os.PathLike, table: str, split: str) -> list[dict]:
    """The manifest's entries (``path``, ``records``, ``sha256``) of `table` / `split`, in order ([] for an absent split)."""
    return list(read_manifest(data_dir)["shards"].get(table, {}).get(split, []))


def check_shard_once(path: str | os.PathLike, sha256: str) -> None:
    """Raise DataError naming ``path`` when it is missing or its sha256 is not ``sha256`` (the
    manifest's); each version of a file is hashed once per process (:data:`_CHECKED_SHARDS`)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found (listed in the manifest)") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, sha256)
    if key in _CHECKED_SHARDS:
        return
    digest = sha256_file(path)
    if digest != sha256:
        raise DataError(
            f"{path}: checksum mismatch (manifest sha256 {sha256[:12]}..., file {digest[:12]}...): "
            "the shard changed after the manifest was written"
        )
    _CHECKED_SHARDS.add(key)


def read_checked_shard(path: str | os.PathLike, table: str, data_dir: str | os.PathLike, sha256: str | None = None) -> pa.Table:
    """:func:`read_shard` for a training run: the checksum checked first (once per process, when
    ``sha256`` is given: ``data.verify_shards``), and every DataError naming the shard and saying
    how to check the dataset (:func:`verify_hint`)."""
    try:
        if sha256 is not None:
            check_shard_once(path, sha256)
        return read_shard(path, table)
    except DataError as exc:
        raise DataError(f"{exc}; {verify_hint(data_dir)}") from None


# ------------------------------------------------------------------ the share of corrupt records of a run

MIN_RECORDS_FOR_SKIP_CHECK = 100  # data.max_skip_fraction is judged once this many training records were read
SKIP_STOP_PREFIX = "corrupt data: "  # the stop reason of a run past data.max_skip_fraction starts with it (exit 2 in vlptune train)
SKIPPED_KEY = "data/skipped_records"  # corrupt training records skipped so far, over all ranks (reports, TensorBoard, results)


def skip_share_exceeded(skipped: int, used: int, max_fraction: float, root: str | Path) -> str | None:
    """The stop reason of a run whose corrupt records (``skipped``, next to ``used`` good ones) exceed
    ``data.max_skip_fraction``; None while within it, or before :data:`MIN_RECORDS_FOR_SKIP_CHECK` were read."""
    read = skipped + used
    if max_fraction >= 1.0 or read < MIN_RECORDS_FOR_SKIP_CHECK or skipped <= max_fraction * read:
        return None
    return (
        f"{SKIP_STOP_PREFIX}{skipped} of {read} training records read were corrupt and skipped ({100.0 * skipped / read:.1f}%), "
        f"more than data.max_skip_fraction={max_fraction:g}; {verify_hint(root)}"
    )
