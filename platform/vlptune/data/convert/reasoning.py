"""NLVR2 (its own image pairs) and SNLI-VE (hypotheses about Flickr30k images): the parsers.

* NLVR2: JSON lines ``{identifier, sentence, label: "True"|"False", directory?}``
  (``train.json``, ``dev.json``, ``test1.json``); ``identifier`` is
  ``{split}-{set}-{pair}-{sentence}`` and the pair's images are
  ``{split}-{set}-{pair}-img0.png`` / ``img1.png``, in ``IMAGES/train/<directory>/``
  (train) or ``IMAGES/<split>/``. Many are really JPEG: the pipeline sniffs
  the bytes. Each image is stored once (several statements share a pair), as
  an ``image_text`` record without captions; splits dev -> val, test1 -> test.
* SNLI-VE: ``snli_ve_{train,dev,test}.jsonl`` rows with ``Flickr30K_ID`` (or
  the older ``Flikr30kID`` with ".jpg"), ``sentence2`` (the hypothesis),
  ``gold_label``; the ``ve`` records name Flickr30k images (``flickr30k-<id>``),
  written into the converted Flickr30k root. A row whose gold label is "-"
  (no annotator agreement) is dropped (``no_gold_label``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlptune.data.convert.captioned import ImageCollector, find_image
from vlptune.data.convert.report import Report
from vlptune.data.convert.tasks import DEFAULT_MAX_CAPTION_CHARS, ImageTask, ParsedSource, clean_caption, empty_vocabularies
from vlptune.data.schema import TABLE_NLVR2, TABLE_VE, VE_LABELS, DataError

NLVR2_SPLITS = {"train": "train", "dev": "val", "test1": "test", "test2": "test2"}
NLVR2_ID_RE = re.compile(r"^(train|dev|test1|test2)-(\d+)-(\d+)-(\d+)$")
NLVR2_LABELS = {"true": True, "false": False}
VE_SPLITS = {"train": "train", "dev": "val", "test": "test"}
VE_FILE_RE = re.compile(r"snli_ve_(train|dev|test)")
NO_GOLD = "-"


def _json_lines(path: Path, report: Report, kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-empty line; a line that is not a JSON object counted ``bad_row``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {kind} file not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                obj = exc
            if not isinstance(obj, dict):
                report.count_input(kind)
                report.count_bad("bad_row", f"{path.name}:{n}", "not a JSON object")
                continue
            yield n, obj


def parse_nlvr2(files: list[Path], image_dir: Path, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> ParsedSource:
    """The NLVR2 JSON-lines files: image tasks (one per image) and the ``nlvr2`` records."""
    report = Report()
    collector = ImageCollector(report, max_caption_chars)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in files:
        for n, row in _json_lines(path, report, TABLE_NLVR2):
            report.count_input(TABLE_NLVR2)
            ident = str(row.get("identifier", ""))
            match = NLVR2_ID_RE.match(ident)
            if not match:
                report.count_bad("bad_row", f"{Path(path).name}:{n}", f"identifier {ident!r} is not split-set-pair-sentence")
                continue
            if ident in seen:
                report.count_bad("duplicate_id", ident, "identifier seen before")
                continue
            seen.add(ident)
            label = NLVR2_LABELS.get(str(row.get("label")).lower())
            if label is None:
                report.count_bad("bad_label", ident, f"label {row.get('label')!r}, expected 'True' or 'False'")
                continue
            statement = clean_caption(row.get("sentence"), ident, report, max_caption_chars)
            if statement is None:
                continue
            raw_split, set_id, pair = match.group(1), match.group(2), match.group(3)
            split = NLVR2_SPLITS[raw_split]
            folder = image_dir / raw_split / str(row["directory"]) if row.get("directory") is not None else image_dir / raw_split
            ids = []
            for side in ("img0", "img1"):
                stem = f"{raw_split}-{set_id}-{pair}-{side}"
                image_id = f"nlvr2-{stem}"
                ids.append(image_id)
                if image_id not in collector.tasks:
                    ref = find_image(folder, f"{stem}.png", f"{stem}.jpg")
                    collector.image(ImageTask(image_id, split, {"path": str(ref)}, name=ref.name, require_caption=False))
            records.append({"id": ident, "split": split, "image_id_left": ids[0], "image_id_right": ids[1], "statement": statement, "label": label})
    tasks = collector.finish()
    return ParsedSource("nlvr2", tasks, {TABLE_NLVR2: records}, empty_vocabularies(), report, extra={"format": "nlvr2-jsonl"})


def parse_snli_ve(files: list[Path], max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> tuple[list[dict[str, Any]], Report]:
    """The ``ve`` records of ``snli_ve_{train,dev,test}.jsonl`` (image ids ``flickr30k-<id>``, not yet checked against a root)."""
    report = Report()
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in files:
        match = VE_FILE_RE.search(Path(path).name)
        if not match:
            raise DataError(f"{path}: cannot tell the split from the file name (expected snli_ve_train.jsonl, snli_ve_dev.jsonl or snli_ve_test.jsonl)")
        split = VE_SPLITS[match.group(1)]
        for n, row in _json_lines(path, report, TABLE_VE):
            report.count_input(TABLE_VE)
            rid = str(row.get("pairID") or f"{split}-{n}")
            flickr = row.get("Flickr30K_ID", row.get("Flikr30kID"))
            if flickr is None:
                report.count_bad("bad_row", f"{Path(path).name}:{n}", "no Flickr30K_ID (nor Flikr30kID)")
                continue
            if rid in seen:
                report.count_bad("duplicate_id", rid, "pairID seen before")
                continue
            seen.add(rid)
            gold = row.get("gold_label")
            if gold == NO_GOLD:
                report.count_bad("no_gold_label", rid)
                continue
            if gold not in VE_LABELS:
                report.count_bad("bad_label", rid, f"gold_label {gold!r}, expected one of {list(VE_LABELS)}")
                continue
            hypothesis = clean_caption(row.get("sentence2"), rid, report, max_caption_chars)
            if hypothesis is None:
                continue
            stem = Path(str(flickr)).stem
            records.append({"id": rid, "split": split, "image_id": f"flickr30k-{stem}", "hypothesis": hypothesis, "label": VE_LABELS.index(gold)})
    return records, report
