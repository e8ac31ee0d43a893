"""How the training loop hands its metrics (and checkpoints) to whoever runs it.

The loop knows only the :class:`Reporter` protocol. ``vlptune train`` uses
:class:`LocalReporter`; a Ray Train run passes an adapter that calls
``ray.train.report`` (that adapter lives with the Ray code, so nothing here
imports Ray).

Contract: ``report`` is called at every evaluation (and once at the end) on
EVERY rank, because Ray Train requires all workers to report; the
``checkpoint_dir`` is the directory of the checkpoint written at that step on
rank 0 and None on the other ranks (or when no checkpoint was written).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO, runtime_checkable

LEAD_KEYS = ("step", "loss")  # first on every report line
RETRIEVAL_LINE_KEYS = ("retrieval/rsum", "retrieval/tr_r1", "retrieval/ir_r1")  # the loop's own evaluation (train/evaluate.py)
ACCURACY_SUFFIX = "_acc"  # every objective's accuracy, whatever the objective
PROGRESS_ATTR = "progress"  # the loop's log records of a training window carry ``step/max_steps, ETA ...`` under this attribute
PROGRESS_EVERY_S = 15.0  # ProgressLines: at most one line this often


def line_keys(metrics: dict[str, Any]) -> list[str]:
    """What a report line shows: step and loss, each objective's training and validation accuracy, retrieval."""
    train_acc = sorted(k for k in metrics if "/" not in k and k.endswith(ACCURACY_SUFFIX))
    val_acc = sorted(k for k in metrics if k.startswith("val/") and k.endswith(ACCURACY_SUFFIX))
    return [k for k in (*LEAD_KEYS, *train_acc, *val_acc, *RETRIEVAL_LINE_KEYS) if k in metrics]


@runtime_checkable
class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Receive one evaluation's metrics and, on rank 0, the checkpoint written with them."""


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3700`` -> ``1h01m``; under a minute: ``42s``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


class LocalReporter:
    """Prints one line per report and keeps every report in ``history``.

    ``keys``: metrics shown on the line (those present; default :func:`line_keys`);
    ``stream``: where to print (stdout by default); ``quiet`` keeps history without printing.
    """

    def __init__(self, keys: tuple[str, ...] | None = None, stream: TextIO | None = None, quiet: bool = False):
        self.keys = keys
        self.stream = stream
        self.quiet = quiet
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[str | None] = []

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        self.checkpoints.append(checkpoint_dir)
        if self.quiet:
            return
        keys = self.keys if self.keys is not None else line_keys(metrics)
        parts = [f"{key}={format_value(metrics[key])}" for key in keys if key in metrics]
        if checkpoint_dir:
            parts.append(f"checkpoint={checkpoint_dir}")
        print("[report] " + " ".join(parts), file=self.stream or sys.stdout, flush=True)

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


class ProgressLines(logging.Handler):
    """Prints ``prefix`` + the loop's progress (``300/1000, ETA 1m10s``) at most every ``every_s`` seconds.

    Attach it to the loop's logger (``vlptune.train``, at INFO) where a
    console shows a long run that is otherwise quiet (the demo's backbone
    stage); the loop's other log lines are not printed.
    """

    def __init__(self, prefix: str = "  ", every_s: float = PROGRESS_EVERY_S, stream: TextIO | None = None):
        super().__init__(logging.INFO)
        self.prefix = prefix
        self.every_s = every_s
        self.stream = stream
        self.last: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        progress = getattr(record, PROGRESS_ATTR, "")
        now = time.monotonic()
        if not progress or (self.last is not None and now - self.last < self.every_s):
            return
        self.last = now
        print(f"{self.prefix}{progress}", file=self.stream or sys.stdout, flush=True)


LOOP_LOGGER = "vlptune.train"  # train/loop.py's logger


@contextmanager
def loop_progress(prefix: str = "  ", every_s: float = PROGRESS_EVERY_S, stream: TextIO | None = None) -> Iterator[ProgressLines]:
    """While the block runs, the loop's progress reaches ``stream`` (stdout) through a :class:`ProgressLines` (its logger at INFO)."""
    logger = logging.getLogger(LOOP_LOGGER)
    handler = ProgressLines(prefix, every_s, stream)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
