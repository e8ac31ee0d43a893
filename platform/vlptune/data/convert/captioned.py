"""Parsers of captioned-image datasets: COCO (official and Karpathy), Flickr30k (Karpathy), TSV / JSON-lines pairs.

Each returns a :class:`~vlptune.data.convert.tasks.ParsedSource`: one image
task per distinct image with all its captions, asking for the ``retrieval``
table (the pipeline writes it from the images it stored). Pure functions of
the annotation files; images are only read by the pipeline.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlptune.data.convert.report import Report
from vlptune.data.convert.tasks import DEFAULT_MAX_CAPTION_CHARS, ImageTask, ParsedSource, clean_caption, empty_vocabularies
from vlptune.data.schema import DataError

COCO_OFFICIAL_SPLIT_RE = re.compile(r"(train|val|test)(20\d\d)")
COCO_FILE_ID_RE = re.compile(r"_0*(\d+)\.(jpe?g|png)$", re.IGNORECASE)  # COCO_test2015_000000000001.jpg -> 1
COCO_TEST_SPLIT = "test2015"  # VQA v2 test-dev / test ask about these images; they have no captions
KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_json(path: Path, what: str) -> Any:
    """A JSON file, or DataError naming it (missing, not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: {what} is not valid JSON: {exc}") from None


def require_keys(obj: Any, keys: Iterable[str], where: str) -> None:
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object, found {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")


class ImageCollector:
    """Images by id in first-seen order, captions appended; duplicates and caption problems counted."""

    def __init__(self, report: Report, max_caption_chars: int):
        self.report = report
        self.max_caption_chars = max_caption_chars
        self.tasks: dict[str, ImageTask] = {}

    def image(self, task: ImageTask) -> bool:
        """Register an image; False (counted ``duplicate_id``) when its id is taken."""
        self.report.count_input("images")
        if task.image_id in self.tasks:
            self.report.count_bad("duplicate_id", task.image_id, "image listed twice")
            return False
        self.tasks[task.image_id] = task
        return True

    def caption(self, image_id: str, text: Any) -> None:
        self.report.count_input("captions")
        task = self.tasks.get(image_id)
        if task is None:
            self.report.count_bad("unknown_image", image_id, "caption of an image the file does not list")
            return
        caption = clean_caption(text, image_id, self.report, self.max_caption_chars)
        if caption is not None:
            task.captions.append(caption)

    def finish(self) -> list[ImageTask]:
        """The images that have captions or need none (the others counted ``no_caption``), in first-seen order."""
        out = []
        for task in self.tasks.values():
            if task.captions or not task.require_caption:
                out.append(task)
            else:
                self.report.count_bad("no_caption", task.image_id, "no usable caption")
        return out


def find_image(image_dir: Path, *candidates: str) -> Path:
    """The first existing ``image_dir/candidate``; the first candidate when none exists (the pipeline counts it missing)."""
    paths = [image_dir / c for c in candidates if c]
    for p in paths:
        if p.is_file():
            return p
    return paths[0]


def parse_coco_official(annotation_files: list[Path], image_dir: Path, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> ParsedSource:
    """``captions_{train,val}2014.json``: ``images[]{id,file_name,width,height}``, ``annotations[]{image_id,caption}``.

    The split comes from the file name (``train2014`` -> train, ``val2014`` -> val); images are
    looked for in ``image_dir/<file_name>`` and ``image_dir/<train2014|val2014>/<file_name>``.
    """
    report = Report()
    collector = ImageCollector(report, max_caption_chars)
    for path in annotation_files:
        match = COCO_OFFICIAL_SPLIT_RE.search(Path(path).name)
        if not match:
            raise DataError(f"{path}: cannot tell the split from the file name (expected captions_train2014.json or captions_val2014.json)")
        split, year = match.group(1), match.group(2)
        data = load_json(path, "COCO captions file")
        require_keys(data, ("images", "annotations"), str(path))
        for i, image in enumerate(data["images"]):
            require_keys(image, ("id", "file_name"), f"{path}: images[{i}]")
            size = (int(image["width"]), int(image["height"])) if "width" in image and "height" in image else None
            ref = find_image(image_dir, image["file_name"], f"{split}{year}/{image['file_name']}")
            collector.image(ImageTask(f"coco-{image['id']}", split, {"path": str(ref)}, name=image["file_name"], declared_size=size))
        for i, ann in enumerate(data["annotations"]):
            require_keys(ann, ("image_id", "caption"), f"{path}: annotations[{i}]")
            collector.caption(f"coco-{ann['image_id']}", ann["caption"])
    tasks = collector.finish()
    return ParsedSource("coco", tasks, {}, empty_vocabularies(), report, retrieval=True, extra={"format": "official"})


def parse_karpathy(
    path: Path, image_dir: Path, dataset: str, restval_into: str | None = None, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
) -> ParsedSource:
    """Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images[]{filepath?,filename,cocoid|imgid,split,sentences[]{raw}}``.

    ``restval_into``: the split ``restval`` images join (the papers: train); None keeps ``restval``.
    Image ids: ``coco-<cocoid>`` (the official ids, so VQA v2 finds them), ``flickr30k-<file stem>`` (SNLI-VE's Flickr30K_ID).
    """
    report = Report()
    collector = ImageCollector(report, max_caption_chars)
    data = load_json(path, f"Karpathy split file of {dataset}")
    require_keys(data, ("images",), str(path))
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        require_keys(image, ("filename", "split", "sentences"), where)
        split = image["split"]
        if split not in KARPATHY_SPLITS:
            raise DataError(f"{where}: field 'split' is {split!r}; expected one of {list(KARPATHY_SPLITS)}")
        if split == "restval" and restval_into:
            split = restval_into
        if dataset == "coco":
            require_keys(image, ("cocoid",), where)
            image_id = f"coco-{image['cocoid']}"
        else:
            image_id = f"{dataset}-{Path(image['filename']).stem}"
        rel = f"{image['filepath']}/{image['filename']}" if image.get("filepath") else image["filename"]
        ref = find_image(image_dir, rel, image["filename"])
        if collector.image(ImageTask(image_id, split, {"path": str(ref)}, name=image["filename"])):
            for sentence in image["sentences"]:
                collector.caption(image_id, sentence.get("raw") if isinstance(sentence, Mapping) else None)
    tasks = collector.finish()
    return ParsedSource(dataset, tasks, {}, empty_vocabularies(), report, retrieval=True, extra={"format": "karpathy", "restval_into": restval_into})


def parse_pairs(path: Path, image_dir: Path, fmt: str, split: str, name: str, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> ParsedSource:
    """(image path, caption) rows: a TSV (``image<TAB>caption``, no header) or JSON lines (``{"image": ..., "caption": ...}``).

    Rows naming the same image give one image with several captions (stored
    once); image ids are ``<name>-<row of the image's first caption, 8 digits>``.
    Paths are relative to ``image_dir`` unless absolute.
    """
    report = Report()
    collector = ImageCollector(report, max_caption_chars)
    ids: dict[str, str] = {}
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {fmt} file not found")
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else f
        for n, row in enumerate(rows):
            if fmt == "tsv":
                fields = list(row)
                if len(fields) < 2:
                    report.count_input("captions")
                    report.count_bad("bad_row", f"{path.name}:{n + 1}", f"{len(fields)} column(s), expected image<TAB>caption")
                    continue
                image, caption = fields[0], "\t".join(fields[1:])
            else:
                line = str(row).strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                    image, caption = obj["image"], obj.get("caption")
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    report.count_input("captions")
                    report.count_bad("bad_row", f"{path.name}:{n + 1}", f"not a JSON object with 'image': {exc}")
                    continue
            if image not in ids:
                ids[image] = f"{name}-{n:08d}"
                ref = Path(image) if Path(image).is_absolute() else image_dir / image
                collector.image(ImageTask(ids[image], split, {"path": str(ref)}, name=Path(image).name))
            collector.caption(ids[image], caption)
    tasks = collector.finish()
    return ParsedSource(name, tasks, {}, empty_vocabularies(), report, retrieval=True, extra={"format": fmt})


def coco_test_images(image_dir: Path, report: Report) -> list[ImageTask]:
    """COCO's ``test2015/`` images (no captions: VQA v2 test-dev asks about them), split ``test2015``, ids ``coco-<id>``."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: COCO test2015 image folder not found")
    tasks = []
    for path in sorted(image_dir.iterdir()):
        match = COCO_FILE_ID_RE.search(path.name)
        if not match:
            continue
        report.count_input("images")
        tasks.append(ImageTask(f"coco-{int(match.group(1))}", COCO_TEST_SPLIT, {"path": str(path)}, name=path.name, require_caption=False))
    return tasks
