"""Non-finite scores are never good scores: retrieval ranks, accuracies, checkpoints, the scheduler, results.

A diverged model (NaN weights) must score recall 0 and accuracy 0, never the
maximum; ASHA must cut a NaN trial at its rung, not promote it; ``vlptune
results`` lists it after every finite trial; a NaN or infinite checkpoint
score is never the best.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from helpers import build_with_data, similarity_world, small_recipe
from test_promote import make_experiment
from vlptune.config import recipe_to_dict, validate_recipe
from vlptune.data.dataset import build_loader
from vlptune.io import WORST_MAX, WORST_MIN, rank_value
from vlptune.objectives import registry
from vlptune.objectives.base import NO_PREDICTION, accuracy, predicted
from vlptune.search import results as res
from vlptune.search.schedulers import ASHA, worst_when_nonfinite
from vlptune.train import checkpoint as ck
from vlptune.train.evaluate import gt_ranks, recall_metrics

NAN, INF = float("nan"), float("inf")
# Hungarian matching refuses a NaN cost (objectives/matching.py): a diverged detection/SPL head stops the
# run with that error, before any accuracy; their accuracies use `predicted` (tested below).
MATCHED = ("detection", "spl")


# ------------------------------------------------------------------ retrieval


def _ranks(score: torch.Tensor, relevant: torch.Tensor) -> list[int]:
    return gt_ranks(torch.zeros_like(score, dtype=torch.long), score, relevant).tolist()


def test_a_nan_model_gets_recall_zero_not_600():
    n = 12
    score = torch.full((n, n), NAN)
    relevant = torch.eye(n, dtype=torch.bool)
    ranks = gt_ranks(torch.zeros(n, n, dtype=torch.long), score, relevant)
    assert ranks.tolist() == [n - 1] * n  # behind every other candidate (ties count against the query)
    metrics = recall_metrics(ranks, ranks, [1] * n, n)
    assert metrics["rsum"] == 0.0 and metrics["rsum"] < metrics["chance_rsum"]


def test_a_nonfinite_score_ranks_behind_every_finite_one():
    relevant = torch.tensor([[True, False, False, False]] * 4)
    for bad in (NAN, INF, -INF):
        # the ground truth scored non-finite: last, even behind the lowest finite score
        assert _ranks(torch.tensor([[bad, -5.0, 0.0, 3.0]]), relevant[:1]) == [3]
        # the others non-finite, the ground truth finite (and low): first
        assert _ranks(torch.tensor([[-100.0, bad, bad, bad]]), relevant[:1]) == [0]
    # ties with another non-finite candidate count against the query, like finite ties
    assert _ranks(torch.tensor([[NAN, NAN, 1.0, 2.0]]), relevant[:1]) == [3]
    # candidate tiers still order first (a re-ranked candidate above the rest)
    tier = torch.tensor([[1, 0, 0, 0]])
    assert gt_ranks(tier, torch.tensor([[NAN, 5.0, 6.0, 7.0]]), relevant[:1]).tolist() == [0]


# ------------------------------------------------------------------ accuracies


def test_predicted_is_never_right_on_a_nonfinite_row():
    logits = torch.tensor([[NAN, 0.0, 0.0], [INF, 0.0, 0.0], [3.0, 1.0, 0.0], [NAN, NAN, NAN]])
    assert predicted(logits).tolist() == [NO_PREDICTION, NO_PREDICTION, 0, NO_PREDICTION]
    labels = torch.zeros(4, dtype=torch.long)
    assert float(torch.argmax(logits, -1).eq(labels).float().mean()) == 1.0  # what torch's argmax alone counts: all right
    assert float(accuracy(logits, labels)) == pytest.approx(0.25)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return similarity_world(tmp_path_factory)


def test_every_objectives_accuracy_is_zero_for_a_nan_model(world, one_thread):
    names = [n for n in registry.names() if n not in MATCHED]
    raw = recipe_to_dict(small_recipe("nan", world, {"mlm": {"weight": 1.0}}, batch_images=2))
    raw["objectives"] = {n: {"weight": 1.0} for n in names}
    raw["model"]["fusion"].update(layers=2, unimodal_layers=1)  # MVPTR's VSC/WPG need a uni-modal stage
    recipe = validate_recipe(raw, "every objective")
    torch.manual_seed(0)
    pretrainer = build_with_data(recipe).eval()
    batch = next(iter(build_loader(recipe, "train")))
    with torch.no_grad():
        for p in pretrainer.parameters():
            p.fill_(NAN)
        _, metrics = pretrainer(batch, torch.Generator().manual_seed(0))
    accs = {k: float(v) for k, v in metrics.items() if k.endswith("_acc")}
    # one accuracy per objective that has one (SSUL regresses colours: no accuracy)
    assert {k.split("_")[0] for k in accs} >= {"cap", "itm", "mlm", "mvm", "omvm", "pra", "segl", "vsc", "wpg"}, sorted(accs)
    assert accs == dict.fromkeys(accs, 0.0), accs


# ------------------------------------------------------------------ ranking: helper, checkpoints, scheduler, results


def test_rank_value_makes_nonfinite_the_worst():
    assert rank_value(3.0, "max") == 3.0 and rank_value(3, "min") == 3.0
    for bad in (NAN, INF, -INF, None, "x", True):
        assert rank_value(bad, "max") == WORST_MAX and rank_value(bad, "min") == WORST_MIN
    assert sorted([2.0, NAN, 1.0], key=lambda v: rank_value(v, "max"), reverse=True)[:2] == [2.0, 1.0]  # NaN last
    with pytest.raises(ValueError, match="mode"):
        rank_value(1.0, "best")


def test_a_nonfinite_checkpoint_is_never_the_best():
    entries = [ck.Entry("step_1", 1, {"m": 5.0}), ck.Entry("step_2", 2, {"m": INF}), ck.Entry("step_3", 3, {"m": NAN}), ck.Entry("step_4", 4, {"m": 1.0})]
    assert ck.kept_when_ended(entries, "best", "m", "max") == {"step_1"}
    assert ck.kept_when_ended(entries, "best", "m", "min") == {"step_4"}
    assert ck.kept_while_running(entries, 1, "m", "max") == {"step_1", "step_4"}  # the best and the latest


def _asha(cls):
    sched = cls(time_attr="step", max_t=40, grace_period=10, reduction_factor=2, brackets=1, stop_last_trials=False)
    sched.set_search_properties("m", "max")
    return sched


@pytest.mark.parametrize("bad", [NAN, INF])
def test_asha_cuts_a_nonfinite_trial_at_its_rung(bad):
    actions = {}
    for cls in (ASHAScheduler, ASHA):
        sched = _asha(cls)
        trials = [SimpleNamespace(trial_id=t) for t in "abc"]
        for t in trials:
            sched.on_trial_add(None, t)
        assert sched.on_trial_result(None, trials[0], {"step": 10, "m": 100.0}) == TrialScheduler.CONTINUE
        assert sched.on_trial_result(None, trials[1], {"step": 10, "m": 50.0}) == TrialScheduler.STOP
        actions[cls] = sched.on_trial_result(None, trials[2], {"step": 10, "m": bad})
    assert actions[ASHA] == TrialScheduler.STOP
    if bad is NAN:
        assert actions[ASHAScheduler] == TrialScheduler.CONTINUE  # Ray's own ASHA promotes it: what this guards against
    assert worst_when_nonfinite({"step": 1}, "m", "max") == {"step": 1}  # no metric: passed as it is


def test_results_list_a_nan_trial_after_every_finite_one(tmp_path):
    collected = res.collect(make_experiment(tmp_path))
    metrics = [r.metric for r in collected.rows if r.metric is not None]
    finite_part = [m for m in metrics if math.isfinite(m)]
    assert metrics[: len(finite_part)] == finite_part and math.isnan(metrics[-1])
    nan_row = next(r for r in collected.rows if r.metric is not None and math.isnan(r.metric))
    assert nan_row.status == "nan" and collected.best is not None and collected.best.trial_id != nan_row.trial_id


def test_a_nonfinite_validation_loss_reports_no_scores():
    from vlptune.train.evaluate import diverged_as_worst

    metrics = {"val/loss": NAN, "val/itm_acc": 0.9, "val/mvm_chance": 0.3, "retrieval/rsum": 450.0, "retrieval/tr_r1": 50.0}
    metrics |= {"retrieval/chance_rsum": 300.0, "retrieval/images": 4, "step": 10}
    out = diverged_as_worst(metrics)
    assert [k for k, v in out.items() if isinstance(v, float) and math.isnan(v)] == ["val/loss", "val/itm_acc", "retrieval/rsum", "retrieval/tr_r1"]
    assert out["retrieval/chance_rsum"] == 300.0 and out["val/mvm_chance"] == 0.3 and out["retrieval/images"] == 4
    finite_loss = {**metrics, "val/loss": 2.0}
    assert diverged_as_worst(finite_loss) is finite_loss and diverged_as_worst({"retrieval/rsum": 1.0}) == {"retrieval/rsum": 1.0}
    assert diverged_as_worst({"val/loss": INF, "val/mlm_acc": 1.0})["val/mlm_acc"] != 1.0
