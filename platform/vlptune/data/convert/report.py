"""The conversion report: bad records counted per reason (with a few ids each), fixes, totals.

A bad record never stops a conversion and is never silent: every converter
counts it here under one of the reasons of :data:`REASONS`, and the report is
written to ``OUT/conversion_report.json`` and printed as a table at the end.
``--max-bad-fraction`` turns a conversion that is mostly garbage into a
failure (:class:`TooManyBadRecords`, exit code 2) with the report written, so
nobody trains on a nearly empty dataset by mistake.

Dropped records count against the fraction; kept-but-changed ones
(``caption_truncated``, the image fixes) are listed but do not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlptune.data.schema import DataError
from vlptune.io import atomic_write_text

REPORT_NAME = "conversion_report.json"
DEFAULT_MAX_BAD_FRACTION = 0.05  # a few percent: real datasets lose ~1% (dead links, broken files)
EXAMPLES_PER_REASON = 5

# reason -> (what it means, whether the record is dropped)
REASONS: dict[str, tuple[str, bool]] = {
    "missing_file": ("image file not found", True),
    "zero_byte_image": ("image file of 0 bytes", True),
    "truncated_image": ("image data cut short", True),
    "undecodable_image": ("bytes no image decoder reads", True),
    "image_too_small": ("shorter side below --min-side", True),
    "empty_caption": ("empty or whitespace caption (the caption is dropped)", True),
    "no_caption": ("image without any usable caption (the image is dropped)", True),
    "caption_truncated": ("caption longer than --max-caption-chars (kept, truncated)", False),
    "duplicate_id": ("id seen before (the later record is dropped)", True),
    "unknown_image": ("annotation for an image the source does not list", True),
    "image_unusable": ("record whose image was dropped", True),
    "no_answers": ("question without answers (test-dev questions excepted)", True),
    "no_gold_label": ("SNLI-VE pair without annotator agreement (gold_label '-')", True),
    "bad_label": ("label outside the documented values", True),
    "bad_box": ("box with non-positive width or height (the box is dropped)", True),
    "in_coco_eval": ("Visual Genome image that is in COCO val/test (--drop-coco-eval)", True),
    "bad_row": ("row that is not valid JSON / has too few columns", True),
}


class TooManyBadRecords(DataError):
    """More records dropped than ``--max-bad-fraction`` allows (the report is written)."""


@dataclass
class Report:
    """Counters of one conversion; merge-able (one per chunk, summed)."""

    bad: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    fixes: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)  # records read, per kind ("images", "vqa", ...)

    def count_bad(self, reason: str, record_id: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise KeyError(f"unknown bad-record reason {reason!r}; known: {sorted(REASONS)}")
        self.bad[reason] = self.bad.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{record_id}: {detail}" if detail else str(record_id))

    def count_fix(self, kind: str, n: int = 1) -> None:
        self.fixes[kind] = self.fixes.get(kind, 0) + n

    def count_input(self, kind: str, n: int = 1) -> None:
        self.inputs[kind] = self.inputs.get(kind, 0) + n

    def merge(self, other: Report) -> None:
        for reason, n in other.bad.items():
            self.bad[reason] = self.bad.get(reason, 0) + n
            room = EXAMPLES_PER_REASON - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(other.examples.get(reason, [])[: max(0, room)])
        for kind, n in other.fixes.items():
            self.count_fix(kind, n)
        for kind, n in other.inputs.items():
            self.count_input(kind, n)

    def dropped(self) -> int:
        return sum(n for reason, n in self.bad.items() if REASONS[reason][1])

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": dict(sorted(self.inputs.items())),
            "bad": {
                r: {"count": n, "meaning": REASONS[r][0], "dropped": REASONS[r][1], "examples": self.examples.get(r, [])} for r, n in sorted(self.bad.items())
            },
            "fixes": dict(sorted(self.fixes.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        bad = data.get("bad", {})
        return cls(
            bad={r: int(v["count"]) for r, v in bad.items()},
            examples={r: list(v.get("examples", [])) for r, v in bad.items()},
            fixes=dict(data.get("fixes", {})),
            inputs=dict(data.get("inputs", {})),
        )


def bad_fraction(report: Report) -> float:
    """Dropped records over records read (all kinds together)."""
    total = sum(report.inputs.values())
    return report.dropped() / total if total else 0.0


def check_bad_fraction(report: Report, max_fraction: float, report_path: Path) -> None:
    """Raise :class:`TooManyBadRecords` when the dropped fraction exceeds ``max_fraction``."""
    fraction = bad_fraction(report)
    if fraction > max_fraction:
        worst = sorted(((n, r) for r, n in report.bad.items() if REASONS[r][1]), reverse=True)[:3]
        raise TooManyBadRecords(
            f"{report_path}: {report.dropped()} of {sum(report.inputs.values())} records dropped "
            f"({fraction:.1%}), more than --max-bad-fraction {max_fraction:.1%}; most common: "
            + ", ".join(f"{r} ({n})" for n, r in worst)
            + ". Fix the inputs (paths? the right image folder?) or raise --max-bad-fraction"
        )


def write_report(out_dir: Path, report: Report, summary: Mapping[str, Any], name: str = REPORT_NAME) -> Path:
    """Write the report (with ``summary``'s keys first) as ``out_dir/name``, atomically; its path."""
    path = out_dir / name
    atomic_write_text(path, json.dumps({**summary, **report.to_json()}, indent=2) + "\n")
    return path


def format_report(report: Report) -> str:
    """The table printed at the end of a conversion."""
    lines = ["  read: " + ", ".join(f"{n} {k}" for k, n in sorted(report.inputs.items()))]
    if report.bad:
        width = max(len(r) for r in report.bad) + 2
        lines.append("  " + "bad record".ljust(width) + "count".rjust(7) + "  example")
        for reason, n in sorted(report.bad.items()):
            examples = report.examples.get(reason) or [""]
            kept = "" if REASONS[reason][1] else " (kept)"
            lines.append("  " + reason.ljust(width) + str(n).rjust(7) + "  " + examples[0] + kept)
    else:
        lines.append("  no bad records")
    if report.fixes:
        lines.append("  fixed: " + ", ".join(f"{k} {n}" for k, n in sorted(report.fixes.items())))
    lines.append(f"  dropped {report.dropped()} of {sum(report.inputs.values())} records ({bad_fraction(report):.2%})")
    return "\n".join(lines)
