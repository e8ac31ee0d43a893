"""Searches ranked by a downstream metric: trials pretrain, then finetune their final checkpoint (slow: Ray).

A tiny search of two trials of the real loop on a 48-image world, ranked by
``downstream/vqa/score``: ASHA prunes on the pretraining ``val/loss`` at its
rungs, the trials that reach ``train.max_steps`` finetune on VQA as a Ray
Train run, and Optuna ranks them by the VQA score of their last report.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from helpers import tiny_loop_fixed

REPO = Path(__file__).resolve().parents[1]
DEMO_LIGHT = REPO / "trials" / "demo-light.yaml"
METRIC = "downstream/vqa/score"
VQA = {"max_steps": 6, "eval_every": 6, "batch_size": 8, "eval_records": 24, "pooling": "mean", "patience": 0, "lr": 3.0e-4}


def tiny_space(root: Path, **top) -> Path:
    doc = {
        "name": "tinyft",
        "base": str(DEMO_LIGHT),
        "metric": METRIC,
        "mode": "max",
        "num_samples": 2,
        "max_concurrent": 2,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "searcher": {"type": "tpe", "seed": 0},
        "fixed": {**tiny_loop_fixed(root / "synth"), "downstream": {"vqa": VQA}},
        "parameters": {"data.mlm_prob": {"uniform": [0.1, 0.3]}},
        **top,
    }
    path = root / "tinyft.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_search_ranked_by_vqa_score_pretrains_then_finetunes(tmp_path):
    import optuna

    from vlptune.cli import main
    from vlptune.search import results

    space = tiny_space(tmp_path)
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console):
            rc = main(["search", str(space), "--storage", str(tmp_path / "runs"), "--name", "tinyft"])
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    assert rc == 0, console.getvalue()
    exp_dir = tmp_path / "runs" / "tinyft"
    collected = results.collect(exp_dir)
    assert len(collected.rows) == 2
    meta = json.loads((exp_dir / "vlptune_search.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage_url"])
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    finished = 0
    for row in collected.rows:
        lines = [json.loads(line) for line in (Path(row.trial_dir) / "result.json").read_text().splitlines() if line.strip()]
        last = lines[-1]
        # every pretraining report carries the searched metric as NaN; the scheduler's val/loss is real
        assert all(math.isnan(r[METRIC]) for r in lines[:-1]) and all(math.isfinite(r["val/loss"]) for r in lines), lines
        finetuned = exp_dir / "tb" / row.trial_id / "finetune" / "vqa"
        if row.fidelity == 4:  # reached train.max_steps: finetuned, one last report with both
            finished += 1
            assert math.isfinite(last[METRIC]) and 0.0 <= last[METRIC] <= 100.0 and "downstream/vqa/chance_score" in last
            assert math.isfinite(last["val/loss"]) and last["step"] == 4 and last["trial/finetune_s"] > 0
            assert by_id[row.trial_id].state.name == "COMPLETE" and by_id[row.trial_id].value == pytest.approx(last[METRIC])
            assert row.metric == pytest.approx(last[METRIC])
            assert (finetuned / "finetune.json").is_file()
        else:  # pruned on val/loss at a rung: never finetuned
            assert by_id[row.trial_id].state.name == "PRUNED" and not finetuned.exists()
    assert finished >= 1
    # `vlptune results`: the searched metric, then its chance level as a column of its own
    # the combinations of the trial's tasks (here one: VQA's gain over its chance), then the searched task's chance level
    assert collected.downstream == ["downstream/combined/gain_over_chance", "downstream/vqa/chance_score"]
    assert "downstream/vqa/chance_score" in results.format_table(collected).splitlines()[0]
    out = console.getvalue()
    assert "Traceback" not in out and METRIC in out, out
    print(out)


# ====================================================================== in process (default suite)


def test_a_downstream_metric_prunes_on_val_loss_and_names_its_tasks(tmp_path):
    from vlptune.config import ConfigError
    from vlptune.search.runner import make_scheduler, tune_metric
    from vlptune.search.space import load_space

    space = load_space(tiny_space(tmp_path))
    assert (space.prune_metric, space.prune_mode) == ("val/loss", "min") and space.downstream
    assert "prunes on val/loss (min)" in space.describe() and "finetune on vqa" in space.describe()
    assert tune_metric(space) is None  # Tune's top-level metric is left to the searcher
    scheduler = make_scheduler(space)
    assert (scheduler._metric, scheduler._mode) == ("val/loss", "min")
    chosen = load_space(tiny_space(tmp_path, prune_metric="val/mlm_acc", prune_mode="max"))
    assert (chosen.prune_metric, chosen.prune_mode) == ("val/mlm_acc", "max")
    plain = load_space(tiny_space(tmp_path, metric="val/mlm_acc"))
    assert (plain.prune_metric, plain.prune_mode) == ("val/mlm_acc", "max") and tune_metric(plain) == ("val/mlm_acc", "max")
    with pytest.raises(ConfigError, match="prune_metric: 'downstream/vqa/acc' is a downstream metric"):
        load_space(tiny_space(tmp_path, prune_metric="downstream/vqa/acc"))
    with pytest.raises(ConfigError, match="unknown task 'vq'"):
        load_space(tiny_space(tmp_path, metric="downstream/vq/score"))
    with pytest.raises(ConfigError, match="prune_metric 'val/loss'.*eval.loss_batches is 0"):
        load_space(tiny_space(tmp_path), overrides=["eval.loss_batches=0"])


def test_one_results_column_per_downstream_task():
    from vlptune.config.downstream import downstream_columns

    reported = {"downstream/vqa/score", "downstream/vqa/chance_score", "downstream/nlvr2/acc", "downstream/retrieval/rsum", "downstream/retrieval/tr_r1"}
    # each task's main metric (registered order), the searched one left out, then its chance level
    assert downstream_columns(reported, METRIC) == ["downstream/nlvr2/acc", "downstream/retrieval/rsum", "downstream/vqa/chance_score"]
    assert downstream_columns(reported, "val/loss") == ["downstream/nlvr2/acc", "downstream/retrieval/rsum", "downstream/vqa/score"]
    assert downstream_columns(set(), METRIC) == []


def test_a_named_combination_averages_the_tasks_relative_gains_over_chance():
    from vlptune.config import ConfigError
    from vlptune.config.downstream import combined_metrics, downstream_columns, task_of_metric

    metrics = {"downstream/vqa/score": 36.0, "downstream/vqa/chance_score": 18.0, "downstream/nlvr2/acc": 60.0, "downstream/nlvr2/chance_acc": 50.0}
    combined = combined_metrics(metrics, ["vqa", "nlvr2"])
    assert combined == {"downstream/combined/gain_over_chance": pytest.approx((1.0 + 0.2) / 2)}  # (36-18)/18 = 1.0, (60-50)/50 = 0.2
    failed = combined_metrics({**metrics, "downstream/nlvr2/acc": math.nan}, ["vqa", "nlvr2"])
    assert math.isnan(failed["downstream/combined/gain_over_chance"])  # a failed task is never averaged away
    assert math.isnan(combined_metrics({"downstream/vqa/score": 30.0}, ["vqa"])["downstream/combined/gain_over_chance"])  # no chance level
    assert downstream_columns({**metrics, **combined}, "downstream/combined/gain_over_chance") == ["downstream/nlvr2/acc", "downstream/vqa/score"]
    assert downstream_columns({**metrics, **combined}, METRIC)[-2:] == ["downstream/combined/gain_over_chance", "downstream/vqa/chance_score"]
    assert task_of_metric("downstream/combined/gain_over_chance") is None
    with pytest.raises(ConfigError, match="unknown combined downstream metric 'downstream/combined/gain_over_chanse'.*did you mean 'gain_over_chance'"):
        task_of_metric("downstream/combined/gain_over_chanse")


def test_a_search_ranked_by_a_combination_needs_downstream_tasks(tmp_path):
    from vlptune.config import ConfigError
    from vlptune.search.space import load_space, trial_tasks

    combined = "downstream/combined/gain_over_chance"
    space = load_space(tiny_space(tmp_path, metric=combined))  # the fixed downstream: section holds vqa
    assert space.downstream and trial_tasks(space.base_recipe, [combined]) == ["vqa"]
    doc = yaml.safe_load(tiny_space(tmp_path).read_text())
    del doc["fixed"]["downstream"]
    doc["metric"] = combined
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="combines the results of the tasks in the recipe's downstream: section, and it has none"):
        load_space(bare)


def test_a_finetuning_trial_lists_every_task_and_the_combination_in_its_hparams():
    from vlptune.search.trainable import downstream_hparam_metrics
    from vlptune.train.tensorboard import HPARAM_METRICS, hparam_metrics

    later = downstream_hparam_metrics(["vqa", "nlvr2"])
    assert later == [
        "downstream/vqa/score",
        "downstream/vqa/chance_score",
        "downstream/nlvr2/acc",
        "downstream/nlvr2/chance_acc",
        "downstream/combined/gain_over_chance",
    ]
    assert downstream_hparam_metrics([]) == []
    columns = hparam_metrics(METRIC, {"val/loss"}, later)  # written at the first evaluation, before any downstream result
    assert columns[:2] == [METRIC, "downstream/vqa/chance_score"] and columns[2:5] == later[2:]
    assert columns[5:] == list(HPARAM_METRICS) and len(columns) == len(set(columns))


def test_what_tune_gets_of_each_pretraining_report():
    from vlptune.search.trainable import passed_to_tune

    got = passed_to_tune({"step": 2, "val/loss": 3.0}, [METRIC], hold_from_step=4)
    assert got is not None and math.isnan(got[METRIC]) and got["val/loss"] == 3.0  # Tune's metric check: NaN, the worst value
    assert passed_to_tune({"step": 4, "val/loss": 2.0}, [METRIC], hold_from_step=4) is None  # the last one: reported after the finetuning
    assert passed_to_tune({"step": 4, "stop_reason": "max_steps"}, [METRIC], hold_from_step=4) is None
    stopped = passed_to_tune({"step": 4, "stop_reason": "non_finite_loss"}, [METRIC], hold_from_step=4)  # the loop stopped itself: passes
    assert stopped is not None and math.isnan(stopped[METRIC])
    assert passed_to_tune({"step": 4, METRIC: 30.0}, [METRIC], hold_from_step=None) == {"step": 4, METRIC: 30.0}


def test_a_trial_finetunes_its_final_checkpoint_and_reports_both(tmp_path):
    """The trial's sequencing after its pretraining run, in this process: the last pretraining
    evaluation and the downstream metrics in one result, one failed task not losing the others."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlptune.config import validate_recipe
    from vlptune.data.prepare import ensure_data
    from vlptune.search.finetune import finish_with_downstream
    from vlptune.search.space import load_space
    from vlptune.train.checkpoint import latest_checkpoint
    from vlptune.train.finetune import finetune_worker
    from vlptune.train.loop import train_worker
    from vlptune.train.reporting import LocalReporter

    space = load_space(tiny_space(tmp_path), overrides=["resources.torch_threads=1"])
    raw = space.resolve({"data.mlm_prob": 0.15})
    raw["downstream"]["snli_ve"] = {"max_steps": 2}
    recipe = validate_recipe(raw, "trial t0")
    ensure_data(recipe)
    run = tmp_path / "tb" / "t0"
    summary = train_worker(recipe, LocalReporter(quiet=True), str(run), resume=False)
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None
    assert summary["stop_reason"] == "max_steps"
    last = {"step": recipe.train.max_steps, "val/loss": 2.5}  # stands for the evaluation saved with the checkpoint
    calls = []

    def in_process(recipe, task, checkpoint, out_dir, storage, name, failures_max):
        calls.append((task, Path(checkpoint), name))
        if task == "snli_ve":
            raise RuntimeError("a task whose run failed")
        return finetune_worker(recipe, task, checkpoint, LocalReporter(quiet=True), out_dir)

    final = finish_with_downstream(last, recipe, str(checkpoint), run, str(tmp_path / "train"), "t0", parallel=False, failures_max=0, fit=in_process)
    assert [c[0] for c in calls] == ["vqa", "snli_ve"] and calls[0][1] == checkpoint and calls[0][2] == "t0-vqa"
    assert final["val/loss"] == last["val/loss"] and final["step"] == recipe.train.max_steps  # the pretraining evaluation stays
    assert math.isfinite(final[METRIC]) and final["downstream/vqa/chance_score"] > 0 and final["trial/finetune_s"] > 0
    assert math.isnan(final["downstream/snli_ve/acc"]) and "a task whose run failed" in final["downstream/snli_ve/error"]
    assert math.isnan(final["downstream/combined/gain_over_chance"])  # one task failed: the combination says so
    assert (run / "finetune" / "vqa" / "finetune.json").is_file()
    events = EventAccumulator(str(run))
    events.Reload()
    # the trial's own TensorBoard run holds the downstream metric at its last step (its HParams row)
    assert [(e.step, e.value) for e in events.Scalars(METRIC)] == [(recipe.train.max_steps, pytest.approx(final[METRIC]))]


