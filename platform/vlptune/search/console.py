"""A quiet, informative console for searches and studies.

By default (``quiet``) an experiment prints only what a person watching it
needs: one line per finished trial (completed, stopped by the scheduler, or
failed: its metric, steps and times) and a progress bar with the trials done,
running and stopped, the best metric so far and an ETA. Everything else that
Ray, Tune and Train print (status tables, worker output, per-step lines, Ray's
own warnings and tracebacks from its background threads and processes) goes
to ``EXP_DIR/vlptune.log``, whose path is printed first.

How: :class:`ConsoleLog` points the process's file descriptors 1 and 2 at the
log file for the duration of the experiment (so output written by C++ code,
by Ray's threads and by every process Ray starts, which inherit them, lands
there too) and keeps a duplicate of the original standard output for the
progress lines. ``--verbose`` turns all of it off: Tune's status tables and
everything else on the console, as Ray prints them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from vlptune.train.reporting import format_duration

LOG_FILE = "vlptune.log"  # in the experiment directory
BAR_WIDTH = 20  # characters of the progress bar
TTY_REFRESH_S = 1.0  # at most one redraw of the live progress line per second (terminals only)


class ConsoleLog:
    """Route everything written to stdout/stderr to ``log_path`` while the block runs; :meth:`say` reaches the console.

    ``quiet=False``: nothing is redirected and :meth:`say` prints to stdout.
    """

    def __init__(self, log_path: str | Path, quiet: bool = True):
        self.log_path = Path(log_path)
        self.quiet = quiet
        self.console: TextIO = sys.stdout
        self._saved: dict[int, int] = {}
        self._log: TextIO | None = None
        self._streams: tuple[TextIO, TextIO] = (sys.stdout, sys.stderr)
        self.isatty = False

    def __enter__(self) -> ConsoleLog:
        if not self.quiet:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._log = open(self.log_path, "a", buffering=1)
        has_fd = _has_fd(sys.stdout)
        self.isatty = has_fd and os.isatty(sys.stdout.fileno())
        # the original standard output, for the progress lines (a terminal, a pipe, or a stream object)
        self.console = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1) if has_fd else sys.stdout
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
            os.dup2(self._log.fileno(), fd)
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = sys.stderr = self._log  # Python-level writes of this process, whatever sys.stdout was
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.quiet:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._streams
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        if self.console is not sys.stdout:
            self.console.close()
        self.console = sys.stdout
        if self._log is not None:
            self._log.close()

    def say(self, line: str, end: str = "\n") -> None:
        self.console.write(line + end)
        self.console.flush()


def _has_fd(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


class Progress:
    """Counts of an experiment's trials and the line that shows them (no Ray needed: tests drive it directly).

    ``total``: trials the experiment will run; ``max_fidelity``: steps of a
    trial that runs to the end; ``metric``/``mode``: what "best" means.
    """

    def __init__(self, total: int, max_fidelity: int, metric: str, mode: str, time_attr: str = "step", clock=time.monotonic):
        self.total = max(1, int(total))
        self.max_fidelity = max(1, int(max_fidelity))
        self.metric = metric
        self.mode = mode
        self.time_attr = time_attr
        self.clock = clock
        self.start = clock()
        self.running: dict[str, float] = {}  # trial id -> fraction of its steps done
        self.completed = 0
        self.stopped = 0
        self.failed = 0
        self.best: float | None = None
        self.best_trial: str | None = None

    def started(self, trial_id: str) -> None:
        self.running.setdefault(trial_id, 0.0)

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        step = result.get(self.time_attr)
        if isinstance(step, (int, float)):
            self.running[trial_id] = min(1.0, float(step) / self.max_fidelity)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
            if better:
                self.best, self.best_trial = float(value), trial_id

    def finished(self, trial_id: str, outcome: str) -> None:
        """``outcome``: ``completed``, ``stopped`` (by the scheduler) or ``failed``."""
        self.running.pop(trial_id, None)
        setattr(self, outcome, getattr(self, outcome) + 1)

    @property
    def done(self) -> int:
        return self.completed + self.stopped + self.failed

    def fraction(self) -> float:
        """Share of the experiment's work done: finished trials count whole, running ones by their steps."""
        return min(1.0, (self.done + sum(self.running.values())) / self.total)

    def eta_s(self) -> float | None:
        fraction = self.fraction()
        if fraction <= 0.0:
            return None
        return (self.clock() - self.start) * (1.0 - fraction) / fraction

    def line(self) -> str:
        fraction = self.fraction()
        filled = int(round(fraction * BAR_WIDTH))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        parts = [f"[{bar}] {self.done}/{self.total} trials done ({self.completed} completed, {self.stopped} stopped early"]
        parts[0] += f", {self.failed} failed)" if self.failed else ")"
        parts.append(f"{len(self.running)} running")
        if self.best is not None:
            parts.append(f"best {self.metric} {self.best:.4g}")
        elapsed = self.clock() - self.start
        eta = self.eta_s()
        parts.append(f"{format_duration(elapsed)} elapsed" + (f", ETA {format_duration(eta)}" if eta is not None and self.done < self.total else ""))
        return " | ".join(parts)


