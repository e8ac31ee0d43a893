"""Visual Genome: region descriptions as captions (with their boxes), objects with names and attributes.

Inputs (VG v1.2 / v1.4 JSON): ``image_data.json`` (``[{image_id, url, width,
height, coco_id, flickr_id}]``), ``region_descriptions.json`` (``[{id,
regions: [{image_id, phrase, x, y, width, height}]}]``), ``objects.json``
(``[{image_id, objects: [{object_id, x, y, w, h, names}]}]``) and optionally
``attributes.json`` (same shape, each object with ``attributes``).

* captions: the region phrases of an image (cleaned, empty ones counted),
  ``caption_boxes`` their regions; objects: ``box`` from ``x, y, w, h``,
  ``label`` = index of the object's first name (lower-cased) in the class
  vocabulary: the ``max_classes`` most frequent names (the detection-based
  papers use 1600 classes and 400 attributes); an object whose name is
  outside it is left out (counted as the fix ``object_outside_vocabulary``);
* ``drop_coco_ids``: VG images whose ``coco_id`` is one of these are dropped
  (counted ``in_coco_eval``): pass COCO's Karpathy val + test ids so no VG
  caption of a COCO test image leaks into pretraining (every VLP paper does);
* images are found at ``images/VG_100K/<id>.jpg``, ``images/VG_100K_2/<id>.jpg``
  or ``images/<id>.jpg``; image ids are ``vg-<image_id>``; every image goes to ``split``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from vlptune.data.convert.captioned import ImageCollector, find_image, load_json, require_keys
from vlptune.data.convert.images import xywh_to_xyxy
from vlptune.data.convert.report import Report
from vlptune.data.convert.tasks import DEFAULT_MAX_CAPTION_CHARS, ImageTask, ParsedSource, empty_vocabularies
from vlptune.data.schema import DataError

DEFAULT_MAX_CLASSES = 1600  # Anderson et al.'s VG vocabulary size (the detection-based VLP papers)
DEFAULT_MAX_ATTRIBUTES = 400
VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")
FIX_OUTSIDE_VOCAB = "object_outside_vocabulary"


def _list_of(data: Any, path: Path, what: str) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what}, found {type(data).__name__}")
    return data


def _name(obj: Mapping[str, Any]) -> str | None:
    names = obj.get("names") or ([obj["name"]] if obj.get("name") else [])
    return str(names[0]).strip().lower() if names and str(names[0]).strip() else None


def _box(obj: Mapping[str, Any]) -> list[float]:
    return xywh_to_xyxy([obj["x"], obj["y"], obj.get("w", obj.get("width", 0)), obj.get("h", obj.get("height", 0))])


def parse_vg(
    image_data: Path,
    regions: Path,
    objects: Path,
    image_dir: Path,
    attributes: Path | None = None,
    drop_coco_ids: Collection[int] = (),
    split: str = "train",
    max_classes: int = DEFAULT_MAX_CLASSES,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
) -> ParsedSource:
    report = Report()
    collector = ImageCollector(report, max_caption_chars)
    drop = {int(i) for i in drop_coco_ids}
    dropped: set[str] = set()  # their regions and objects are skipped, not counted again
    for i, image in enumerate(_list_of(load_json(image_data, "VG image_data.json"), image_data, "images")):
        require_keys(image, ("image_id",), f"{image_data}: [{i}]")
        image_id = f"vg-{image['image_id']}"
        if image.get("coco_id") is not None and int(image["coco_id"]) in drop:
            report.count_input("images")
            report.count_bad("in_coco_eval", image_id, f"coco_id {image['coco_id']}")
            dropped.add(image_id)
            continue
        file_name = f"{image['image_id']}.jpg"
        ref = find_image(image_dir, *(f"{d}/{file_name}" for d in VG_IMAGE_DIRS), file_name)
        size = (int(image["width"]), int(image["height"])) if image.get("width") and image.get("height") else None
        collector.image(ImageTask(image_id, split, {"path": str(ref)}, name=file_name, declared_size=size, caption_boxes=[]))
    for entry in _list_of(load_json(regions, "VG region_descriptions.json"), regions, "images"):
        for region in entry.get("regions", []):
            image_id = f"vg-{region.get('image_id', entry.get('id'))}"
            if image_id in dropped:
                continue
            task = collector.tasks.get(image_id)
            before = len(task.captions) if task else 0
            collector.caption(image_id, region.get("phrase"))
            if task is not None and len(task.captions) > before:
                assert task.caption_boxes is not None  # set for every VG task above
                task.caption_boxes.append(_box(region))
    by_image, classes, attribute_vocab = vg_objects(objects, attributes, collector.tasks, dropped, report, max_classes, max_attributes)
    for image_id, objs in by_image.items():
        collector.tasks[image_id].objects.extend(objs)
    vocab = empty_vocabularies(classes, attribute_vocab)
    return ParsedSource("vg", collector.finish(), {}, vocab, report, extra={"format": "visual-genome", "dropped_coco_ids": len(drop)})


def coco_eval_ids(karpathy_coco: Path) -> set[int]:
    """The COCO ids of Karpathy's val and test images (``dataset_coco.json``): what VG must not train on."""
    data = load_json(karpathy_coco, "Karpathy split file of coco")
    require_keys(data, ("images",), str(karpathy_coco))
    return {int(im["cocoid"]) for im in data["images"] if im.get("split") in ("val", "test") and "cocoid" in im}


