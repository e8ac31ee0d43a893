"""MVM's chance level (objectives/mvm.py): the training prior over codes, not the batch's own majority."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_recipe
from test_objectives import hand_batch
from vlptune.objectives.base import build_pretrainer
from vlptune.objectives.mvm import PRIOR_MOMENTUM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is as fast and immune to a busy second core


def _forward(pre, seed: int) -> dict:
    _, metrics = pre(hand_batch(images=4, seed=seed), torch.Generator().manual_seed(seed))
    return {k: float(v) for k, v in metrics.items()}


def test_mvm_chance_is_the_accuracy_of_the_training_prior_read_before_the_batch():
    torch.manual_seed(0)
    pre = build_pretrainer(tiny_recipe("mvm-chance", {"itm": {"weight": 1.0}, "mvm": {"weight": 1.0, "prob": 1.0}})).train()
    mvm = pre.objectives["mvm"]
    assert float(mvm.prior_counts.sum()) == 0.0
    first = _forward(pre, 0)
    counts = mvm.prior_counts.clone()  # from zeros: the first batch's histogram of masked codes
    assert float(counts.sum()) > 0 and torch.equal(counts, counts.round())
    assert first["mvm_chance"] == pytest.approx(float(counts[0] / counts.sum()))  # an all-zero prior answers code 0
    assert first["mvm_majority"] == pytest.approx(float(counts.max() / counts.sum()))
    second = _forward(pre, 1)
    added = mvm.prior_counts - PRIOR_MOMENTUM * counts  # the second batch's histogram
    assert float(added.sum()) > 0
    # the answer is the code most frequent *before* this batch, scored on this batch's targets
    assert second["mvm_chance"] == pytest.approx(float(added[counts.argmax()] / added.sum()), abs=1e-5)
    assert second["mvm_majority"] == pytest.approx(float(added.max() / added.sum()), abs=1e-5)
    assert second["mvm_chance"] <= second["mvm_majority"]  # the oracle majority bounds any fixed answer
    frozen = mvm.prior_counts.clone()
    pre.eval()
    _forward(pre, 2)
    assert torch.equal(mvm.prior_counts, frozen)  # evaluation reads the prior, never updates it
    assert "prior_counts" in {k.rsplit(".", 1)[-1] for k in pre.state_dict()}  # checkpointed with the model
