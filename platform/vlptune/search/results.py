"""Results of a search experiment: one row per trial, the best trial's recipe.

Sources, all plain JSON, CSV or SQLite (nothing from an experiment directory
is ever unpickled here: :mod:`vlptune.search.tune_state`): Tune's experiment
state (trial status, config, every reported result in each trial's
``result.json``), the Optuna study (how each finished
trial was told: completed, pruned, failed, with its stop reason) and the
experiment's saved base recipe (to resolve a trial's full recipe).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import yaml

from vlptune.config import recipe_to_dict, set_dotted, validate_recipe
from vlptune.config.downstream import DOWNSTREAM_PREFIX, downstream_columns
from vlptune.io import finite
from vlptune.search.layout import BASE_COPY, TB_DIR, TRIAL_RECIPE, SearchError, local_view, read_meta, study_url
from vlptune.search.trainable import STARTUP_KEY
from vlptune.search.tune_state import TuneStateError, read_tune_trials

TUNE_STATUS_WORDS = {"TERMINATED": "terminated", "ERROR": "error", "RUNNING": "running", "PENDING": "pending", "PAUSED": "paused"}


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None  # last reported value
    best: float | None  # best reported value (by the experiment's mode)
    fidelity: int | None  # last step reported
    status: str  # completed | pruned | stopped: <reason> | nan | error | unfinished | pending | ...
    wall_s: float | None  # time_total_s of the trial (Tune)
    startup_s: float | None  # Tune start -> the loop running on the workers
    reports: int
    optuna_number: int | None = None
    optuna_state: str | None = None
    stop_reason: str | None = None
    error: str | None = None
    trial_dir: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)
    startup: dict[str, float] = field(default_factory=dict)  # every startup/* figure of the first report
    skipped: int | None = None  # corrupt training records skipped (the last report's data/skipped_records)
    downstream: dict[str, float] = field(default_factory=dict)  # the last report's downstream/<task>/* values (a trial that finetuned)


@dataclass
class ExperimentResults:
    exp_dir: str
    metric: str
    mode: str
    max_fidelity: int
    parameters: list[str]
    rows: list[TrialRow]
    downstream: list[str] = field(default_factory=list)  # one column per downstream task (config.downstream.downstream_columns)

    @property
    def best(self) -> TrialRow | None:
        """The best trial that reached the maximum fidelity; else the best of any trial."""
        done = [r for r in self.rows if r.status == "completed" and finite(r.metric)]
        pool = done or [r for r in self.rows if finite(r.metric)]
        if not pool:
            return None
        pick = max if self.mode == "max" else min
        return pick(pool, key=lambda r: r.metric if r.metric is not None else math.nan)


def read_results(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted driver
    return out


def _optuna_trials(meta: dict[str, Any], exp_dir: Path | None = None) -> dict[str, Any]:
    """Tune trial id -> Optuna FrozenTrial (empty when the study cannot be opened, or there is
    none: an ablation study runs without a searcher)."""
    if not meta.get("storage_url"):
        return {}
    import optuna  # optuna: heavy, only when a study is read

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        url = study_url(meta, exp_dir) if exp_dir is not None else meta["storage_url"]
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
            return {}  # no study written yet (and opening it would create an empty file)
        study = optuna.load_study(study_name=meta["study_name"], storage=url)
    except Exception:
        return {}
    return {t.user_attrs["ray_trial_id"]: t for t in study.get_trials(deepcopy=False) if "ray_trial_id" in t.user_attrs}


def collect(exp_dir: str | Path, mirror_dir: str | Path | None = None) -> ExperimentResults:
    """Read an experiment (finished, running or interrupted): a directory, or a URI
    (``s3://...``, ``file://...``) downloaded first into ``mirror_dir`` (see :func:`local_view`)."""
    from vlptune.data.shard_checks import SKIPPED_KEY  # shard_checks imports pyarrow: only when results are read

    exp_dir = local_view(exp_dir, mirror_dir).resolve()
    meta = read_meta(exp_dir)
    metric, mode = meta["metric"], meta["mode"]
    try:
        trials = read_tune_trials(exp_dir)  # plain JSON: no Ray, nothing unpickled (docs/search.md, "Trust boundary")
    except TuneStateError as exc:
        raise SearchError(str(exc)) from None
    studied = _optuna_trials(meta, exp_dir)
    rows = []
    for t in trials:
        trial_dir = t.path
        results = read_results(trial_dir) if trial_dir else []
        history = [(int(r["step"]), float(r[metric])) for r in results if "step" in r and finite(r.get(metric))]
        values = [v for _, v in history]
        last = results[-1] if results else {}
        first = results[0] if results else {}
        frozen = studied.get(t.trial_id)
        stop_reason = last.get("stop_reason")
        if stop_reason == "max_steps":
            stop_reason = None
        error = None
        if t.status == "ERROR":
            err_name = t.error_filename
            err_path = trial_dir / err_name if trial_dir and err_name else None
            if err_path and err_path.is_file():
                lines = [ln for ln in err_path.read_text().splitlines() if ln.strip()]
                error = lines[-1] if lines else "error"
            else:
                error = "error"
        if frozen is not None and frozen.state.is_finished():
            status = frozen.user_attrs.get("outcome") or frozen.state.name.lower()
        elif t.status == "ERROR":
            status = "error"
        elif t.status == "TERMINATED" and frozen is None and results:
            # no searcher told this trial (an ablation study): judge by what it reported
            if stop_reason and stop_reason != "max_steps":
                status = f"stopped: {stop_reason}"
            elif isinstance(last.get("step"), (int, float)) and int(last["step"]) >= int(meta["max_fidelity"]):
                status = "completed"
            else:
                status = "terminated"
        elif t.status in ("PENDING", "RUNNING") and results:
            # Tune saves running trials as PENDING: started, not finished (running, or interrupted)
            status = "unfinished"
        else:
            status = TUNE_STATUS_WORDS.get(t.status, t.status.lower())
        rows.append(
            TrialRow(
                trial_id=t.trial_id,
                params=dict(t.config),
                metric=last.get(metric) if finite(last.get(metric)) else (float("nan") if metric in last else None),
                best=(max(values) if mode == "max" else min(values)) if values else None,
                fidelity=int(last["step"]) if isinstance(last.get("step"), (int, float)) else None,
                status=status,
                wall_s=last.get("time_total_s"),
                startup_s=first.get(STARTUP_KEY),
                reports=len(results),
                optuna_number=frozen.number if frozen is not None else None,
                optuna_state=frozen.state.name if frozen is not None else None,
                stop_reason=stop_reason or (frozen.user_attrs.get("stop_reason") if frozen is not None else None),
                error=error,
                trial_dir=str(trial_dir) if trial_dir else None,
                history=history,
                startup={k: float(v) for k, v in first.items() if k.startswith(STARTUP_PREFIX) and isinstance(v, (int, float))},
                skipped=_last_count(results, SKIPPED_KEY),
                downstream={k: float(v) for k, v in last.items() if k.startswith(DOWNSTREAM_PREFIX) and isinstance(v, (int, float))},
            )
        )
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (0, sign * r.metric) if finite(r.metric) else (1, 0.0))
    columns = downstream_columns({k for r in rows for k in r.downstream}, metric)
    return ExperimentResults(str(exp_dir), metric, mode, int(meta["max_fidelity"]), list(meta["parameters"]), rows, columns)


