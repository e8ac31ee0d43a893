"""The quiet console of searches and studies: the progress line, per-trial lines, and the log file
that takes everything else (Python, C-level and child-process output)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from vlptune.search.console import ConsoleLog, Progress, trial_line
from vlptune.train.reporting import format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_format_duration():
    assert format_duration(42.4) == "42s"
    assert format_duration(75) == "1m15s"
    assert format_duration(3700) == "1h01m"
    assert format_duration(-3) == "0s"


def test_progress_counts_fraction_best_and_eta():
    clock = FakeClock()
    p = Progress(total=4, max_fidelity=50, metric="val/mlm_acc", mode="max", clock=clock)
    assert p.eta_s() is None and "0/4 trials done" in p.line()
    p.started("a")
    p.started("b")
    p.result("a", {"step": 25, "val/mlm_acc": 0.2})
    p.result("b", {"step": 25, "val/mlm_acc": 0.3})
    p.result("b", {"step": 50, "val/mlm_acc": float("nan")})  # a NaN never becomes the best
    assert p.best == 0.3 and p.best_trial == "b"
    p.finished("a", "stopped")
    p.finished("b", "completed")
    clock.now += 60.0
    # two trials finished out of four: half the work in 60 s, so about 60 s to go
    assert p.fraction() == 0.5
    assert p.eta_s() == 60.0
    line = p.line()
    assert "[##########----------] 2/4 trials done (1 completed, 1 stopped early)" in line
    assert "0 running" in line and "best val/mlm_acc 0.3" in line and "1m00s elapsed, ETA 1m00s" in line
    p.started("c")
    p.result("c", {"step": 25})
    assert p.fraction() == (2 + 0.5) / 4
    p.finished("c", "failed")
    assert "1 failed" in p.line()


def test_progress_min_mode_keeps_the_lowest():
    p = Progress(total=2, max_fidelity=10, metric="val/loss", mode="min", clock=FakeClock())
    p.result("a", {"val/loss": 2.0})
    p.result("b", {"val/loss": 1.5})
    p.result("a", {"val/loss": 1.7})
    assert p.best == 1.5 and p.best_trial == "b"


def test_trial_line_names_outcome_step_metric_and_times():
    last = {"step": 25, "val/mlm_acc": 0.31234, "startup/to_loop_s": 12.0}
    assert trial_line("abc", "stopped", last, "val/mlm_acc", "step", "startup/to_loop_s", 95.0) == (
        "trial abc stopped early by the scheduler at step 25: val/mlm_acc 0.3123 (1m35s wall, start-up 12s)"
    )
    nan = trial_line("abc", "completed", {"step": 3, "val/mlm_acc": float("nan"), "stop_reason": "nan"}, "val/mlm_acc", "step", "startup/to_loop_s", None)
    assert nan == "trial abc completed at step 3 (ended by itself: nan)"


def test_console_log_takes_python_c_level_and_child_output(tmp_path):
    log = tmp_path / "exp" / "vlptune.log"
    shown = io.StringIO()
    saved = sys.stdout
    sys.stdout = shown
    try:
        with ConsoleLog(log) as console:
            print("python print")
            print("python stderr", file=sys.stderr)
            os.write(1, b"fd 1 write\n")
            os.write(2, b"fd 2 write\n")
            subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"], check=True)
            console.say("progress line")
        print("after the block")
    finally:
        sys.stdout = saved
    text = log.read_text()
    for expected in ("python print", "python stderr", "fd 1 write", "fd 2 write", "child out", "child err"):
        assert expected in text, expected
    assert "progress line" not in text
    assert shown.getvalue() == "progress line\nafter the block\n"


def test_console_log_not_quiet_redirects_nothing(tmp_path, capsys):
    with ConsoleLog(tmp_path / "vlptune.log", quiet=False) as console:
        print("plain")
        console.say("said")
    assert capsys.readouterr().out == "plain\nsaid\n"
    assert not (tmp_path / "vlptune.log").exists()


def test_a_failed_fresh_experiment_keeps_its_log_beside_the_removed_directory(tmp_path):
    from vlptune.search.layout import kept_log_path
    from vlptune.search.runner import _keep_log, _remove_keeping_log

    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    log = exp_dir / "vlptune.log"
    log.write_text("ray said something\n")
    assert _keep_log(log) == log
    _remove_keeping_log(exp_dir, log)
    assert not exp_dir.exists()
    assert kept_log_path(exp_dir) == tmp_path / "exp.log"
    assert _keep_log(log) == tmp_path / "exp.log" and (tmp_path / "exp.log").read_text() == "ray said something\n"
