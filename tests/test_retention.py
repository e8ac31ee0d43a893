"""What an ended trial keeps: the driver's callback on fake trial directories, and (slow) a real
trial whose worker dies after the loop dropped its local copy, restarted from Ray's copy."""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyarrow import fs as pafs

from vlptune.search.retention import CheckpointRetention, ending_policy, prune_run_storage
from vlptune.train import checkpoint as ckpt

METRIC = "val/mlm_acc"
MAX_STEPS = 40
BASE = {"name": "retention", "train": {"max_steps": MAX_STEPS, "eval_every": 10}}
SCORES = {10: 0.2, 20: 0.6, 30: 0.4, 40: 0.5}  # the step-20 checkpoint is the best


def write_state(path: Path, step: int, value: float | None) -> None:
    path.mkdir(parents=True)
    metrics = {} if value is None else {METRIC: value}
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "extra": {ckpt.METRICS_KEY: metrics}}))


def fake_trial(exp: Path, trial_id: str, reached: int, scores: dict[int, float], config: dict | None = None) -> SimpleNamespace:
    """A trial as Tune hands it to a callback, with Ray Train's copies of its checkpoints (up to step
    ``reached``) in ``exp/train/<id>`` and what a killed worker left in ``exp/tb/<id>/checkpoints``."""
    run = exp / "train" / trial_id
    for i, (step, value) in enumerate(s for s in scores.items() if s[0] <= reached):
        write_state(run / f"checkpoint_2025-01-01_00-00-{i:02d}.000000", step, value)
    (run / "checkpoint_2025-01-01_00-01-00.000000").mkdir()  # an upload cut short: no state.json
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's own record: left alone
    tb = ckpt.checkpoint_root(exp / "tb" / trial_id)
    write_state(tb / ckpt.step_dir_name(reached), reached, scores.get(reached))
    (tb / ".tmp-step_00000050-1-2").mkdir(parents=True)  # a write the kill cut short
    storage = SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(), experiment_fs_path=str(exp))
    return SimpleNamespace(trial_id=trial_id, config=config or {}, last_result={"step": reached}, storage=storage)


def ray_steps(exp: Path, trial_id: str) -> list[int]:
    run = exp / "train" / trial_id
    return sorted(json.loads((p / ckpt.STATE_FILE).read_text())["step"] for p in run.glob("checkpoint_*") if (p / ckpt.STATE_FILE).is_file())


def local_dirs(exp: Path, trial_id: str) -> list[str]:
    return sorted(p.name for p in ckpt.checkpoint_root(exp / "tb" / trial_id).iterdir() if p.is_dir())


def test_ending_policy_by_how_far_the_trial_got():
    from vlptune.config import validate_recipe

    recipe = validate_recipe({"train": {"max_steps": MAX_STEPS, "keep_when_done": "last", "keep_when_stopped": "best"}}, "test")
    assert ending_policy(recipe, {"step": MAX_STEPS}, failed=False) == "last"  # completed, or stopped at the last rung
    assert ending_policy(recipe, {"step": 20}, failed=False) == "best"  # stopped by the scheduler
    assert ending_policy(recipe, {"step": 5, "stop_reason": "non-finite loss"}, failed=False) == "best"
    assert ending_policy(recipe, {"step": MAX_STEPS}, failed=True) == "best"  # failed past its retries
    assert ending_policy(recipe, {}, failed=False) == "best"  # never reported


def test_prune_run_storage_ranks_ray_copies_by_their_saved_evaluation(tmp_path):
    trial = fake_trial(tmp_path, "t", MAX_STEPS, SCORES)
    run = str(tmp_path / "train" / "t")
    fs = pafs.LocalFileSystem()
    removed = prune_run_storage(fs, run, "best", METRIC, "min")
    assert ray_steps(tmp_path, "t") == [10] and len(removed) == 4  # 3 others and the cut-short upload
    assert prune_run_storage(fs, run, "best", METRIC, "min") == []  # idempotent
    assert (tmp_path / "train" / "t" / "checkpoint_manager_snapshot.json").is_file()
    assert prune_run_storage(fs, str(tmp_path / "train" / "never-ran"), "none", METRIC, "max") == []
    assert trial.trial_id == "t"