def _last_count(results: list[dict[str, Any]], key: str) -> int | None:
    """The last report's count ``key`` (a running total), or None when no report holds it."""
    counts = [r[key] for r in results if finite(r.get(key))]
    return int(counts[-1]) if counts else None


def trial_recipe(results: ExperimentResults, row: TrialRow) -> dict[str, Any]:
    """The full resolved recipe of a trial (as the trial wrote it, or rebuilt from the base)."""
    for candidate in (Path(results.exp_dir) / TB_DIR / row.trial_id / "recipe.yaml", Path(row.trial_dir or "") / TRIAL_RECIPE):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text())
    base_path = Path(results.exp_dir) / BASE_COPY
    if not base_path.is_file():
        raise SearchError(f"{results.exp_dir}: {BASE_COPY} is missing; cannot rebuild trial {row.trial_id}'s recipe")
    raw = yaml.safe_load(base_path.read_text())
    for path, value in row.params.items():
        set_dotted(raw, path.split("."), value, f"trial {row.trial_id}")
    return recipe_to_dict(validate_recipe(raw, f"trial {row.trial_id}"))


# ------------------------------------------------------------------ output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def table_columns(results: ExperimentResults) -> list[str]:
    return ["trial", *results.parameters, results.metric, "best", *results.downstream, "step", "status", "wall_s", "startup_s", "skipped"]


