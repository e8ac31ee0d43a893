"""Tune's trials of an experiment, read from its ``experiment_state-*.json`` as plain JSON.

Tune writes each trial as a JSON document in which some fields (the storage
context, the checkpoint manager) are pickled objects that only Ray can load.
What ``vlptune results`` needs is plain JSON there: the trial id, its status,
its sampled config, its directory (``relative_logdir``) and the name of its
error file. Reading only those keeps ``results`` free of Ray and of
unpickling anything from an experiment directory: experiments are copied
between colleagues and from clusters, and reading one must never run code
(docs/search.md, "Trust boundary"). The pickled fields are never decoded. A
trial whose config Tune could only store pickled gets its config from the
plain-JSON ``params.json`` Tune's JSON logger wrote in the trial directory
(empty when there is none); a state that is not Tune's JSON at all is a
:class:`TuneStateError` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_GLOB = "experiment_state-*.json"  # Tune's experiment checkpoint; the newest name is the latest (timestamped)
PICKLED_MARK = "_type"  # how Tune marks a value it could only store pickled (CLOUDPICKLE_FALLBACK)
PARAMS_FILE = "params.json"  # a trial's config as Tune's JsonLoggerCallback writes it (plain JSON)


class TuneStateError(ValueError):
    """An experiment state that is not the JSON this reader knows (names the file)."""


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


def _pickled(config: Any) -> bool:
    return not isinstance(config, dict) or PICKLED_MARK in config or any(isinstance(v, dict) and PICKLED_MARK in v for v in config.values())


def _params_json(trial_dir: Path | None) -> dict[str, Any]:
    """The trial's config from its ``params.json`` (plain JSON), or {} when there is none readable."""
    if trial_dir is None:
        return {}
    try:
        params = json.loads((trial_dir / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def read_tune_trials(exp_dir: str | Path) -> list[TuneTrial]:
    """The trials in the newest experiment state of ``exp_dir`` (empty before Tune saved one).

    Raises :class:`TuneStateError` (naming the file) for a state that is not Tune's JSON.
    """
    exp_dir = Path(exp_dir)
    states = sorted(exp_dir.glob(STATE_GLOB))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
        out = []
        for trial_json, runtime_json in data["trial_data"]:
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            trial_id = str(trial["trial_id"])
            path = _trial_dir(exp_dir, trial_id, trial.get("relative_logdir"))
            config = trial.get("config") or {}
            if _pickled(config):  # never unpickled: the trial's own plain-JSON copy instead
                config = _params_json(path)
            error = runtime.get("error_filename")
            out.append(
                TuneTrial(
                    trial_id=trial_id,
                    status=str(trial["status"]),
                    path=path,
                    config=dict(config),
                    error_filename=error if isinstance(error, str) else None,
                )
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TuneStateError(f"{states[-1]}: not a Tune experiment state this version of vlptune reads ({type(exc).__name__}: {exc})") from None
    return out
