"""Searches end to end on a local Ray cluster (127.0.0.1).

Default suite: one tiny search with the real training loop (two trials, each
a 2-worker DDP/gloo run), then `vlptune results` and a real TensorBoard
server over it. Slow suite (-m slow): early stopping told to Optuna as
pruned, resume after the driver is killed, a retried worker failure, a loop
that stops on NaN, the other schedulers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from helpers import hparams_experiment, hparams_sessions, import_by_value, kill_driver_when, stop_process, tiny_loop_fixed
from helpers import standin_space as make_standin_space
from vlptune.train.tensorboard import FIXED_HPARAMS

REPO = Path(__file__).resolve().parents[1]
DEMO_LIGHT = REPO / "trials" / "demo-light.yaml"
METRIC = "retrieval/rsum"


def cli(argv: list[str]) -> int:
    """Our commands through the `vlptune` command (which reports a SearchError: message on stderr, exit code 2)."""
    from vlptune.cli import main

    return main(argv)


def optuna_trials(exp_dir: Path) -> dict:
    import optuna

    meta = json.loads((exp_dir / "vlptune_search.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage_url"])
    return {t.user_attrs["ray_trial_id"]: t for t in study.get_trials() if "ray_trial_id" in t.user_attrs}


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ====================================================================== the real loop (default suite)


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    """Two trials of the real loop, each 2 workers x 0.5 CPU (DDP over gloo), both at once."""
    root = tmp_path_factory.mktemp("tiny")
    space = root / "tiny.yaml"
    doc = {
        "name": "tiny",
        "base": str(DEMO_LIGHT),
        "metric": METRIC,
        "mode": "max",
        "num_samples": 2,
        "max_concurrent": 2,
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "searcher": {"type": "tpe", "seed": 0},
        # a trial ASHA stops keeps its last checkpoint (default: none), so every trial's is read below
        "fixed": {**tiny_loop_fixed(root / "synth"), "train.keep_when_stopped": "last"},
        "parameters": {
            "model.vd.size": {"categorical": [0, 16]},
            "objectives.mvm.weight": {"uniform": [0.5, 1.5], "when": "model.vd.size > 0", "else": 0.0},
            "data.mlm_prob": {"uniform": [0.1, 0.3]},
        },
    }
    space.write_text(yaml.safe_dump(doc, sort_keys=False))
    exp_dir = root / "runs" / "tiny"
    start = time.time()
    env_before = os.environ.get("RAY_ADDRESS")
    console = io.StringIO()
    try:
        with contextlib.redirect_stdout(console):
            rc = cli(["search", str(space), "--storage", str(root / "runs"), "--name", "tiny"])
        import ray

        cleaned = not ray.is_initialized() and os.environ.get("RAY_ADDRESS") == env_before
    finally:
        shutdown_ray()
    return {"exp_dir": exp_dir, "rc": rc, "seconds": time.time() - start, "space": space, "cleaned": cleaned, "console": console.getvalue()}


def test_tiny_search_with_the_real_loop(tiny_experiment):
    exp_dir = tiny_experiment["exp_dir"]
    assert tiny_experiment["rc"] == 0
    # the local cluster ended with the search, and left no RAY_ADDRESS behind
    assert tiny_experiment["cleaned"]
    from vlptune.search import results

    collected = results.collect(exp_dir)
    assert len(collected.rows) == 2
    studied = optuna_trials(exp_dir)
    assert set(studied) == {r.trial_id for r in collected.rows}
    for row in collected.rows:
        assert row.status in ("completed", "pruned"), row
        assert math.isfinite(row.metric) and row.reports >= 1
        t = studied[row.trial_id]
        # Optuna's record agrees with what the trial reached
        if row.fidelity == 4:
            assert t.state.name == "COMPLETE" and t.value == pytest.approx(row.metric)
        else:
            assert t.state.name == "PRUNED" and max(t.intermediate_values) == row.fidelity
        assert t.intermediate_values == {step: pytest.approx(v) for step, v in row.history}
        # one copy of one checkpoint per trial: Ray's (the loop dropped its own once Ray recorded it);
        # completed: the best by the metric (train.keep_when_done); stopped: the last (keep_when_stopped)
        run_dir = exp_dir / "tb" / row.trial_id
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
        (copy,) = [p for p in (exp_dir / "train" / row.trial_id).iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
        state = json.loads((copy / "state.json").read_text())
        history = dict(row.history)
        kept_step = max(history, key=lambda s: (history[s], s)) if row.fidelity == 4 else row.fidelity
        assert state["step"] == kept_step and state["extra"]["metrics"][METRIC] == pytest.approx(history[kept_step])
        # 2 workers: the loop counts images over all ranks (2 images x 2 ranks per step)
        assert state["extra"]["images_seen"] == kept_step * 2 * 2
        # the trial's recipe carries its searched values
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert recipe["model"]["vd"]["size"] == row.params["model.vd.size"]
        assert recipe["resources"]["workers"] == 2
        assert row.startup_s is not None and row.startup_s > 0
        # every start-up phase is measured, and together they cover Ray's share (startup_s)
        phases = [results.STARTUP_PREFIX + key for key, _ in results.STARTUP_PHASES]
        assert set(phases) <= set(row.startup), row.startup
        assert all(row.startup[p] >= 0 for p in phases)
        ray_share = row.startup[results.STARTUP_PREFIX + "trial_actor_s"] + row.startup[results.STARTUP_PREFIX + "worker_group_s"]
        assert ray_share == pytest.approx(row.startup_s, abs=0.01)
    assert any(r.status == "completed" for r in collected.rows)
    # the console is quiet: the log path, the cluster, one line per trial, the progress bar, the table
    breakdown = results.format_startup(collected)
    assert "worker_group" in breakdown and "share of a trial's wall time" in breakdown, breakdown
    console = tiny_experiment["console"]
    log = exp_dir / "vlptune.log"
    assert f"log: {log}" in console and "ray cluster: started a local cluster" in console
    for row in collected.rows:
        assert f"trial {row.trial_id} " in console
    assert "2/2 trials done" in console
    for noise in ("Traceback", "Trial status", "TrainingReport", "WARNING", "Loading weights"):
        assert noise not in console, noise
    # Ray's and Tune's output went to the log instead; the fixed-size local cluster sent no autoscaler requests
    text = log.read_text()
    assert "Configuration for experiment" in text
    assert "Failed to send resource request" not in text and "GetTimeoutError" not in text
    # both trials (2 workers x 0.5 CPU each) ran at once on 2 CPUs: the trial drivers
    # reserve no CPU, so they do not keep a second trial's workers waiting
    spans = []
    for row in collected.rows:
        stamps = [json.loads(line)["timestamp"] for line in (Path(row.trial_dir) / "result.json").read_text().splitlines() if line.strip()]
        spans.append((max(stamps) - row.wall_s, max(stamps)))  # (start, end) of the trial
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, spans


def test_disk_used_by_a_search_is_one_checkpoint_per_trial_and_little_else(tiny_experiment):
    """The search's disk is bounded: one checkpoint copy per trial (keep_when_stopped: last / keep_when_done: best),
    no leftover temp copies, and everything else (Tune's state, TensorBoard, logs) under 1% of one checkpoint."""
    exp_dir = tiny_experiment["exp_dir"]
    files = [p for p in exp_dir.rglob("*") if p.is_file()]
    copies = {p.parent for p in files if p.parent.name.startswith("checkpoint_")} | {
        p.parent for p in files if p.parent.parent.name == "checkpoints" and p.parent.is_dir()
    }
    assert not [p for p in exp_dir.rglob("*") if p.name.startswith((".tmp-", ".old-"))]  # no interrupted write left behind
    assert len(copies) == 2, sorted(map(str, copies))  # 2 trials, one copy each
    in_copies = sum(p.stat().st_size for p in files if any(c in p.parents for c in copies))
    rest = sum(p.stat().st_size for p in files) - in_copies
    # measured: rest 0.32 MB against 431 MB in the 2 copies (215 MB each); the bar: 1% of one copy (2.2 MB)
    assert 0 < rest < 0.01 * in_copies / len(copies), (rest, in_copies)


def test_results_read_tunes_state_without_ray(tiny_experiment):
    """The plain-JSON reading of Tune's state says what Ray's ExperimentAnalysis says, and `vlptune results` imports no Ray or torch."""
    from vlptune.search.tune_state import TuneTrial, read_tune_trials

    exp_dir = tiny_experiment["exp_dir"]
    plain = {t.trial_id: t for t in read_tune_trials(exp_dir)}
    from ray.tune import ExperimentAnalysis  # the test's own reference reading (it unpickles: our own experiment)

    by_ray = {
        t.trial_id: TuneTrial(t.trial_id, t.status, Path(t.path) if t.path else None, dict(t.config), getattr(t.run_metadata, "error_filename", None))
        for t in ExperimentAnalysis(str(exp_dir)).trials
    }
    assert set(plain) == set(by_ray) and len(plain) == 2
    for trial_id, t in by_ray.items():
        assert plain[trial_id] == t
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vlptune.cli", "results", str(exp_dir)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"ray", "torch", "transformers"}, imported & {"ray", "torch", "transformers"}
    assert all(trial_id in proc.stdout for trial_id in plain)


def test_results_command(tiny_experiment, tmp_path, capsys):
    exp_dir = tiny_experiment["exp_dir"]
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    assert cli(["results", str(exp_dir), "--csv", str(csv_path), "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "model.vd.size" in out and METRIC in out and "best trial" in out and "its full recipe:" in out
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 2 and {"trial", "model.vd.size", METRIC, "best", "step", "status", "wall_s"} <= set(rows[0])
    values = [float(r[METRIC]) for r in rows]
    assert values == sorted(values, reverse=True)  # sorted by the metric, best first
    data = json.loads(json_path.read_text())
    best = data["best"]
    completed = [t for t in data["trials"] if t["status"] == "completed"] or data["trials"]
    top = completed[0]  # best = the best trial that reached the maximum fidelity (a pruned one may score higher)
    assert best["trial_id"] == top["trial_id"] and best["metric"] == pytest.approx(top["metric"])
    assert best["recipe"]["model"]["vd"]["size"] == top["params"]["model.vd.size"]
    assert best["recipe"]["train"]["max_steps"] == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_board_serves_every_trial_in_hparams(tiny_experiment):
    from vlptune.search import results

    exp_dir = tiny_experiment["exp_dir"]
    collected = results.collect(exp_dir)
    port = _free_port()
    code = "import sys; from vlptune.search.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "board", str(exp_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if "TensorBoard for" in line or not line:
                break
        match = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
        assert match, f"no address printed: {line!r}"
        url = match.group(1)
        assert int(match.group(2)) == port
        # the server listens on loopback only
        conns = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if conns.strip():
            assert all("127.0.0.1:" in ln for ln in conns.strip().splitlines()), conns

        experiment = {}
        for _ in range(60):  # the first load of the event files takes a moment
            experiment = hparams_experiment(url)
            if experiment.get("metricInfos"):
                break
            time.sleep(1)
        tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
        assert tags[:2] == [METRIC, "retrieval/chance_rsum"]  # the search metric, then its chance level
        # the searched hparams first (TensorBoard sorts them by name), then the short fixed list
        searched = ["model.vd.size", "objectives.mvm.weight", "data.mlm_prob"]
        hparam_names = [h["name"] for h in experiment["hparamInfos"]]
        assert hparam_names[: len(searched)] == sorted(searched)
        assert set(hparam_names) == {*searched, *FIXED_HPARAMS}
        groups = []
        for _ in range(60):
            groups = hparams_sessions(url, [METRIC])
            if len(groups) >= len(collected.rows):
                break
            time.sleep(1)
        by_run = {}
        for g in groups:
            assert len(g["sessions"]) == 1  # one session per trial, hparams written once
            name = g["sessions"][0]["name"]
            by_run[name] = g
        assert set(by_run) == {r.trial_id for r in collected.rows}  # pruned trials included
        for row in collected.rows:
            g = by_run[row.trial_id]
            assert g["hparams"]["model.vd.size"] == pytest.approx(row.params["model.vd.size"])
            value = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}[METRIC]
            assert value == pytest.approx(row.metric, rel=1e-5)
    finally:
        stop_process(proc, 30)


def test_board_refuses_a_directory_without_runs(tmp_path, capsys):
    assert cli(["board", str(tmp_path), "--port", "0"]) == 2
    assert "no TensorBoard runs" in capsys.readouterr().err


def test_search_refuses_an_existing_experiment_and_bad_resume(tiny_experiment, tmp_path, capsys):
    exp_dir = tiny_experiment["exp_dir"]
    space = tiny_experiment["space"]
    assert cli(["search", str(space), "--storage", str(exp_dir.parent), "--name", exp_dir.name]) == 2
    assert "already exists; continue it with --resume" in capsys.readouterr().err
    assert cli(["search", "--resume", str(tmp_path)]) == 2
    assert "not a vlptune search experiment" in capsys.readouterr().err


# ====================================================================== a stand-in loop (slow suite)

# The stand-in has train_worker's signature and reporting contract, costs no
# compute, and is steered by a control file in the recipe's data.root:
#   {"sleep": s per step, "crash_at": step (first attempt only), "nan_at": step}
STANDIN = textwrap.dedent(
    """
    import json, os, time
    from pathlib import Path


    def worker(recipe, reporter, out_dir, resume=True):
        import torch
        import torch.distributed as dist

        control = json.loads((Path(recipe.data.root) / "control.json").read_text())
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        out = Path(out_dir)
        ck = out / "standin_ckpt"
        start = 0
        if resume and (ck / "state.json").is_file():
            start = json.loads((ck / "state.json").read_text())["step"]
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "attempts.jsonl", "a") as f:
                f.write(json.dumps({"start": start, "world": world}) + "\\n")
        w = recipe.objectives["mvm"].weight
        for step in range(start + 1, recipe.train.max_steps + 1):
            time.sleep(control.get("sleep", 0.0))
            if control.get("crash_at") == step and not (out / "crashed").exists():
                (out / "crashed").write_text("1")
                os._exit(1)  # a hard worker death
            if control.get("nan_at") == step:
                final = {"step": step, "stop_reason": f"non-finite loss for 3 consecutive steps, last at step {step}"}
                reporter.report(final, None)
                return final
            if step % recipe.train.eval_every == 0 or step == recipe.train.max_steps:
                t = torch.ones(1)
                if dist.is_initialized():
                    dist.all_reduce(t)
                written = None
                if rank == 0:
                    ck.mkdir(parents=True, exist_ok=True)
                    (ck / "state.json").write_text(json.dumps({"step": step}))
                    written = str(ck)
                reporter.report({"step": step, "retrieval/rsum": w * step, "world": float(t.item())}, written)
        return {"step": recipe.train.max_steps, "stop_reason": "max_steps"}
    """
)


def standin_module(tmp_path: Path):
    return import_by_value(tmp_path / "standin_loop.py", STANDIN, f"standin_loop_{abs(hash(str(tmp_path)))}")


def standin_space(tmp_path: Path, control: dict, body: str) -> Path:
    return make_standin_space(tmp_path, control, body, metric=METRIC, max_steps=40, eval_every=10)


def run_standin(tmp_path: Path, control: dict, body: str, **kwargs):
    from vlptune.search.runner import run_search

    module = standin_module(tmp_path)
    space = standin_space(tmp_path, control, body)
    exp_dir = tmp_path / "exp"
    try:
        grid = run_search(space, exp_dir=exp_dir, worker_fn=module.worker, verbose=0, **kwargs)
    finally:
        shutdown_ray()
    return grid, exp_dir


@pytest.mark.slow
def test_a_trial_that_cannot_fit_is_refused_and_leaves_nothing(tmp_path):
    from vlptune.search.layout import SearchError
    from vlptune.search.runner import run_search

    module = standin_module(tmp_path)
    space = standin_space(tmp_path, {}, "resources: {workers: 3, cpus_per_worker: 1}\nparameters:\n  objectives.mvm.weight: {uniform: [0.5, 1.5]}\n")
    with pytest.raises(SearchError, match=r"a trial needs 3 worker\(s\) x 1 CPU = 3 CPUs; the cluster has 2"):
        run_search(space, exp_dir=tmp_path / "exp", worker_fn=module.worker, num_cpus=2, verbose=0)
    assert not (tmp_path / "exp").exists()
    import ray

    assert not ray.is_initialized()


@pytest.mark.slow
def test_early_stopped_trials_reach_optuna_as_pruned(tmp_path):
    grid, exp_dir = run_standin(
        tmp_path,
        {"sleep": 0.02},
        """
        num_samples: 4
        max_concurrent: 1
        scheduler: {type: asha, grace_period: 10, reduction_factor: 2}
        searcher: {type: grid, seed: 0}
        parameters:
          objectives.mvm.weight: {categorical: [2.0, 0.25, 1.0, 0.5]}
        """,
    )
    from vlptune.search import results

    collected = results.collect(exp_dir)
    studied = optuna_trials(exp_dir)
    assert len(collected.rows) == 4
    pruned = [r for r in collected.rows if r.status == "pruned"]
    assert pruned, "ASHA stopped no trial"
    for row in collected.rows:
        t = studied[row.trial_id]
        reported = dict(row.history)
        if row.fidelity < 40:
            assert t.state.name == "PRUNED" and row.status == "pruned"
            # every value the trial reported, the stopping one included, never a COMPLETE
            assert t.intermediate_values == pytest.approx(reported)
            assert t.value == pytest.approx(reported[row.fidelity])
        else:
            assert t.state.name == "COMPLETE" and t.value == pytest.approx(row.metric)


@pytest.mark.slow
def test_failed_worker_is_retried_from_its_last_checkpoint(tmp_path):
    grid, exp_dir = run_standin(
        tmp_path,
        {"sleep": 0.05, "crash_at": 25},
        """
        num_samples: 1
        scheduler: {type: fifo}
        failures: {max_failures: 1}
        parameters:
          objectives.mvm.weight: {uniform: [0.5, 1.5]}
        """,
    )
    assert grid.num_errors == 0
    (result,) = list(grid)
    assert result.metrics["step"] == 40
    trial_id = result.metrics["trial_id"]
    attempts = [json.loads(line) for line in (exp_dir / "tb" / trial_id / "attempts.jsonl").read_text().splitlines()]
    assert [a["start"] for a in attempts] == [0, 20]  # restarted from the checkpoint of step 20
    t = optuna_trials(exp_dir)[trial_id]
    assert t.state.name == "COMPLETE" and t.intermediate_values[40] == pytest.approx(result.metrics[METRIC])
    # every report of both attempts reaches Optuna, except that Ray Train may drop the report still in flight
    # when the worker dies (step 20 here, 5 steps before the crash; seen once in a 12-minute slow run)
    assert {10, 30, 40} <= set(t.intermediate_values) <= {10, 20, 30, 40}, sorted(t.intermediate_values)


@pytest.mark.slow
def test_worker_failures_beyond_the_limit_fail_the_trial(tmp_path):
    grid, exp_dir = run_standin(
        tmp_path,
        {"crash_at": 5},
        """
        num_samples: 1
        scheduler: {type: fifo}
        failures: {max_failures: 0}
        parameters:
          objectives.mvm.weight: {uniform: [0.5, 1.5]}
        """,
    )
    assert grid.num_errors == 1
    from vlptune.search import results

    (row,) = results.collect(exp_dir).rows
    assert row.status == "error" and row.error
    assert optuna_trials(exp_dir)[row.trial_id].state.name == "FAIL"


@pytest.mark.slow
def test_nan_stop_ends_with_a_clear_reason(tmp_path):
    grid, exp_dir = run_standin(
        tmp_path,
        {"nan_at": 5},
        """
        num_samples: 1
        scheduler: {type: asha, grace_period: 10}
        parameters:
          objectives.mvm.weight: {uniform: [0.5, 1.5]}
        """,
    )
    assert grid.num_errors == 0  # the trial ended by itself, with its reason
    from vlptune.search import results

    (row,) = results.collect(exp_dir).rows
    assert row.status.startswith("stopped: non-finite loss")
    assert row.stop_reason.startswith("non-finite loss") and row.fidelity == 5
    t = optuna_trials(exp_dir)[row.trial_id]
    assert t.state.name == "FAIL" and t.user_attrs["stop_reason"].startswith("non-finite loss")


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["hyperband", "median"])
def test_other_schedulers(tmp_path, scheduler):
    settings = {"hyperband": "{type: hyperband, reduction_factor: 2}", "median": "{type: median, grace_period: 10, min_samples_required: 1}"}
    grid, exp_dir = run_standin(
        tmp_path,
        {"sleep": 0.02},
        f"""
        num_samples: 3
        max_concurrent: 2
        scheduler: {settings[scheduler]}
        searcher: {{type: random, seed: 1}}
        parameters:
          objectives.mvm.weight: {{uniform: [0.25, 2.0]}}
        """,
    )
    assert grid.num_errors == 0
    studied = optuna_trials(exp_dir)
    assert len(studied) == 3
    for t in studied.values():
        assert t.state.name in ("COMPLETE", "PRUNED")
        if t.state.name == "COMPLETE":
            assert max(t.intermediate_values) == 40


RESUME_DRIVER = textwrap.dedent(
    """
    import sys, importlib.util
    import ray.cloudpickle
    spec = importlib.util.spec_from_file_location("standin_loop_resume", sys.argv[1])
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    ray.cloudpickle.register_pickle_by_value(module)
    from vlptune.search.runner import run_search
    if sys.argv[3] == "start":
        run_search(sys.argv[2], exp_dir=sys.argv[4], worker_fn=module.worker, verbose=0)
    else:
        run_search(None, exp_dir=sys.argv[4], resume=True, worker_fn=module.worker, verbose=0)
    """
)


def driver_commands(tmp_path: Path, space: Path, exp_dir: Path) -> tuple[list[str], list[str]]:
    """The commands that start and resume a search of ``space`` with the stand-in loop in ``tmp_path``."""
    driver = tmp_path / "driver.py"
    driver.write_text(RESUME_DRIVER)
    base = [sys.executable, str(driver), str(tmp_path / "standin_loop.py"), str(space)]
    return [*base, "start", str(exp_dir)], [*base, "resume", str(exp_dir)]


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(tmp_path):
    standin_module(tmp_path)  # writes standin_loop.py
    space = standin_space(
        tmp_path,
        {"sleep": 0.4},
        """
        num_samples: 4
        max_concurrent: 1
        scheduler: {type: fifo}
        searcher: {type: tpe, seed: 0, n_startup_trials: 2}
        parameters:
          objectives.mvm.weight: {uniform: [0.25, 2.0]}
        """,
    )
    exp_dir = tmp_path / "exp"
    cmd, resume = driver_commands(tmp_path, space, exp_dir)

    def one_complete_and_one_reported() -> bool:  # one trial is complete and the next one has reported a checkpoint
        if not (exp_dir / "optuna.db").exists():
            return False
        trials = optuna_trials(exp_dir).values()
        return any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" and t.intermediate_values for t in trials)

    kill_driver_when(cmd, REPO, one_complete_and_one_reported)  # SIGKILL: the driver and everything it started
    before = optuna_trials(exp_dir)
    completed_before = {tid: t.value for tid, t in before.items() if t.state.name == "COMPLETE"}
    interrupted = [tid for tid, t in before.items() if t.state.name == "RUNNING" and t.intermediate_values]
    assert completed_before and interrupted
    attempts_before = {tid: (exp_dir / "tb" / tid / "attempts.jsonl").read_text() for tid in completed_before}

    subprocess.run(resume, cwd=REPO, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    after = optuna_trials(exp_dir)
    from vlptune.search import results

    rows = {r.trial_id: r for r in results.collect(exp_dir).rows}
    finished = [tid for tid, t in after.items() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 4 and set(finished) == set(rows)  # the experiment reached num_samples
    assert not [t for t in after.values() if t.state.name == "RUNNING"]
    for tid, value in completed_before.items():
        assert after[tid].state.name == "COMPLETE" and after[tid].value == value  # history intact
        # completed trials were not run again
        assert (exp_dir / "tb" / tid / "attempts.jsonl").read_text() == attempts_before[tid]
    for tid in interrupted:
        attempts = [json.loads(line) for line in (exp_dir / "tb" / tid / "attempts.jsonl").read_text().splitlines()]
        assert len(attempts) == 2 and attempts[1]["start"] > 0  # resumed from its checkpoint
        assert after[tid].state.name == "COMPLETE" and sorted(after[tid].intermediate_values) == [10, 20, 30, 40]
