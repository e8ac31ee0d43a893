"""Per-objective gradient norms and GradNorm balancing (train/balance.py), on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_recipe
from test_objectives import hand_batch
from vlptune.config import ConfigError, OptimConfig, load_recipe
from vlptune.objectives.base import build_pretrainer
from vlptune.train.balance import GradNormBalance, attach_balance, measures_at, objective_grad_norms
from vlptune.train.optim import build_optimizers
from vlptune.train.step import train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is as fast and immune to a busy second core

MIX = {"mlm": {"weight": 1.0}, "itm": {"weight": 2.0}, "mvm": {"weight": 1.0, "prob": 1.0}}


def test_gradnorm_update_by_hand():
    cfg = OptimConfig(balance="gradnorm", balance_alpha=1.0, balance_lr=1.0)
    bal = GradNormBalance(["a", "b"], cfg)
    # first update: L(0) = L, so both train at the same rate; target = mean(G) = 2.5 for both
    bal.update({"a": 4.0, "b": 1.0}, {"a": 2.0, "b": 0.5})
    # log s += log(target / G): s = (2.5/4, 2.5/1) = (0.625, 2.5), renormalised to sum 2: (0.4, 1.6)
    assert bal.scales.tolist() == pytest.approx([0.4, 1.6])
    # second: a's loss fell to half its start, b's stayed: ratios (0.5, 1), rates (2/3, 4/3); alpha 1
    # G = (2.0, 2.0) -> targets 2 * (2/3, 4/3) = (4/3, 8/3); s = (0.4 * 2/3, 1.6 * 4/3) = (0.2667, 2.1333) -> sum 2.4 -> x 2/2.4
    bal.update({"a": 2.0, "b": 2.0}, {"a": 1.0, "b": 0.5})
    assert bal.scales.tolist() == pytest.approx([0.4 * 2 / 3 * 2 / 2.4, 1.6 * 4 / 3 * 2 / 2.4])
    assert int(bal.updates) == 2


def test_gradnorm_skips_objectives_without_gradient_and_clamps():
    cfg = OptimConfig(balance="gradnorm", balance_alpha=0.0, balance_lr=1.0, balance_max=2.0)
    bal = GradNormBalance(["a", "b", "c"], cfg)
    bal.update({"a": 100.0, "b": 1.0, "c": 0.0}, {"a": 1.0, "b": 1.0, "c": 1.0})  # c had no gradient (a skipped MVM step)
    assert float(bal.scales[2]) == 1.0  # untouched
    # target mean(100, 1) = 50.5 for both: s = (0.505, 50.5), renormalised to sum 2 -> (0.0198, 1.9802), a clamped to 1/2
    assert bal.scales[:2].tolist() == pytest.approx([0.5, 2 * 50.5 / 51.005])
    before = bal.scales.clone()
    bal.update({"a": 1.0, "b": math.nan}, {"a": 1.0, "b": 1.0})  # fewer than two live objectives: no update
    assert torch.equal(bal.scales, before)


def test_objective_norms_are_each_objectives_own_gradient_and_leave_grads_untouched():
    torch.manual_seed(0)
    pre = build_pretrainer(tiny_recipe("bal", MIX)).eval()  # no dropout, no VD update: every forward the same
    pre(hand_batch(), torch.Generator().manual_seed(0))
    batch = hand_batch()
    gen = torch.Generator().manual_seed(0)
    pre(batch, gen)
    norms, losses = objective_grad_norms(pre)
    assert set(norms) == {"mlm", "itm", "mvm"} and all(v > 0 for v in norms.values())
    assert all(p.grad is None for p in pre.parameters())  # autograd.grad does not accumulate
    shared = [p for p in pre.model.parameters() if p.requires_grad]
    for name, weight in (("mlm", 1.0), ("itm", 2.0), ("mvm", 1.0)):
        pre.zero_grad(set_to_none=True)
        pre(batch, torch.Generator().manual_seed(0))
        (weight * pre.last_losses[name]).backward()
        expected = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in shared if p.grad is not None))
        assert norms[name] == pytest.approx(float(expected), rel=1e-4), name
        assert losses[name] == pytest.approx(float(pre.last_losses[name].detach()), rel=1e-6)


def _two_steps(measure: bool, balance_kind: str = "none"):
    torch.manual_seed(0)
    recipe = tiny_recipe("bal", MIX, optim={"balance": balance_kind, "balance_lr": 1.0, "balance_max": 1e4, "grad_clip": 0.0})
    pre = build_pretrainer(recipe)
    attach_balance(pre, recipe.optim)
    opts = build_optimizers(pre, pre.model.backbone, recipe.optim, max_steps=2)
    gen = torch.Generator().manual_seed(0)
    outs = [train_step(pre, pre, opts, [hand_batch(seed=s)], torch.device("cpu"), "fp32", 0.0, gen, measure) for s in (0, 1)]
    return pre, outs


def test_measuring_does_not_change_the_trajectory_and_logs_each_objective():
    plain, plain_out = _two_steps(False)
    measured, measured_out = _two_steps(True)
    for a, b in zip(plain.state_dict().values(), measured.state_dict().values()):
        assert torch.equal(a, b)
    assert [o.loss for o in plain_out] == [o.loss for o in measured_out]
    logged = measured_out[0].metrics[0]
    assert {"grad_norm_mlm", "grad_norm_itm", "grad_norm_mvm"} <= set(logged)
    assert "grad_norm_mlm" not in plain_out[0].metrics[0]


def test_gradnorm_scales_apply_from_the_next_step_and_are_checkpointed_buffers():
    pre, outs = _two_steps(True, "gradnorm")
    first = outs[0].metrics[0]
    scales = [first[f"balance_{n}"] for n in ("mlm", "itm", "mvm")]
    assert sum(scales) == pytest.approx(3.0, rel=1e-5) and max(scales) > 1.0 > min(scales)
    # after the first update (alpha 1.5, lr 1, L(0) = L) every objective's scaled norm is the mean: equal norms
    g = {n: first[f"grad_norm_{n}"] for n in ("mlm", "itm", "mvm")}
    assert [g[n] * s for n, s in zip(("mlm", "itm", "mvm"), scales)] == pytest.approx([g["mlm"] * scales[0]] * 3, rel=1e-4)
    assert "balance.scales" in pre.state_dict()
    # the second step's norms were taken with the new scales
    second = outs[1].metrics[0]
    assert second["grad_norm_itm"] != pytest.approx(g["itm"], rel=1e-3)


def test_measuring_steps_and_the_recipe_fields():
    recipe = tiny_recipe("bal", MIX, train={"log_every": 10}, optim={"balance": "gradnorm", "balance_every": 4})
    pre = build_pretrainer(recipe)
    attach_balance(pre, recipe.optim)
    assert [s for s in range(1, 21) if measures_at(s, recipe)] == [4, 8, 10, 12, 16, 20]
    off = tiny_recipe("bal", MIX, train={"log_every": 10}, optim={"objective_grad_norms": False})
    assert attach_balance(build_pretrainer(off), off.optim) is None
    assert not any(measures_at(s, off) for s in range(1, 21))
    with pytest.raises(ConfigError, match="optim.balance"):
        load_recipe(tiny_path(), ["optim.balance=pcgrad"])


def tiny_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "trials" / "demo-light.yaml"
