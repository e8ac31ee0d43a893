"""Hungarian matching (objectives/matching.py) against brute force, and SPL's targets from it."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlptune.objectives.matching import batched_hungarian_match, hungarian_match
from vlptune.objectives.spl import match_targets


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def brute_force(cost: torch.Tensor) -> float:
    """Minimum total cost over every assignment of min(Q, T) distinct pairs."""
    q, t = cost.shape
    if q == 0 or t == 0:
        return 0.0
    if q >= t:
        return min(sum(float(cost[rows[j], j]) for j in range(t)) for rows in itertools.permutations(range(q), t))
    return min(sum(float(cost[i, cols[i]]) for i in range(q)) for cols in itertools.permutations(range(t), q))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 2), (5, 3), (2, 4), (6, 6), (6, 1), (4, 4)])
def test_hungarian_matches_brute_force(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for trial in range(6):
        cost = torch.rand(shape, generator=g)
        if trial % 2:  # ties and integer costs
            cost = (cost * 3).floor()
        rows, cols = hungarian_match(cost)
        assert len(rows) == len(cols) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert rows.tolist() == sorted(rows.tolist())
        assert float(cost[rows, cols].sum()) == pytest.approx(brute_force(cost), abs=1e-6)


def test_hungarian_with_no_targets_or_no_queries():
    for shape in [(5, 0), (0, 3), (0, 0)]:
        rows, cols = hungarian_match(torch.zeros(shape))
        assert rows.dtype == cols.dtype == torch.int64
        assert rows.numel() == cols.numel() == 0


def test_hungarian_refuses_bad_input():
    with pytest.raises(ValueError, match=r"cost must be \[Q,T\]"):
        hungarian_match(torch.zeros(2, 2, 2))
    bad = torch.zeros(2, 2)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        hungarian_match(bad)


def test_batched_match_uses_each_items_own_targets():
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(3, 5, 4, generator=g)
    cost[1, :, 2:] = -100.0  # padding columns of item 1 must never be used
    counts = [4, 2, 0]
    out = batched_hungarian_match(cost, torch.tensor(counts))
    assert len(out) == 3
    for b, (rows, cols) in enumerate(out):
        assert len(cols) == counts[b]
        assert (cols < counts[b]).all()
        assert float(cost[b, rows, cols].sum()) == pytest.approx(brute_force(cost[b, :, : counts[b]]), abs=1e-6)
    with pytest.raises(ValueError, match="3 target counts for a batch of 2"):
        batched_hungarian_match(cost[:2], [1, 1, 1])
    with pytest.raises(ValueError, match="item 0 has 5 targets but the cost has 4 columns"):
        batched_hungarian_match(cost, [5, 0, 0])


def test_spl_targets_give_each_label_the_query_that_believes_it_most():
    # 2 rows, 4 queries, 3 classes + no-object (index 3)
    probs = torch.full((2, 4, 4), 0.01)
    probs[0, 2, 1] = 0.9  # query 2 believes class 1
    probs[0, 0, 0] = 0.8  # query 0 believes class 0
    probs[0, 1, 0] = 0.7  # query 1 also likes class 0, but less
    labels = torch.tensor([[1, -1, 0], [-1, -1, -1]])  # padded labels anywhere in the row
    targets, matched = match_targets(probs, labels, no_object=3)
    assert targets[0].tolist() == [0, 3, 1, 3]
    assert matched[0].tolist() == [True, False, True, False]
    assert targets[1].tolist() == [3, 3, 3, 3] and not matched[1].any()  # no objects: all no-object
