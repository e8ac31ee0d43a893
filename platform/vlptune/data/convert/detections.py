"""Detector outputs (KD-VLP, SPL: boxes, labels, scores, RoI features) into the ``objects`` of a converted root.

Our format (docs/convert.md), JSON lines, one per image::

    {"image_id": "coco-139", "width": 640, "height": 426,
     "boxes": [[x0, y0, x1, y1], ...], "labels": [3, 17], "scores": [0.93, 0.41],
     "attributes": [[5], []], "feature_offset": 0}

``boxes`` are in pixels of the ``width`` x ``height`` image the detector saw
(the original, upright); they are scaled to the stored image. ``labels`` index
the ``--classes`` file (one name a line); ``attributes`` (optional) index the
``--attribute-names`` file; ``feature_offset`` (with ``--features F.npy``, a
float array ``[total boxes, D]``) is the row of the image's first box. Boxes
scoring below ``min_score`` are left out, then the ``max_boxes`` best kept
(scores are not stored: they only choose the boxes).

Ground truth as a stand-in detector: :func:`vg_detections` turns Visual
Genome's ``objects.json`` (and ``attributes.json``) into the same entries
for the VG images that are COCO images (``coco_id``), score 1.

:func:`apply_detections` rewrites the root's ``image_text`` shards with the
new objects: every shard is first written to ``ROOT/.detections/``, then all
are moved over the old ones and the manifest (new sha256, classes,
attributes, RoI width) is written last. Images without an entry keep no
objects; entries for images the root lacks are counted ``unknown_image``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vlptune.data.convert.captioned import load_json
from vlptune.data.convert.report import Report, check_bad_fraction, format_report, write_report
from vlptune.data.convert.vg import DEFAULT_MAX_ATTRIBUTES, DEFAULT_MAX_CLASSES, vg_objects
from vlptune.data.schema import TABLE_IMAGE_TEXT, DataError
from vlptune.data.shards import read_manifest, read_shard, shard_name, write_manifest, write_shard
from vlptune.data.similarity import MANIFEST_KEY as SIMILARITY_MANIFEST_KEY

DEFAULT_MIN_SCORE = 0.2  # the bottom-up-attention extraction threshold the detector-based papers use
DEFAULT_MAX_BOXES = 100
STAGING = ".detections"
GT_SCORE = 1.0
REQUIRED = ("image_id", "width", "height", "boxes", "labels")


def read_names(path: Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_detections(path: Path, report: Report) -> dict[str, dict[str, Any]]:
    """Our JSON-lines format: entries by image id (bad lines counted ``bad_row``, repeats ``duplicate_id``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: detections file not found")
    out: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.count_input("detections")
            entry: Any
            try:
                entry = json.loads(line)
                missing = [k for k in REQUIRED if k not in entry]
            except (json.JSONDecodeError, TypeError):
                entry, missing = None, list(REQUIRED)
            if not isinstance(entry, dict) or missing:
                report.count_bad("bad_row", f"{path.name}:{n}", f"not a JSON object with {list(REQUIRED)} (missing {missing})")
                continue
            if len(entry["labels"]) != len(entry["boxes"]) or len(entry.get("scores") or entry["boxes"]) != len(entry["boxes"]):
                report.count_bad("bad_row", f"{path.name}:{n}", "boxes, labels and scores differ in length")
                continue
            if entry["image_id"] in out:
                report.count_bad("duplicate_id", str(entry["image_id"]), "image listed twice")
                continue
            out[str(entry["image_id"])] = entry
    return out


def vg_detections(
    image_data: Path,
    objects: Path,
    attributes: Path | None,
    report: Report,
    max_classes: int = DEFAULT_MAX_CLASSES,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """VG ground-truth objects as detections of the COCO images they show (``coco-<coco_id>``); classes; attributes."""
    images = load_json(image_data, "VG image_data.json")
    if not isinstance(images, list):
        raise DataError(f"{image_data}: expected a JSON list of images")
    coco = {f"vg-{im['image_id']}": im for im in images if isinstance(im, Mapping) and im.get("coco_id") is not None and "image_id" in im}
    skip = {f"vg-{im['image_id']}" for im in images if isinstance(im, Mapping) and "image_id" in im and f"vg-{im['image_id']}" not in coco}
    by_image, classes, attribute_vocab = vg_objects(objects, attributes, coco, skip, report, max_classes, max_attributes)
    out = {}
    for vg_id, objs in by_image.items():
        im = coco[vg_id]
        out[f"coco-{im['coco_id']}"] = {
            "image_id": f"coco-{im['coco_id']}",
            "width": im.get("width"),
            "height": im.get("height"),
            "boxes": [o["box"] for o in objs],
            "labels": [o["label"] for o in objs],
            "scores": [GT_SCORE] * len(objs),
            "attributes": [o["attributes"] for o in objs],
        }
    return out, classes, attribute_vocab


def objects_of(
    entry: Mapping[str, Any], width: int, height: int, classes: list[str], features: np.ndarray | None, min_score: float, max_boxes: int, report: Report
) -> list[dict[str, Any]]:
    """The stored ``objects`` of one image from its detection entry (boxes scaled to ``width`` x ``height``)."""
    rid = str(entry["image_id"])
    sx, sy = width / float(entry["width"] or width), height / float(entry["height"] or height)
    scores = entry.get("scores") or [GT_SCORE] * len(entry["boxes"])
    attributes = entry.get("attributes") or [[] for _ in entry["boxes"]]
    order = sorted((j for j in range(len(entry["boxes"])) if scores[j] >= min_score), key=lambda j: -scores[j])[:max_boxes]
    out = []
    for j in order:
        label = int(entry["labels"][j])
        if not 0 <= label < len(classes):
            report.count_bad("bad_label", rid, f"label {label} outside the {len(classes)} classes")
            continue
        x0, y0, x1, y1 = (float(v) for v in entry["boxes"][j])
        box = [min(max(x0 * sx, 0.0), width), min(max(y0 * sy, 0.0), height), min(max(x1 * sx, 0.0), width), min(max(y1 * sy, 0.0), height)]
        if box[2] <= box[0] or box[3] <= box[1]:
            report.count_bad("bad_box", rid, f"box {entry['boxes'][j]} empty after scaling and clipping")
            continue
        feature = None
        if features is not None:
            row = int(entry.get("feature_offset", -1)) + j
            if not 0 <= row < len(features) or "feature_offset" not in entry:
                raise DataError(f"detections of {rid}: feature row {row} outside the features file ({len(features)} rows)")
            feature = [float(v) for v in features[row]]
        out.append({"box": box, "label": label, "name": classes[label], "attributes": [int(a) for a in attributes[j]], "roi_feature": feature})
    return out


def apply_detections(
    root: Path,
    detections: Mapping[str, Mapping[str, Any]],
    classes: list[str],
    report: Report,
    attribute_names: list[str] | None = None,
    features: np.ndarray | None = None,
    min_score: float = DEFAULT_MIN_SCORE,
    max_boxes: int = DEFAULT_MAX_BOXES,
    max_bad_fraction: float = 1.0,
    source: str = "detections",
    progress: Any = None,
) -> dict[str, Any]:
    """Replace the ``objects`` of ``root``'s images by their detections (see the module docstring); the new manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    staging = root / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    seen: set[str] = set()
    staged: list[tuple[Path, Path, dict]] = []
    boxes = 0
    for split, entries in manifest["shards"].get(TABLE_IMAGE_TEXT, {}).items():
        for index, entry in enumerate(entries):
            if entry["path"] != f"{TABLE_IMAGE_TEXT}/{shard_name(split, index)}":
                raise DataError(f"{root / 'manifest.json'}: shard {entry['path']} is not named {shard_name(split, index)}; cannot rewrite it in place")
            records = read_shard(root / entry["path"], TABLE_IMAGE_TEXT).to_pylist()
            for record in records:
                det = detections.get(record["image_id"])
                seen.add(record["image_id"])
                record["objects"] = objects_of(det, record["width"], record["height"], classes, features, min_score, max_boxes, report) if det else []
                boxes += len(record["objects"])
                record["phrase_label_sim"] = None  # computed against the old objects
            new = write_shard(staging, TABLE_IMAGE_TEXT, split, index, records)
            staged.append((staging / new["path"], root / entry["path"], new))
    for image_id in sorted(set(detections) - seen):
        report.count_bad("unknown_image", image_id, "detections of an image the root does not hold")
    report_path = write_report(root, report, {"source": source, "into": str(root), "objects": boxes}, name=f"conversion_report_{source}.json")
    check_bad_fraction(report, max_bad_fraction, report_path)
    for tmp, final, _ in staged:
        os.replace(tmp, final)
    by_path = {new["path"]: new for _, _, new in staged}
    for split, entries in manifest["shards"][TABLE_IMAGE_TEXT].items():
        manifest["shards"][TABLE_IMAGE_TEXT][split] = [by_path[e["path"]] for e in entries]
    manifest["vocabularies"].update(
        classes=list(classes), attributes=list(attribute_names or []), roi_feature_dim=int(features.shape[1]) if features is not None else 0
    )
    manifest.pop(SIMILARITY_MANIFEST_KEY, None)  # the similarities were of the old objects
    manifest.setdefault("added", {})[source] = {"tables": [TABLE_IMAGE_TEXT], "report": report_path.name}
    write_manifest(root, manifest)
    shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        progress(f"{root}: {boxes} objects on {len(seen & set(detections))} of {len(seen)} images\n{format_report(report)}\nreport: {report_path}")
    return manifest
