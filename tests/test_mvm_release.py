"""MVM as in the SOHO release (objectives.mvm.variant: release): the shared-position masking and the cosine head, by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_recipe
from test_objectives import hand_batch
from vlptune.config.objectives import MVMConfig
from vlptune.objectives.base import build_pretrainer
from vlptune.objectives.mvm import choose_release_masks, release_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is as fast and immune to a busy second core

CODES = torch.tensor([[[5, 5, 2]], [[1, 2, 3]]])  # two rows, a 1 x 3 grid
VALID = torch.tensor([[[True, True, True]], [[True, True, False]]])  # row 1's last cell is padding


def test_release_masks_one_position_for_the_batch():
    both = torch.tensor([True, True])
    selected, chosen, mask = release_masks(CODES, VALID, position=0, drawn=both)
    assert selected.tolist() == [True, True] and chosen.tolist() == [5, 1]
    assert mask.tolist() == [[[True, True, False]], [[True, False, False]]]  # every cell of index 5 in row 0
    selected, chosen, mask = release_masks(CODES, VALID, position=2, drawn=both)
    assert selected.tolist() == [True, False]  # row 1 has padding there: nothing masked
    assert mask.tolist() == [[[False, False, True]], [[False, False, False]]]
    selected, _, mask = release_masks(CODES, VALID, position=1, drawn=torch.tensor([False, True]))
    assert selected.tolist() == [False, True] and not mask[0].any()


def test_release_choice_is_area_weighted():
    # index 5 covers 2 of row 0's 3 cells, so it is masked in 2/3 of the draws (the paper draw: 1/2 of them)
    gen = torch.Generator().manual_seed(0)
    draws = [int(choose_release_masks(CODES[:1], VALID[:1], 1.0, gen)[1][0]) for _ in range(3000)]
    assert draws.count(5) / len(draws) == pytest.approx(2 / 3, abs=0.03)


def test_release_preset_and_cosine_head_by_hand():
    cfg = MVMConfig(variant="release")
    assert (cfg.prob, cfg.masking, cfg.head) == (0.015, "release", "cosine")
    assert MVMConfig(variant="release", prob=0.5).prob == 0.5 and MVMConfig().masking == "pair"
    torch.manual_seed(0)
    pre = build_pretrainer(tiny_recipe("mvm-rel", {"itm": {"weight": 1.0}, "mvm": {"weight": 1.0, "prob": 1.0, "masking": "release", "head": "cosine"}}))
    mvm = pre.objectives["mvm"]
    assert not hasattr(mvm, "decoder")  # no linear head: the codes are the classifier
    codes = pre.model.vd.codes
    states = torch.randn(4, codes.shape[1])
    expected = torch.stack([torch.stack([F.cosine_similarity(s, c, dim=0) for c in codes]) for s in states])
    assert torch.allclose(mvm.logits(states), expected, atol=1e-5)
    _, metrics = pre.train()(hand_batch(images=4), torch.Generator().manual_seed(1))
    assert float(metrics["mvm_skipped"]) == 0.0 and torch.isfinite(torch.as_tensor(metrics["mvm_loss"]))  # trains end to end
