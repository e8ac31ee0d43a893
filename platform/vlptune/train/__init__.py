"""The per-worker training loop, optimisers, checkpoints and TensorBoard logging.

``train_worker`` (loop.py) is the one training loop; ``Reporter`` /
``LocalReporter`` (reporting.py) receive its metrics.
"""

from __future__ import annotations

from typing import Any

from vlptune.train import reporting

__all__ = ["LocalReporter", "Reporter", "train_worker"]


def __getattr__(name: str) -> Any:  # lazy: importing vlptune.train must not import torch models
    if name == "train_worker":
        from vlptune.train.loop import train_worker  # loop imports torch: only when this runs

        return train_worker
    if name in ("Reporter", "LocalReporter"):
        return getattr(reporting, name)
    raise AttributeError(f"module 'vlptune.train' has no attribute {name!r}")