def trial_line(trial_id: str, outcome: str, last: dict[str, Any], metric: str, time_attr: str, startup_key: str, wall_s: float | None) -> str:
    """One line for a finished trial: outcome, steps, its metric, wall time and start-up."""
    step = last.get(time_attr)
    value = last.get(metric)
    words = {"completed": "completed", "stopped": "stopped early by the scheduler", "failed": "failed"}[outcome]
    text = f"trial {trial_id} {words}"
    if step is not None:
        text += f" at {time_attr} {step}"
    if isinstance(value, (int, float)) and not math.isnan(value):
        text += f": {metric} {value:.4g}"
    reason = last.get("stop_reason")
    if outcome == "completed" and reason not in (None, "max_steps"):
        text += f" (ended by itself: {reason})"
    times = []
    if wall_s is not None:
        times.append(f"{format_duration(wall_s)} wall")
    startup = last.get(startup_key)
    if isinstance(startup, (int, float)):
        times.append(f"start-up {format_duration(startup)}")
    if times:
        text += f" ({', '.join(times)})"
    return text


def progress_callback(console: ConsoleLog, progress: Progress, startup_key: str):
    """A Tune callback printing :func:`trial_line` per finished trial and the progress bar (Ray imported here)."""
    from ray.tune import Callback  # ray: heavy, only when this runs

    class ProgressCallback(Callback):
        def __init__(self, console: ConsoleLog, progress: Progress, startup_key: str) -> None:
            self.console: ConsoleLog | None = console
            self.progress = progress
            self.startup_key = startup_key
            self.started_at: dict[str, float] = {}
            self.firsts: dict[str, dict[str, Any]] = {}
            self.last_draw = 0.0

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks with the experiment's state: the console (open files) stays here
            return {**self.__dict__, "console": None}

        def say(self, line: str, end: str = "\n") -> None:
            if self.console is not None:
                self.console.say(line, end=end)

        @property
        def tty(self) -> bool:
            return self.console is not None and self.console.isatty

        def _draw(self, force: bool = False) -> None:
            if self.tty:
                now = time.monotonic()
                if force or now - self.last_draw >= TTY_REFRESH_S:
                    self.say("\r\033[K" + self.progress.line(), end="")
                    self.last_draw = now
            elif force:
                self.say(self.progress.line())

        def _event(self, line: str) -> None:
            self.say(("\r\033[K" if self.tty else "") + line)
            self._draw(force=True)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.started_at[trial.trial_id] = time.monotonic()
            self.progress.started(trial.trial_id)
            self._draw()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.firsts.setdefault(trial.trial_id, dict(result))
            self.progress.result(trial.trial_id, result)
            self._draw()

        def _finish(self, trial, outcome: str) -> None:
            last = dict(self.firsts.pop(trial.trial_id, {}))
            last.update(trial.last_result or {})
            start = self.started_at.pop(trial.trial_id, None)
            wall = time.monotonic() - start if start is not None else None
            self.progress.finished(trial.trial_id, outcome)
            self._event(trial_line(trial.trial_id, outcome, last, self.progress.metric, self.progress.time_attr, self.startup_key, wall))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            step = (trial.last_result or {}).get(self.progress.time_attr)
            reached = isinstance(step, (int, float)) and step >= self.progress.max_fidelity
            stop_reason = (trial.last_result or {}).get("stop_reason")
            self._finish(trial, "completed" if reached or stop_reason else "stopped")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._finish(trial, "failed")

        def on_experiment_end(self, trials, **info) -> None:
            if self.tty:
                self.say("")

    return ProgressCallback(console, progress, startup_key)
