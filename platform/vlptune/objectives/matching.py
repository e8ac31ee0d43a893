"""Hungarian matching (minimum-cost bipartite assignment) for set-prediction losses.

``hungarian_match(cost [Q,T])`` assigns each of the T targets to a distinct
query (Q >= T in set prediction; Q < T also works and matches Q targets) with
``scipy.optimize.linear_sum_assignment``. SPL and DETR-style detection build
their own cost matrix and call it per image; ``batched_hungarian_match`` does
that over a padded batch.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment for ``cost`` [Q,T]: ``(rows, cols)`` int64 CPU tensors, ``cost[rows, cols]`` matched.

    ``min(Q, T)`` pairs are returned, sorted by row. T (or Q) may be 0: both
    results are then empty. Non-finite costs are refused.
    """
    if cost.dim() != 2:
        raise ValueError(f"hungarian_match: cost must be [Q,T]; got shape {tuple(cost.shape)}")
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    array = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(array).all():
        raise ValueError("hungarian_match: cost has NaN or infinite entries")
    rows, cols = linear_sum_assignment(array)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def batched_hungarian_match(cost: Tensor, num_targets: Tensor | list[int]) -> list[tuple[Tensor, Tensor]]:
    """Per-item matches for a padded batch: ``cost`` [B,Q,Tmax], ``num_targets`` [B] real targets per item.

    Item b is matched on ``cost[b, :, :num_targets[b]]``; returns B ``(rows, cols)`` pairs (CPU int64).
    One device-to-host copy for the whole batch.
    """
    if cost.dim() != 3:
        raise ValueError(f"batched_hungarian_match: cost must be [B,Q,T]; got shape {tuple(cost.shape)}")
    counts = [int(n) for n in (num_targets.tolist() if isinstance(num_targets, Tensor) else num_targets)]
    if len(counts) != cost.shape[0]:
        raise ValueError(f"batched_hungarian_match: {len(counts)} target counts for a batch of {cost.shape[0]}")
    host = cost.detach().to("cpu", torch.float64)
    out = []
    for b, n in enumerate(counts):
        if n < 0 or n > cost.shape[2]:
            raise ValueError(f"batched_hungarian_match: item {b} has {n} targets but the cost has {cost.shape[2]} columns")
        out.append(hungarian_match(host[b, :, :n]))
    return out
