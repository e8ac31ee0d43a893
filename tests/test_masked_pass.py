"""objectives.mvm.fusion_pass: MLM and MVM in one masked pass over the positives (shared) or in two (separate)."""

from __future__ import annotations

import pytest
import torch

from test_objectives import MASK, hand_batch, tiny_recipe
from vlptune.config import ConfigError
from vlptune.objectives.base import MASKED_VIEW, StepContext, build_pretrainer
from vlptune.objectives.mlm import IGNORE_INDEX


def build(fusion_pass: str, prob: float = 1.0, objectives: dict | None = None):
    torch.manual_seed(0)  # the same weights for every option
    objectives = objectives or {"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}, "mvm": {"weight": 1.0, "prob": prob, "fusion_pass": fusion_pass}}
    return build_pretrainer(tiny_recipe(objectives)).eval()


def counted_forward(pretrainer, batch, seed: int = 0):
    """(metrics, the (text ids, grid) of every fusion call) of one forward with MVM's draws seeded by ``seed``."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    model = pretrainer.model
    original = model.fuse

    def spy(text_ids, text_mask, grid, grid_mask=None):
        calls.append((text_ids.clone(), grid.detach().clone()))
        return original(text_ids, text_mask, grid, grid_mask)

    model.fuse = spy
    torch.manual_seed(seed)  # dropout in training mode
    try:
        with torch.no_grad():
            _, metrics = pretrainer(batch, torch.Generator().manual_seed(seed))
    finally:
        del model.fuse
    return metrics, calls


@pytest.fixture(scope="module")
def separate():
    return build("separate")


@pytest.fixture(scope="module")
def shared():
    return build("shared")


def test_the_field_is_typed_and_checked():
    assert tiny_recipe().objectives["mvm"].fusion_pass == "shared"  # the default: equal learning, fewer passes (docs/training.md)
    with pytest.raises(ConfigError, match="fusion_pass"):
        tiny_recipe({"mvm": {"weight": 1.0, "fusion_pass": "joint"}})


def test_shared_pass_gives_the_same_mlm_loss_as_the_separate_pass_when_mvm_masks_nothing():
    batch = hand_batch(images=3)
    # training mode (evaluation masks every positive whatever prob): dropout and the VD's update run, seeded alike
    sep_metrics, sep_calls = counted_forward(build("separate", prob=0.0).train(), batch)
    shared_metrics, shared_calls = counted_forward(build("shared", prob=0.0).train(), batch)
    # MVM drew no pair: separate runs ITM's and MLM's passes only; shared runs the same two
    assert len(sep_calls) == len(shared_calls) == 2
    assert sep_metrics["mvm_skipped"] == shared_metrics["mvm_skipped"] == 1.0
    for key in ("mlm_loss", "mlm_acc", "itm_loss", "loss"):
        assert float(shared_metrics[key]) == pytest.approx(float(sep_metrics[key]), rel=1e-6, abs=1e-7), key


def test_shared_pass_runs_one_fusion_pass_fewer_with_masked_text_and_masked_grid(separate, shared):
    batch = hand_batch(images=3)
    positives = torch.nonzero(batch["itm_labels"] == 1, as_tuple=True)[0]
    sep_metrics, sep_calls = counted_forward(separate, batch)
    shared_metrics, shared_calls = counted_forward(shared, batch)
    # the objectives run in recipe order: mlm, itm, mvm
    assert len(sep_calls) == 3  # MLM (masked text, clean grid), ITM (clean, all pairs), MVM (clean text, masked grid)
    assert len(shared_calls) == 2  # MLM + MVM (masked text, masked grid), ITM (clean, all pairs)
    (sep_mlm_ids, clean_grid), (sep_itm_ids, sep_itm_grid), (sep_mvm_ids, sep_mvm_grid) = sep_calls
    (masked_ids, masked_grid), (itm_ids, itm_grid) = shared_calls
    assert torch.equal(itm_ids, batch["text_ids"]) and torch.equal(sep_itm_ids, itm_ids)  # ITM keeps the clean view
    assert torch.equal(sep_itm_grid, itm_grid)
    assert torch.equal(masked_ids, batch["mlm_ids"][positives]) and torch.equal(sep_mlm_ids, masked_ids)  # every positive, MLM's masked text
    assert (masked_ids == MASK).any()
    # the grid of the shared pass is MLM's clean grid with exactly MVM's masked cells replaced
    mvm = shared.objectives["mvm"]
    changed = (masked_grid != clean_grid).any(dim=1)  # [R,gh,gw]
    assert changed.any() and not changed.all()
    assert torch.allclose(masked_grid.permute(0, 2, 3, 1)[changed], mvm.mask_embedding.expand(int(changed.sum()), -1))
    # the same pairs and cells as the separate MVM pass (same draws from the generator)
    assert sep_mvm_grid.shape[0] == positives.numel()  # evaluation masks every positive (each has codes)
    assert torch.equal((sep_mvm_grid != clean_grid).any(dim=1), changed)
    assert torch.equal(sep_mvm_ids, batch["text_ids"][positives])  # separate MVM: clean text
    # both objectives still learn from the pass: finite losses, the same number of MVM targets
    for key in ("mlm_loss", "mvm_loss", "itm_loss"):
        assert torch.isfinite(torch.as_tensor(shared_metrics[key])), key
    assert shared_metrics["mvm_skipped"] == 0.0
    assert float(shared_metrics["itm_loss"]) == pytest.approx(float(sep_metrics["itm_loss"]), rel=1e-6)


def test_mlm_and_mvm_read_the_one_cached_pass_whatever_their_order(shared):
    batch = hand_batch(images=2)
    ctx = StepContext(shared.model, batch, torch.Generator().manual_seed(0), shared.grid_masker)
    with torch.no_grad():
        mvm = shared.objectives["mvm"](batch, ctx)  # MVM first: it builds the masked pass itself
        pass_after_mvm = ctx.view(MASKED_VIEW, lambda: None)
        mlm = shared.objectives["mlm"](batch, ctx)
    assert ctx.view(MASKED_VIEW, lambda: None) is pass_after_mvm
    assert set(ctx._views) == {"mvm_masks", MASKED_VIEW}  # no MLM- or MVM-only pass
    assert torch.isfinite(mvm.loss) and torch.isfinite(mlm.loss)
    assert batch["mlm_labels"][batch["itm_labels"] == 1].ne(IGNORE_INDEX).any()


def test_shared_without_mlm_is_mvms_own_pass():
    pretrainer = build("shared", objectives={"itm": {"weight": 1.0}, "mvm": {"weight": 1.0, "prob": 1.0, "fusion_pass": "shared"}})
    assert pretrainer.grid_masker is None
    batch = hand_batch(images=2)
    metrics, calls = counted_forward(pretrainer, batch)
    assert len(calls) == 2  # ITM's and MVM's own (clean text)
    positives = torch.nonzero(batch["itm_labels"] == 1, as_tuple=True)[0]
    assert torch.equal(calls[1][0], batch["text_ids"][positives])
    assert metrics["mvm_skipped"] == 0.0


def test_shared_pass_trains_both_heads_through_one_backward():
    pretrainer = build("shared").train()
    batch = hand_batch(images=2)
    loss, _ = pretrainer(batch, torch.Generator().manual_seed(0))
    loss.backward()
    mvm, mlm = pretrainer.objectives["mvm"], pretrainer.objectives["mlm"]
    assert mvm.mask_embedding.grad is not None and mvm.mask_embedding.grad.abs().sum() > 0
    assert mvm.decoder.weight.grad.abs().sum() > 0 and mlm.bias.grad.abs().sum() > 0
