"""Atomic file writes (write to a temporary sibling, then rename over the target), and :func:`finite`."""

from __future__ import annotations

import math
import os
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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite(value: Any) -> TypeGuard[float]:
    """A real number (an int or a float, not a bool) that is neither NaN nor infinite: a metric worth ranking."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