def test_callback_applies_each_trials_policy(tmp_path):
    callback = CheckpointRetention(BASE, METRIC, "max")
    done = fake_trial(tmp_path, "done", MAX_STEPS, SCORES)
    stopped = fake_trial(tmp_path, "stopped", 20, SCORES)
    failed = fake_trial(tmp_path, "failed", 30, SCORES, config={"train.keep_when_stopped": "last"})
    callback.on_trial_complete(1, [], done)
    callback.on_trial_complete(2, [], stopped)
    callback.on_trial_error(3, [], failed)
    # completed: the best by the metric, in Ray's storage and in the loop's directory
    assert ray_steps(tmp_path, "done") == [20]
    assert local_dirs(tmp_path, "done") == [ckpt.step_dir_name(MAX_STEPS)]  # the only one the loop still had
    # stopped by the scheduler (train.keep_when_stopped: none by default): nothing left
    assert ray_steps(tmp_path, "stopped") == [] and local_dirs(tmp_path, "stopped") == []
    assert ckpt.latest_checkpoint(tmp_path / "tb" / "stopped") is None
    # failed, with keep_when_stopped: last from its config
    assert ray_steps(tmp_path, "failed") == [30]


def test_trials_seen_ending_are_swept_again_at_the_end_and_no_others(tmp_path):
    callback = CheckpointRetention(BASE, METRIC, "max")
    stopped = fake_trial(tmp_path, "stopped", 20, SCORES)
    interrupted = fake_trial(tmp_path, "interrupted", 30, SCORES)  # running when the driver was interrupted
    callback.on_trial_complete(1, [], stopped)
    write_state(tmp_path / "train" / "stopped" / "checkpoint_2025-01-01_00-02-00.000000", 30, 0.9)  # written while it was killed
    callback = pickle.loads(pickle.dumps(callback))  # Tune keeps its callbacks in tuner.pkl
    callback.on_experiment_end([stopped, interrupted])
    assert ray_steps(tmp_path, "stopped") == []
    assert ray_steps(tmp_path, "interrupted") == [10, 20, 30]  # it resumes later: untouched


def test_a_trial_without_a_valid_recipe_is_left_alone(tmp_path):
    trial = fake_trial(tmp_path, "bad", 20, SCORES, config={"train.keep_when_stopped": "everything"})
    CheckpointRetention(BASE, METRIC, "max").on_trial_complete(1, [], trial)
    assert ray_steps(tmp_path, "bad") == [10, 20]


def test_ray_reporter_confirms_only_a_copy_ray_has_recorded(tmp_path, monkeypatch):
    import ray.train

    from vlptune.search.trainable import RayTrainReporter

    local = tmp_path / "step_00000002"
    local.mkdir()
    copy = SimpleNamespace(path="/exp/train/t/checkpoint_b")
    recorded = [SimpleNamespace(checkpoint=SimpleNamespace(path="/exp/train/t/checkpoint_a"))]
    asked = []

    def get_all_reported_checkpoints(consistency_mode, timeout_s):
        asked.append(consistency_mode)
        return list(recorded)

    monkeypatch.setattr(ray.train, "report", lambda payload, checkpoint=None: None)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: copy)
    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", get_all_reported_checkpoints)
    reporter = RayTrainReporter(METRIC)
    reporter.report({"step": 2, METRIC: 0.5}, str(local))
    assert not reporter.persisted(str(local))  # uploaded, not recorded yet (or not confirmed in time)
    recorded.append(SimpleNamespace(checkpoint=copy))
    assert not reporter.persisted(str(tmp_path / "another"))
    assert reporter.persisted(str(local))
    assert asked[-1] == ray.train.CheckpointConsistencyMode.COMMITTED

    def unreachable(**kwargs):
        raise RuntimeError("controller gone")

    monkeypatch.setattr(ray.train, "get_all_reported_checkpoints", unreachable)
    assert not reporter.persisted(str(local))  # cannot confirm: the local copy stays
    reporter.report({"step": 3, METRIC: 0.6}, None)
    assert not reporter.persisted(str(local))  # not the last checkpoint reported


# ====================================================================== a real trial (slow)

# train_worker behind a reporter that kills the worker once, at the first report after the loop
# dropped its local copy of a checkpoint (evaluations every step, checkpoints every 2: the report of
# step 3, when Ray's copy of step 2 is the only one); each attempt records the step it starts from
# and its local checkpoints: what _materialize_ray_checkpoint put into the run directory.
CRASHING = textwrap.dedent(
    """
    import json, os
    from pathlib import Path

    from vlptune.train import checkpoint as ckpt
    from vlptune.train.loop import train_worker


    class Crashing:
        def __init__(self, inner, out):
            self.inner, self.out, self.dropped = inner, out, False

        def report(self, metrics, checkpoint_dir):
            if self.dropped and not (self.out / "crashed").exists():
                root = ckpt.checkpoint_root(self.out)
                (self.out / "crashed").write_text(json.dumps(sorted(p.name for p in root.iterdir())))
                os._exit(1)
            self.inner.report(metrics, checkpoint_dir)

        def persisted(self, checkpoint_dir):
            self.dropped = self.inner.persisted(checkpoint_dir)
            return self.dropped


    def worker(recipe, reporter, out_dir, resume=True):
        out = Path(out_dir)
        latest = ckpt.latest_checkpoint(out)
        start = json.loads((latest / ckpt.STATE_FILE).read_text())["step"] if latest else 0
        local = sorted(p.name for p in ckpt.checkpoint_root(out).iterdir()) if ckpt.checkpoint_root(out).is_dir() else []
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"start": start, "local": local}) + "\\n")
        return train_worker(recipe, Crashing(reporter, out), out_dir, resume)
    """
)


