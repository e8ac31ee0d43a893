"""Atomic file writes (write to a temporary sibling, then rename over the target), fsync helpers,
and the "non-finite is worst" rule of scalar metrics (:func:`finite`, :func:`rank_value`)."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TypeGuard


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power cut


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (creations, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """Flush every file under ``path``, then every directory (deepest first), ``path`` last:
    what a directory about to be renamed into place holds is on disk before the rename."""
    for parent, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


WORST_MAX = -sys.float_info.max  # the value a non-finite metric ranks as when higher is better
WORST_MIN = sys.float_info.max  # ... and when lower is better


def rank_value(value: Any, mode: str) -> float:
    """``value`` as a float to rank by in ``mode`` (``max``/``min``), a non-finite or missing one the worst.

    The worst is finite (the largest float of the wrong sign), so sorting,
    percentiles and schedulers that compare rewards treat it as a real, very
    bad value: NaN compares false with everything and would win by default.
    Tensor metrics use :func:`vlptune.objectives.base.predicted` (accuracies)
    and :func:`vlptune.train.evaluate.gt_ranks` (retrieval) for the same rule.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
    if finite(value):
        return float(value)
    return WORST_MAX if mode == "max" else WORST_MIN


def finite(value: Any) -> TypeGuard[float]:
    """A real number (an int or a float, not a bool) that is neither NaN nor infinite: a metric worth ranking."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