def vg_objects(
    objects: Path,
    attributes: Path | None,
    known: Collection[str],
    skip: Collection[str],
    report: Report,
    max_classes: int = DEFAULT_MAX_CLASSES,
    max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
) -> tuple[dict[str, list[dict[str, Any]]], list[str], list[str]]:
    """VG objects of the ``known`` images (ids ``vg-<image_id>``): per image ``{box, label, name, attributes}``; classes; attributes.

    Objects of ``skip`` images are ignored; of other unknown images counted ``unknown_image``; the
    vocabularies are the ``max_classes`` / ``max_attributes`` most frequent names (ties by name);
    an object whose name is outside them is left out (the fix ``object_outside_vocabulary``).
    """
    by_image: dict[str, list[dict[str, Any]]] = {}
    names: Counter[str] = Counter()
    attrs: Counter[str] = Counter()
    for source, path in (("objects", objects), ("attributes", attributes)):
        if path is None:
            continue
        for i, entry in enumerate(_list_of(load_json(path, f"VG {source}.json"), path, "images")):
            require_keys(entry, ("image_id",), f"{path}: [{i}]")
            image_id = f"vg-{entry['image_id']}"
            if image_id in skip:
                continue
            if source == "attributes":  # attach to the object of the same id
                targets = {t["object_id"]: t for t in by_image.get(image_id, [])}
                for obj in entry.get("attributes") or []:
                    target = targets.get(obj.get("object_id"))
                    if target is not None:
                        target["attributes"] = [str(a).strip().lower() for a in obj.get("attributes") or [] if str(a).strip()]
                        attrs.update(target["attributes"])
                continue
            for obj in entry.get("objects", []):
                report.count_input("objects")
                if image_id not in known:
                    report.count_bad("unknown_image", image_id, f"object {obj.get('object_id')}")
                    continue
                name = _name(obj)
                if name is None:
                    continue
                names[name] += 1
                by_image.setdefault(image_id, []).append({"object_id": obj.get("object_id"), "name": name, "box": _box(obj), "attributes": []})
    classes = [n for n, _ in sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))[:max_classes]]
    attribute_vocab = [a for a, _ in sorted(attrs.items(), key=lambda kv: (-kv[1], kv[0]))[:max_attributes]]
    class_index = {n: k for k, n in enumerate(classes)}
    attr_index = {a: k for k, a in enumerate(attribute_vocab)}
    out: dict[str, list[dict[str, Any]]] = {}
    for image_id, objs in by_image.items():
        kept = out.setdefault(image_id, [])
        for obj in objs:
            if obj["name"] not in class_index:
                report.count_fix(FIX_OUTSIDE_VOCAB)
                continue
            kept.append(
                {
                    "box": obj["box"],
                    "label": class_index[obj["name"]],
                    "name": obj["name"],
                    "attributes": [attr_index[a] for a in obj["attributes"] if a in attr_index],
                }
            )
    return out, classes, attribute_vocab
