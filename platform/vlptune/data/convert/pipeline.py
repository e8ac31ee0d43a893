"""The conversion pipeline on Ray Data: the Ray edge of ``vlptune.data`` (Ray is imported inside :func:`ray_rows`).

:func:`convert` takes a :class:`~vlptune.data.convert.tasks.ParsedSource` and writes a dataset directory:

* the image tasks of each split are cut into **chunks** of ``shard_size`` tasks;
  chunk ``k`` of split ``s`` becomes shard ``image_text/s-k.parquet``, holding
  that chunk's good records (a bad image leaves its shard one record shorter;
  a chunk with none left gives a shard of 0 rows). A shard is a pure function
  of its chunk, so output does not depend on the number of workers nor on
  how often the conversion was interrupted;
* images are read, fixed, resized and re-encoded, and their captions' noun
  phrases parsed with spaCy, by :func:`~.tasks.process_tasks`, mapped over
  batches of tasks with Ray Data (``map_batches``, ``workers`` tasks in
  parallel) on the embedded local Ray (``address=None``) or a cluster;
  ``executor="inline"`` maps the same function in this process (debugging);
* the driver gathers each chunk's rows and writes the shard atomically;
* after each shard, ``OUT/.convert/state.json`` (atomic) records it with its
  sha256 and its report counts: ``resume=True`` skips the chunks whose shard
  is there with that checksum and redoes the rest; the state also holds a
  fingerprint of the inputs and options, and a resume with other ones is refused;
* downstream tables (``vqa``, ``nlvr2``, ``ve``, ``retrieval``) are written
  last, keeping only records whose images were stored (the others counted
  ``image_unusable``); then the conversion report and, last of all, the
  manifest; the state directory is removed. A directory without a manifest
  is unfinished and every reader refuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.report import (
    DEFAULT_MAX_BAD_FRACTION,
    REPORT_NAME,
    Report,
    check_bad_fraction,
    format_report,
    write_report,
)
from vlptune.data.convert.tasks import ImageTask, ParsedSource, process_tasks
from vlptune.data.schema import TABLE_IMAGE_TEXT, TABLE_RETRIEVAL, TABLES, DataError
from vlptune.data.shards import (
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    build_manifest,
    sha256_file,
    shard_name,
    write_manifest,
    write_shard,
)
from vlptune.io import atomic_write_text

log = logging.getLogger(__name__)

STATE_DIR = ".convert"
STATE_NAME = "state.json"
LOG_NAME = "convert.log"
BATCH_IMAGES = 16  # images per Ray Data batch (one map task), at most
BATCHES_PER_WORKER = 4  # at least this many batches per worker when there are few images (load balance)
PROGRESS_SECONDS = 5.0  # at most one progress line per this many seconds
CREATED_BY = "vlptune data convert"
RETRIEVAL_SPLITS = ("val", "test")
RETRIEVAL_CAPTIONS = 5  # the COCO / Flickr30k protocols: every image of the split with 5 captions (5k / 1k test)


class ConversionInterrupted(RuntimeError):
    """Raised by ``stop_after_shards`` (tests): the conversion stopped as if killed after that many shards."""


@dataclass
class ConvertOptions:
    """How a conversion runs (the flags shared by every ``vlptune data convert`` sub-command)."""

    out: Path
    images: ImageOptions = field(default_factory=ImageOptions)
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int = 0  # Ray Data tasks in parallel; 0: one per CPU of the cluster
    address: str | None = None  # None: the embedded local Ray
    executor: Literal["ray", "inline"] = "ray"
    resume: bool = False
    overwrite: bool = False
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    phrases: bool = True
    progress: Callable[[str], None] | None = None
    stop_after_shards: int | None = None  # tests: stop as if killed after this many image shards


# ------------------------------------------------------------------ chunks and state


def chunk_plan(tasks: list[ImageTask], shard_size: int) -> list[tuple[str, int, list[int]]]:
    """``(split, shard index, task positions)`` per chunk: each split's tasks in order, ``shard_size`` a chunk."""
    by_split: dict[str, list[int]] = {}
    for pos, task in enumerate(tasks):
        by_split.setdefault(task.split, []).append(pos)
    plan = []
    for split, positions in by_split.items():
        for k in range(0, len(positions), shard_size):
            plan.append((split, k // shard_size, positions[k : k + shard_size]))
    return plan


def fingerprint(parsed: ParsedSource, options: ConvertOptions) -> str:
    """What the image shards depend on: tasks, image options, shard size, phrase parsing."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"source": parsed.name, "images": asdict(options.images), "shard_size": options.shard_size, "phrases": options.phrases}, sort_keys=True
        ).encode()
    )
    for task in parsed.tasks:
        digest.update(task.to_json().encode("utf-8"))
    return digest.hexdigest()


def _state_path(out: Path) -> Path:
    return out / STATE_DIR / STATE_NAME


def _read_state(out: Path, wanted: str) -> dict[str, Any]:
    path = _state_path(out)
    if not path.is_file():
        raise DataError(f"{out}: nothing to resume (no {STATE_DIR}/{STATE_NAME}: the conversion finished, or never started); run without --resume")
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("fingerprint") != wanted:
        raise DataError(
            f"{path}: the interrupted conversion used other inputs or options (fingerprint {str(state.get('fingerprint'))[:12]}..., now {wanted[:12]}...); "
            "resume with the same command, or start again with --overwrite"
        )
    return state


def _prepare_out(out: Path, options: ConvertOptions, wanted: str) -> dict[str, Any]:
    """The resume state (empty for a fresh start); refuses a non-empty directory without --overwrite / --resume."""
    if options.resume:
        return _read_state(out, wanted)
    if out.exists() and any(out.iterdir()):
        if not options.overwrite:
            raise DataError(f"{out}: the directory is not empty; pass --overwrite to replace what is there, or --resume to finish an interrupted conversion")
        for name in (*TABLES, STATE_DIR):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for report in out.glob(REPORT_NAME.replace(".json", "*.json")):  # also those of tables added with --into
            report.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return {"fingerprint": wanted, "chunks": {}}


def _chunk_done(out: Path, state: dict[str, Any], key: str) -> bool:
    done = state["chunks"].get(key)
    if not done:
        return False
    path = out / done["entry"]["path"]
    return path.is_file() and sha256_file(path) == done["entry"]["sha256"]


# ------------------------------------------------------------------ executors


ROW_COLUMNS = ("ok", "image", "width", "height", "meta", "phrases")


def inline_rows(tasks: list[tuple[int, ImageTask]], images: ImageOptions, phrases: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """The pipeline's map, in this process, batch by batch as Ray Data maps it."""
    for k in range(0, len(tasks), BATCH_IMAGES):
        batch = tasks[k : k + BATCH_IMAGES]
        yield from zip((pos for pos, _ in batch), process_tasks([task for _, task in batch], images, phrases))


def fix_batch(batch: Mapping[str, Any], images: dict[str, Any], phrases: bool) -> dict[str, list[Any]]:
    """The Ray Data ``map_batches`` function: ``{"key", "task"}`` columns in, processed rows out."""
    rows = process_tasks([ImageTask.from_json(str(text)) for text in batch["task"]], ImageOptions(**images), phrases)
    out: dict[str, list[Any]] = {"key": [int(key) for key in batch["key"]]}
    for name in ROW_COLUMNS:
        out[name] = [row[name] for row in rows]
    return out


def ray_rows(
    tasks: list[tuple[int, ImageTask]],
    images: ImageOptions,
    phrases: bool,
    workers: int,
    address: str | None,
    on_ready: Callable[[], None] | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The pipeline's map on Ray Data (starts the embedded local Ray when none is running; stops what it started).

    ``on_ready`` is called once Ray is up (the conversion's rate counts from there).
    """
    import ray  # the Ray edge of vlptune.data: only conversions import Ray
    import ray.data  # Ray Data registers itself on import

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(
                address="local",
                num_cpus=workers or None,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                logging_level=logging.ERROR,  # Ray's start-up notices go to its session logs, not the console
            )
        started = True
    if on_ready is not None:
        on_ready()
    try:
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices go to Ray's session logs
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # chunks complete in order: the driver holds one at a time
        ctx.enable_progress_bars = False  # our own progress line (images/s, ETA)
        concurrency = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        items = [{"key": pos, "task": task.to_json()} for pos, task in tasks]
        batch_size = max(1, min(BATCH_IMAGES, math.ceil(len(items) / (concurrency * BATCHES_PER_WORKER))))
        blocks = max(1, math.ceil(len(items) / batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            fix_batch,
            fn_kwargs={"images": asdict(images), "phrases": phrases},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=concurrency),
            num_cpus=1,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                yield int(row["key"]), row
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------ records


def image_record(task: ImageTask, row: Mapping[str, Any]) -> dict[str, Any]:
    meta = json.loads(row["meta"])
    phrases = json.loads(row["phrases"]) if row.get("phrases") else None
    return {
        "image_id": task.image_id,
        "split": task.split,
        "image": row["image"],
        "width": int(row["width"]),
        "height": int(row["height"]),
        "captions": list(task.captions),
        "phrases": phrases if phrases is not None else [[] for _ in task.captions],
        "objects": [
            {
                "box": o["box"],
                "label": int(o["label"]),
                "name": o["name"],
                "attributes": [int(a) for a in o.get("attributes", [])],
                "roi_feature": o.get("roi_feature"),
            }
            for o in meta["objects"]
        ],
        "segmentation": None,
        "phrase_label_sim": None,
        "caption_boxes": meta["caption_boxes"],
    }


def _write_chunk(out: Path, split: str, index: int, positions: list[int], tasks: list[ImageTask], rows: dict[int, dict[str, Any]]) -> tuple[dict, Report]:
    report = Report()
    good = []
    for pos in positions:
        row, task = rows[pos], tasks[pos]
        meta = json.loads(row["meta"])
        if not row["ok"]:
            report.count_bad(meta["reason"], task.image_id, meta["detail"])
            continue
        for fix in meta["fixes"]:
            report.count_fix(fix)
        for _ in range(meta["bad_boxes"]):
            report.count_bad("bad_box", task.image_id, "box empty after clipping to the image")
        good.append((task, row))
    records = [image_record(t, r) for t, r in good]
    return write_shard(out, TABLE_IMAGE_TEXT, split, index, records), report


def retrieval_records(tasks: Iterable[ImageTask]) -> list[dict[str, Any]]:
    """The retrieval table: every stored val / test image with its first RETRIEVAL_CAPTIONS captions."""
    return [
        {"split": t.split, "image_id": t.image_id, "caption_index": c}
        for t in tasks
        if t.split in RETRIEVAL_SPLITS
        for c in range(min(RETRIEVAL_CAPTIONS, len(t.captions)))
    ]


def _kept_image_ids(out: Path, entries: Iterable[dict]) -> set[str]:
    kept: set[str] = set()
    for entry in entries:
        kept.update(str(x) for x in pq.read_table(out / entry["path"], columns=["image_id"]).column(0).to_pylist())
    return kept


def _write_downstream(out: Path, parsed: ParsedSource, kept: set[str], shard_size: int, report: Report) -> dict[str, dict[str, list[dict]]]:
    shards: dict[str, dict[str, list[dict]]] = {}
    image_fields = ("image_id", "image_id_left", "image_id_right")
    for table, records in parsed.downstream.items():
        by_split: dict[str, list[dict]] = {}
        for record in records:
            missing = [record[f] for f in image_fields if f in record and record[f] not in kept]
            if missing:
                rid = record.get("question_id") or record.get("id") or record.get("image_id")
                report.count_bad("image_unusable", f"{table} {rid}", f"image {missing[0]} was not stored")
                continue
            by_split.setdefault(record["split"], []).append(record)
        for split, rows in by_split.items():
            shards.setdefault(table, {})[split] = [
                write_shard(out, table, split, k // shard_size, rows[k : k + shard_size]) for k in range(0, len(rows), shard_size)
            ]
    return shards


# ------------------------------------------------------------------ the conversion


def _say(options: ConvertOptions, line: str) -> None:
    log.info(line)
    if options.progress is not None:
        options.progress(line)


def _file_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("vlptune").addHandler(handler)
    logging.getLogger("vlptune").setLevel(logging.INFO)
    return handler


def convert(parsed: ParsedSource, options: ConvertOptions) -> dict[str, Any]:
    """Write ``parsed`` to ``options.out`` (see the module docstring); the summary (counts, seconds, images/s, report)."""
    out = Path(options.out)
    if options.shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {options.shard_size}")
    wanted = fingerprint(parsed, options)
    state = _prepare_out(out, options, wanted)
    handler = _file_log(out)
    try:
        return _convert(parsed, options, out, state)
    finally:
        logging.getLogger("vlptune").removeHandler(handler)
        handler.close()


def _convert(parsed: ParsedSource, options: ConvertOptions, out: Path, state: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    plan = chunk_plan(parsed.tasks, options.shard_size)
    pending = [(s, k, p) for s, k, p in plan if not _chunk_done(out, state, f"{TABLE_IMAGE_TEXT}/{shard_name(s, k)}")]
    resumed = len(plan) - len(pending)
    todo = [pos for _, _, positions in pending for pos in positions]
    _say(
        options,
        f"{parsed.name}: {len(parsed.tasks)} images in {len(plan)} shard(s)"
        + (f", {resumed} already written (resumed)" if resumed else "")
        + f"; log: {out / LOG_NAME}",
    )
    owner = {pos: i for i, (_, _, positions) in enumerate(pending) for pos in positions}
    waiting: dict[int, dict[int, dict[str, Any]]] = {}
    items = [(pos, parsed.tasks[pos]) for pos in todo]
    done_images, written = 0, 0
    ready = [time.perf_counter()]  # when the map started (after Ray's start-up): rates count from there

    def mark_ready() -> None:
        ready[0] = time.perf_counter()

    if options.executor == "inline":
        rows = inline_rows(items, options.images, options.phrases)
    else:
        rows = ray_rows(items, options.images, options.phrases, options.workers, options.address, on_ready=mark_ready)
    last_line = time.perf_counter()
    try:
        for pos, row in rows:
            chunk = owner[pos]
            waiting.setdefault(chunk, {})[pos] = row
            done_images += 1
            split, index, positions = pending[chunk]
            if len(waiting[chunk]) == len(positions):
                entry, chunk_report = _write_chunk(out, split, index, positions, parsed.tasks, waiting.pop(chunk))
                state["chunks"][f"{TABLE_IMAGE_TEXT}/{shard_name(split, index)}"] = {"entry": entry, "report": chunk_report.to_json()}
                atomic_write_text(_state_path(out), json.dumps(state) + "\n")
                written += 1
                log.info("wrote %s (%d records)", entry["path"], entry["records"])
                if options.stop_after_shards is not None and written >= options.stop_after_shards:
                    raise ConversionInterrupted(f"stopped after {written} shard(s) (stop_after_shards)")
            now = time.perf_counter()
            if now - last_line >= PROGRESS_SECONDS or done_images == len(todo):
                rate = done_images / (now - ready[0]) if now > ready[0] else 0.0
                eta = f"{(len(todo) - done_images) / rate:.0f} s" if rate > 0 else "--"
                _say(options, f"  {parsed.name}: {done_images}/{len(todo)} images ({done_images / max(len(todo), 1):.0%}), {rate:.1f} images/s, ETA {eta}")
                last_line = now
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stops the Ray Data iteration (and the Ray it started) when interrupted
    image_seconds = time.perf_counter() - ready[0]  # Ray's start-up not counted
    report = Report()
    report.merge(parsed.report)
    shards: dict[str, dict[str, list[dict]]] = {TABLE_IMAGE_TEXT: {}}
    for split, index, _ in plan:
        done = state["chunks"][f"{TABLE_IMAGE_TEXT}/{shard_name(split, index)}"]
        shards[TABLE_IMAGE_TEXT].setdefault(split, []).append(done["entry"])
        report.merge(Report.from_json(done["report"]))
    kept = _kept_image_ids(out, (e for entries in shards[TABLE_IMAGE_TEXT].values() for e in entries))
    if parsed.retrieval:
        parsed.downstream[TABLE_RETRIEVAL] = retrieval_records(t for t in parsed.tasks if t.image_id in kept)
    shards.update(_write_downstream(out, parsed, kept, options.shard_size, report))
    seconds = time.perf_counter() - start
    manifest = build_manifest(
        parsed.vocabularies,
        f"{CREATED_BY} {parsed.name}",
        shards,
        {"source": {"name": parsed.name, **parsed.extra}, "images": {**asdict(options.images), "format": "JPEG"}},
    )
    summary = {
        "source": parsed.name,
        "out_dir": str(out),
        "counts": manifest["counts"],
        "images_read": len(parsed.tasks),
        "images_stored": len(kept),
        "seconds": seconds,
        "images_per_second": done_images / image_seconds if image_seconds > 0 else 0.0,
        "startup_seconds": ready[0] - start,
        "resumed_shards": resumed,
    }
    report_path = write_report(out, report, summary)
    check_bad_fraction(report, options.max_bad_fraction, report_path)
    write_manifest(out, manifest)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    summary["report"] = report
    summary["report_path"] = str(report_path)
    _say(options, f"wrote {out}: {len(kept)} images stored of {len(parsed.tasks)} read in {seconds:.1f} s\n{format_report(report)}\nreport: {report_path}")
    return summary


def default_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))
