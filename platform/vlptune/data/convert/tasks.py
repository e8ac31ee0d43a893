"""What a source parser hands the pipeline, and the per-record work the pipeline maps (no Ray here).

A parser turns a dataset's annotation files into a :class:`ParsedSource`:
one :class:`ImageTask` per distinct image (its id, split, where its bytes
are, its captions and objects in the original pixel frame), plus downstream
records (``vqa``, ``nlvr2``, ``ve``, ``retrieval``) that refer to images by
``image_id``, never by copying them. :func:`process_task` is the function the
Ray Data pipeline maps over tasks: read the bytes, fix the image, move the
boxes; it returns a plain row (so it travels between Ray workers) and never
raises for a bad image (the row carries the reason). :func:`process_tasks`
does it for a batch and parses the captions' noun phrases with spaCy there,
on the workers (one parse per distinct caption and process).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vlptune.data.convert.images import BadImage, ImageOptions, fix_image, move_boxes
from vlptune.data.convert.report import Report
from vlptune.data.phrases import phrase_extractor

DEFAULT_MAX_CAPTION_CHARS = 512  # longer captions (web alt-text dumps) are truncated and counted
MISSING_FILE = "missing_file"
WHITESPACE_RE = re.compile(r"\s+")


@dataclass
class ImageTask:
    """One image to convert. ``ref``: ``{"path": P}``, ``{"tar": P, "offset": O, "size": N}`` or ``{"parquet": P, "row": R, "column": C}``."""

    image_id: str
    split: str
    ref: dict[str, Any]
    name: str = ""  # the file name the dataset gives it (extension checked against the sniffed format)
    captions: list[str] = field(default_factory=list)
    objects: list[dict[str, Any]] = field(default_factory=list)  # box [x0,y0,x1,y1] (original frame), label, name, attributes
    caption_boxes: list[list[float] | None] | None = None  # per caption, the region it describes (VG), original frame
    declared_size: tuple[int, int] | None = None  # (w, h) the annotation file gives
    require_caption: bool = True  # an image-text source drops images left without captions

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ImageTask:
        data = json.loads(text)
        if data.get("declared_size") is not None:
            data["declared_size"] = tuple(data["declared_size"])
        return cls(**data)


@dataclass
class ParsedSource:
    """A parsed dataset: image tasks (in output order), downstream records, vocabularies, what the parser counted."""

    name: str
    tasks: list[ImageTask]
    downstream: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    vocabularies: dict[str, Any] = field(default_factory=dict)
    report: Report = field(default_factory=Report)
    retrieval: bool = False  # write the retrieval table (val/test images with their first captions)
    extra: dict[str, Any] = field(default_factory=dict)  # informative manifest keys


def empty_vocabularies(classes: list[str] | None = None, attributes: list[str] | None = None, roi_feature_dim: int = 0) -> dict[str, Any]:
    """Manifest vocabularies of a converted dataset (no segmentation maps: only the background class)."""
    return {
        "classes": list(classes or []),
        "attributes": list(attributes or []),
        "segmentation_classes": ["background"],
        "roi_feature_dim": int(roi_feature_dim),
    }


def clean_caption(text: Any, record_id: str, report: Report, max_chars: int) -> str | None:
    """The caption with runs of whitespace made one space; None (counted ``empty_caption``) when nothing is left.

    Longer than ``max_chars``: cut at the last space before the limit, counted ``caption_truncated``.
    """
    if not isinstance(text, str) or not text.strip():
        report.count_bad("empty_caption", record_id, repr(text))
        return None
    caption = WHITESPACE_RE.sub(" ", text).strip()
    if len(caption) > max_chars:
        cut = caption[:max_chars]
        space = cut.rfind(" ")
        caption = cut[:space] if space > 0 else cut
        report.count_bad("caption_truncated", record_id, f"{len(text)} chars")
    return caption


def read_ref(ref: Mapping[str, Any]) -> bytes:
    """The bytes a task's ``ref`` points at; :class:`BadImage` ``missing_file`` when there are none."""
    if "path" in ref:
        path = Path(ref["path"])
        if not path.is_file():
            raise BadImage(MISSING_FILE, f"{path} not found")
        return path.read_bytes()
    if "tar" in ref:
        with open(ref["tar"], "rb") as f:
            f.seek(int(ref["offset"]))
            return f.read(int(ref["size"]))
    if "parquet" in ref:
        column = pq.read_table(ref["parquet"], columns=[ref["column"]]).column(0) if ref["parquet"] != _PARQUET_CACHE.get("path") else _PARQUET_CACHE["column"]
        _PARQUET_CACHE.update(path=ref["parquet"], column=column)
        value = column[int(ref["row"])].as_py()
        return value or b""
    raise ValueError(f"unknown image reference {dict(ref)}")


_PARQUET_CACHE: dict[str, Any] = {}  # the image column of the last Parquet file read (rows come file by file)


def process_task(task: ImageTask, options: ImageOptions) -> dict[str, Any]:
    """Read, fix and re-encode one image, move its boxes; a row: ``ok``, ``image``, ``width``, ``height``, ``meta`` (JSON)."""
    try:
        fixed = fix_image(read_ref(task.ref), options, task.name)
    except BadImage as exc:
        return {"ok": False, "image": b"", "width": 0, "height": 0, "meta": json.dumps({"reason": exc.reason, "detail": exc.detail})}
    except OSError as exc:  # unreadable file or tar
        return {"ok": False, "image": b"", "width": 0, "height": 0, "meta": json.dumps({"reason": MISSING_FILE, "detail": str(exc)})}
    objects = []
    bad_boxes = 0
    moved = move_boxes([o["box"] for o in task.objects], fixed, task.declared_size)
    for obj, box in zip(task.objects, moved):
        if box[2] <= box[0] or box[3] <= box[1]:
            bad_boxes += 1
            continue
        objects.append({**obj, "box": box})
    caption_boxes = None
    if task.caption_boxes is not None:
        present = [b for b in task.caption_boxes if b is not None]
        moved_c = iter(move_boxes(present, fixed, task.declared_size))
        caption_boxes = [next(moved_c) if b is not None else None for b in task.caption_boxes]
    meta = {"fixes": list(fixed.fixes), "objects": objects, "caption_boxes": caption_boxes, "bad_boxes": bad_boxes}
    return {"ok": True, "image": fixed.data, "width": fixed.width, "height": fixed.height, "meta": json.dumps(meta)}


def process_tasks(tasks: list[ImageTask], options: ImageOptions, phrases: bool = True) -> list[dict[str, Any]]:
    """:func:`process_task` of each task, plus ``phrases`` (JSON: per caption its noun phrases; "" when not parsed)."""
    rows = [process_task(task, options) for task in tasks]
    for row in rows:
        row["phrases"] = ""
    good = [(row, task) for row, task in zip(rows, tasks) if row["ok"] and task.captions]
    if phrases and good:
        for (row, _), parsed in zip(good, phrase_extractor().phrases([task.captions for _, task in good])):
            row["phrases"] = json.dumps(parsed)
    return rows