def test_optuna_is_told_pruned_for_a_trial_stopped_before_its_finetuning(tmp_path):
    """Ranked by a downstream metric, a trial the scheduler stops reports it only as NaN: PRUNED, not FAIL;
    one that finished gets COMPLETE with its downstream value; a failed finetuning (NaN at the last step) FAIL."""
    import optuna
    from optuna.trial import TrialState

    from vlptune.search.optuna_searcher import OptunaSearcher
    from vlptune.search.space import load_space

    searcher = OptunaSearcher(load_space(tiny_space(tmp_path)), f"sqlite:///{tmp_path / 'optuna.db'}", "ds")
    for tid in ("pruned", "done", "failed"):
        searcher.suggest(tid)
    searcher.on_trial_result("pruned", {"step": 2, METRIC: math.nan, "val/loss": 3.0})
    searcher.on_trial_complete("pruned", result={"step": 2, METRIC: math.nan, "val/loss": 3.0})
    searcher.on_trial_complete("done", result={"step": 4, METRIC: 31.0, "val/loss": 2.0})
    searcher.on_trial_complete("failed", result={"step": 4, METRIC: math.nan, "val/loss": 2.0})
    study = optuna.load_study(study_name="ds", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    told = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert told["pruned"].state == TrialState.PRUNED and told["pruned"].user_attrs["outcome"] == "pruned"
    assert told["done"].state == TrialState.COMPLETE and told["done"].value == 31.0
    assert told["failed"].state == TrialState.FAIL and told["failed"].user_attrs["outcome"] == "nan"


@pytest.mark.parametrize("keep", ["none", "best"])
def test_a_trials_finetuned_checkpoints_follow_keep_when_done(tmp_path, keep):
    """The demo sets train.keep_when_done: none; its trials' finetunings then leave no 206 MB checkpoint each behind."""
    from vlptune.config import validate_recipe
    from vlptune.search.finetune import finetune_tasks
    from vlptune.search.space import load_space

    raw = load_space(tiny_space(tmp_path)).resolve({"data.mlm_prob": 0.15})
    raw["train"]["keep_when_done"] = keep
    recipe = validate_recipe(raw, "trial t0")

    def fake_fit(recipe, task, checkpoint, out_dir, storage, name, failures_max):
        kept = out_dir / "checkpoint_000000"
        kept.mkdir(parents=True)
        (kept / "model.safetensors").write_bytes(b"weights")
        return {f"downstream/{task}/score": 1.0, "checkpoint": str(kept)}

    metrics = finetune_tasks(recipe, "unused", tmp_path / "trial", str(tmp_path / "train"), "t0", parallel=False, fit=fake_fit)
    assert {k: v for k, v in metrics.items() if k.endswith("/score")} == {f"downstream/{task}/score": 1.0 for task in recipe.downstream}
    left = sorted(tmp_path.glob("trial/**/checkpoint_000000"))
    assert len(left) == (0 if keep == "none" else len(recipe.downstream)), left