@pytest.mark.slow  # one trial of the real loop, started twice: ~1-2 min on a shared 2-core machine
def test_a_worker_restarts_from_rays_copy_after_the_local_one_was_dropped(tmp_path):
    import yaml

    from helpers import import_by_value, tiny_loop_fixed
    from vlptune.search.runner import run_search

    repo = Path(__file__).resolve().parents[1]
    module = import_by_value(tmp_path / "crashing_loop.py", CRASHING, f"crashing_loop_{abs(hash(str(tmp_path)))}")
    space = tmp_path / "space.yaml"
    doc = {
        "name": "crash",
        "base": str(repo / "trials" / "demo-light.yaml"),
        "metric": METRIC,
        "mode": "max",
        "num_samples": 1,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "scheduler": {"type": "fifo"},
        "searcher": {"type": "random", "seed": 0},
        "failures": {"max_failures": 1},
        "fixed": {**tiny_loop_fixed(tmp_path / "synth"), "train.eval_every": 1, "train.checkpoint_every": 2},
        "parameters": {"data.mlm_prob": {"uniform": [0.1, 0.3]}},
    }
    space.write_text(yaml.safe_dump(doc, sort_keys=False))
    exp = tmp_path / "exp"
    try:
        grid = run_search(space, exp_dir=exp, worker_fn=module.worker, verbose=0)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    assert grid.num_errors == 0
    (result,) = list(grid)
    trial_id = result.metrics["trial_id"]
    assert result.metrics["step"] == 4
    attempts = [json.loads(line) for line in (exp / "tb" / trial_id / "attempts.jsonl").read_text().splitlines()]
    # the first checkpoint (step 2) was dropped locally once Ray recorded it; the restart found it
    # only because Ray's copy was put back into the run directory
    assert json.loads((exp / "tb" / trial_id / "crashed").read_text()) == []  # when the worker died
    assert [a["start"] for a in attempts] == [0, 2]
    assert attempts[1]["local"] == [ckpt.LATEST, ckpt.step_dir_name(2)]
    # the trial ended: the best of Ray's copies stays (train.keep_when_done: best), none locally
    copies = [p for p in (exp / "train" / trial_id).glob("checkpoint_*") if p.is_dir()]
    assert len(copies) == 1
    assert not [p for p in ckpt.checkpoint_root(exp / "tb" / trial_id).iterdir() if p.is_dir()]


def test_keep_pruned_keeps_the_last_checkpoint_of_trials_that_end_early(monkeypatch, capsys):
    from vlptune.cli import main
    from vlptune.search import cli as search_cli

    seen = {}

    class Started(Exception):
        pass

    def fake_run_search(file, exp_dir, overrides=(), **kwargs):
        seen["space"] = search_cli.load_space(file, overrides)
        raise Started  # stands in for the search (no Ray here)

    monkeypatch.setattr(search_cli, "run_search", fake_run_search)
    for flags, policy in (([], "none"), (["--keep-pruned"], "last")):
        with pytest.raises(Started):
            main(["search", str(Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"), *flags])
        assert seen["space"].base_recipe.train.keep_when_stopped == policy
    assert main(["search", "--resume", "runs/none", "--keep-pruned"]) == 2
    assert "--keep-pruned applies to a new search" in capsys.readouterr().err


def test_a_trial_whose_final_checkpoint_is_stored_is_completed_from_it(tmp_path):
    from vlptune.search.run_storage import COMPLETED_FROM_CHECKPOINT_KEY, finished_result

    fs = pafs.LocalFileSystem()
    fake_trial(tmp_path, "done", MAX_STEPS, SCORES)  # reported its last step, then the driver died
    fake_trial(tmp_path, "half", 20, SCORES)  # still has steps to train
    result = finished_result(fs, str(tmp_path / "train" / "done"), MAX_STEPS)
    assert result == {METRIC: SCORES[MAX_STEPS], "step": MAX_STEPS, COMPLETED_FROM_CHECKPOINT_KEY: 1.0}
    assert finished_result(fs, str(tmp_path / "train" / "half"), MAX_STEPS) is None
    assert finished_result(fs, str(tmp_path / "train" / "never-ran"), MAX_STEPS) is None
    # a final checkpoint without its evaluation (not a report's) is no finished result
    write_state(tmp_path / "train" / "bare" / "checkpoint_x", MAX_STEPS, None)
    assert finished_result(fs, str(tmp_path / "train" / "bare"), MAX_STEPS) is None