def table_rows(results: ExperimentResults) -> list[list[Any]]:
    out = []
    for r in results.rows:
        status = r.status
        if r.error and status == "error":
            status = f"error: {r.error}"
        tasks = [r.downstream.get(c) for c in results.downstream]
        out.append([r.trial_id, *[r.params.get(p) for p in results.parameters], r.metric, r.best, *tasks, r.fidelity, status, r.wall_s, r.startup_s, r.skipped])
    return out


def format_table(results: ExperimentResults, max_status: int = 60) -> str:
    header = table_columns(results)
    body = []
    for row in table_rows(results):
        cells = [_fmt(c) for c in row]
        status_index = header.index("status")
        if len(cells[status_index]) > max_status:
            cells[status_index] = cells[status_index][: max_status - 3] + "..."
        body.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def summary(results: ExperimentResults) -> str:
    counts: dict[str, int] = {}
    for r in results.rows:
        key = r.status.split(":", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"{results.exp_dir}: {len(results.rows)} trials ({parts or 'none yet'}); metric {results.metric} ({results.mode}), fidelity up to step {results.max_fidelity}"


STARTUP_PREFIX = "startup/"
# The start-up phases in the order they happen (keys of a trial's first report; search/trainable.py, train/loop.py).
STARTUP_PHASES = (
    ("trial_actor_s", "Tune's trial actor runs the trial function (Tune counts from when the actor is up)"),
    ("worker_group_s", "Train controller, placement group, worker process (its imports: torch, transformers), torch.distributed"),
    ("import_loop_s", "import the training loop on a worker (what the worker's start-up had not imported yet)"),
    ("prepare_data_s", "check / prepare the data"),
    ("build_model_s", "build the model and optimisers (MiniLM weights)"),
    ("open_data_s", "open the shards, first batch loader"),
    ("first_step_s", "first training step (first batch decoded)"),
)


def format_startup(results: ExperimentResults) -> str:
    """Where a trial's start-up goes: each phase's median (min..max) over the trials, and the start-up's share of the wall time."""

    rows = [r for r in results.rows if r.startup]
    if not rows:
        return f"{results.exp_dir}: no trial reported its start-up phases"
    lines = [f"start-up of {len(rows)} trial(s) of {results.exp_dir}, seconds: median (min..max)"]
    total = []
    for key, what in STARTUP_PHASES:
        values = [r.startup[STARTUP_PREFIX + key] for r in rows if STARTUP_PREFIX + key in r.startup]
        if values:
            lines.append(f"  {key[:-2]:<14} {median(values):7.1f}  ({min(values):.1f}..{max(values):.1f})  {what}")
    for r in rows:
        phases = [r.startup[STARTUP_PREFIX + key] for key, _ in STARTUP_PHASES if STARTUP_PREFIX + key in r.startup]
        if len(phases) == len(STARTUP_PHASES):
            total.append((sum(phases), r.wall_s))
    if total:
        starts = [t for t, _ in total]
        shares = [t / w for t, w in total if w]
        lines.append(f"  {'total':<14} {median(starts):7.1f}  ({min(starts):.1f}..{max(starts):.1f})  Tune start -> first step done")
        if shares:
            lines.append(f"  share of a trial's wall time: median {100 * median(shares):.0f}% ({100 * min(shares):.0f}%..{100 * max(shares):.0f}%)")
    return "\n".join(lines)


def write_csv(results: ExperimentResults, path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table_columns(results))
        for row in table_rows(results):
            writer.writerow(["" if c is None else c for c in row])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(results: ExperimentResults) -> dict[str, Any]:
    best = results.best
    return _json_safe(
        {
            "exp_dir": results.exp_dir,
            "metric": results.metric,
            "mode": results.mode,
            "max_fidelity": results.max_fidelity,
            "parameters": results.parameters,
            "downstream": results.downstream,
            "trials": [asdict(r) for r in results.rows],
            "best": {"trial_id": best.trial_id, "metric": best.metric, "recipe": trial_recipe(results, best)} if best else None,
        }
    )


def write_json(results: ExperimentResults, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_json(results), indent=1) + "\n")


def format_best(results: ExperimentResults) -> str:
    best = results.best
    if best is None:
        return "no trial has reported the metric yet"
    reached = "reached the last step" if best.status == "completed" else f"did not finish (status {best.status}); no trial has completed yet"
    recipe = trial_recipe(results, best)
    head = f"best trial {best.trial_id}: {results.metric} = {_fmt(best.metric)} at step {best.fidelity} ({reached})"
    return head + "\nits full recipe:\n" + yaml.safe_dump(recipe, sort_keys=False)
