"""Fault tests across processes (slow: each starts Ray): a search driver killed after a trial's last
report resumes without relaunching that trial (it is completed from its stored checkpoint).

The in-process kill-and-resume of the loop is tests/test_checkpoint.py (default suite); a killed
worker retried from its checkpoint is tests/test_search.py and tests/test_retention.py (slow); a
driver killed mid-trial is tests/test_search.py::test_resume_after_the_driver_is_killed (slow).
"""

from __future__ import annotations

import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from helpers import import_by_value, kill_driver_when
from test_search import REPO, driver_commands, optuna_trials, standin_space

# The stand-in loop of tests/test_search.py, with two changes: its checkpoint's state.json holds the
# evaluation reported with it (as the real loop's does), and with {"hang_at_end": true} the first trial
# to finish stays alive after its last report (a trial Tune still counts as running when the driver dies).
STANDIN = textwrap.dedent(
    """
    import json, time
    from pathlib import Path


    def worker(recipe, reporter, out_dir, resume=True):
        control = json.loads((Path(recipe.data.root) / "control.json").read_text())
        out = Path(out_dir)
        ck = out / "standin_ckpt"
        start = 0
        if resume and (ck / "state.json").is_file():
            start = json.loads((ck / "state.json").read_text())["step"]
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"start": start}) + "\\n")
        w = recipe.objectives["mvm"].weight
        for step in range(start + 1, recipe.train.max_steps + 1):
            time.sleep(control.get("sleep", 0.0))
            if step % recipe.train.eval_every == 0 or step == recipe.train.max_steps:
                metrics = {"step": step, "retrieval/rsum": w * step}
                ck.mkdir(parents=True, exist_ok=True)
                (ck / "state.json").write_text(json.dumps({"step": step, "extra": {"metrics": metrics}}))
                reporter.report(metrics, str(ck))
        hung = Path(recipe.data.root) / "hung"  # one trial of the experiment, once
        if control.get("hang_at_end") and not hung.exists():
            hung.write_text(out.name)
            time.sleep(3600)  # killed with the driver
        return {"step": recipe.train.max_steps, "stop_reason": "max_steps"}
    """
)


@pytest.mark.slow  # two local Ray clusters, one after the other: ~2-4 min on a shared 2-core machine
def test_a_trial_finished_before_the_driver_was_killed_is_not_relaunched(tmp_path):
    from vlptune.search import results
    from vlptune.search.run_storage import COMPLETED_FROM_CHECKPOINT_KEY

    import_by_value(tmp_path / "standin_loop.py", STANDIN, f"standin_faults_{abs(hash(str(tmp_path)))}")
    space = standin_space(
        tmp_path,
        {"sleep": 0.05, "hang_at_end": True},
        "parameters: {objectives.mvm.weight: {uniform: [0.25, 2.0]}}\nnum_samples: 2\nmax_concurrent: 1\nscheduler: {type: fifo}\nsearcher: {type: random, seed: 0}\n",
    )
    exp_dir = tmp_path / "exp"
    cmd, resume = driver_commands(tmp_path, space, exp_dir)
    hung: list[str] = []

    def first_trial_hangs_after_its_last_report() -> bool:
        if not (exp_dir / "optuna.db").exists() or not (tmp_path / "data" / "hung").is_file():
            return False
        hung[:] = [tid for tid, t in optuna_trials(exp_dir).items() if t.state.name == "RUNNING" and 40 in t.intermediate_values]
        if hung:
            time.sleep(12)  # Tune saves its experiment state every few seconds: the trial is saved running
        return bool(hung)

    kill_driver_when(cmd, REPO, first_trial_hangs_after_its_last_report)
    (tid,) = hung
    assert (tmp_path / "data" / "hung").read_text() == tid
    value = optuna_trials(exp_dir)[tid].intermediate_values[40]

    subprocess.run(resume, cwd=REPO, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    after = optuna_trials(exp_dir)
    assert len(after) == 2 and {t.state.name for t in after.values()} == {"COMPLETE"}
    assert after[tid].value == value  # its own last evaluation, not a new one
    # no worker ran for it again: one attempt only
    assert len((exp_dir / "tb" / tid / "attempts.jsonl").read_text().splitlines()) == 1
    rows = {r.trial_id: r for r in results.collect(exp_dir).rows}
    assert rows[tid].status == "completed" and rows[tid].metric == value and rows[tid].fidelity == 40
    reports = results.read_results(Path(rows[tid].trial_dir))
    assert reports[-1].get(COMPLETED_FROM_CHECKPOINT_KEY) == 1.0
