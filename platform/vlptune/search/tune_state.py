"""Tune's trials of an experiment, read from its ``experiment_state-*.json`` as plain JSON.

Tune writes each trial as a JSON document in which some fields (the storage
context, the checkpoint manager) are pickled objects that only Ray can load.
What ``vlptune results`` needs is plain JSON there: the trial id, its status,
its sampled config, its directory (``relative_logdir``) and the name of its
error file. Reading only those keeps ``results`` free of Ray (and of
unpickling anything from an experiment directory). A state this reader does
not understand returns None, and the caller reads it with Ray's
``ExperimentAnalysis`` instead (search/results.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_GLOB = "experiment_state-*.json"  # Tune's experiment checkpoint; the newest name is the latest (timestamped)
PICKLED_MARK = "_type"  # how Tune marks a value it could only store pickled (CLOUDPICKLE_FALLBACK)


@dataclass(frozen=True)
class TuneTrial:
    """What results need of one trial: its id, Tune status, directory, sampled config and error file."""

    trial_id: str
    status: str  # Tune's: PENDING (also an interrupted run's running trials), RUNNING, TERMINATED, ERROR
    path: Path | None  # the trial directory (None before Tune made one)
    config: dict[str, Any]
    error_filename: str | None


def _trial_dir(exp_dir: Path, trial_id: str, relative: Any) -> Path | None:
    if isinstance(relative, str) and relative:
        return exp_dir / relative
    # no relative_logdir recorded: Tune names the directory <trainable>_<trial_id>[_<tag>_<date>]
    found = [d for d in exp_dir.iterdir() if d.is_dir() and (d.name.endswith(f"_{trial_id}") or f"_{trial_id}_" in d.name)]
    return found[0] if len(found) == 1 else None


def read_tune_trials(exp_dir: str | Path) -> list[TuneTrial] | None:
    """The trials in the newest experiment state of ``exp_dir`` (empty before Tune saved one); None if it holds
    something only Ray can read (then ask Ray)."""
    exp_dir = Path(exp_dir)
    states = sorted(exp_dir.glob(STATE_GLOB))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
        out = []
        for trial_json, runtime_json in data["trial_data"]:
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            config = trial.get("config") or {}
            if not isinstance(config, dict) or PICKLED_MARK in config or any(isinstance(v, dict) and PICKLED_MARK in v for v in config.values()):
                return None
            error = runtime.get("error_filename")
            out.append(
                TuneTrial(
                    trial_id=str(trial["trial_id"]),
                    status=str(trial["status"]),
                    path=_trial_dir(exp_dir, str(trial["trial_id"]), trial.get("relative_logdir")),
                    config=dict(config),
                    error_filename=error if isinstance(error, str) else None,
                )
            )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return out
