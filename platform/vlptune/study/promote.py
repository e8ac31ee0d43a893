"""Promotion: the best light trials of a search, mapped onto a full recipe.

:func:`promote` picks the best ``top_k`` trials that completed the final
fidelity (status ``completed`` and their last step equal to the space's
``train.max_steps``; never a trial the scheduler stopped early, never a failed
or non-finite one), maps their searched values onto the target recipe through
a fidelity map (:mod:`vlptune.study.fidelity`), and writes one recipe per
trial to ``<promoted_dir>/<experiment>/<trial_id>.yaml``::

    # provenance (written by `vlptune promote`; YAML under '# ', read with read_provenance):
    #   source_experiment: /abs/runs/search/demo-20250101-120000
    #   trial_id: 1a2b3c_00004
    #   ...
    base: ../../demo-full.yaml
    model:
      vd: {size: 32}

The provenance lives in comments, so the recipe schema is unchanged and
training never sees it. :func:`read_provenance` parses it back.

:func:`promotion_study` turns a promotion into an ablation ``StudySpec``
(variants = the promoted trials' mapped overrides on the target recipe), and
:func:`run_promotion` runs it (``vlptune promote --run``), writing
:data:`PROMOTION_FILE` into the new experiment so ``vlptune promote --report``
can pair light and full results.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlptune.config import ConfigError, deep_merge, default_objectives, load_raw, load_recipe, set_dotted, validate_recipe
from vlptune.io import atomic_write_text, finite
from vlptune.search import results as res
from vlptune.search.layout import PROMOTION_FILE, SearchError, not_an_experiment, read_meta
from vlptune.search.space import check_objectives
from vlptune.study.fidelity import FidelityMap, FidelityMapError, load_fidelity_map, map_values, overrides_of

REPO = Path(__file__).resolve().parents[3]
DEFAULT_MAP = REPO / "trials" / "fidelity" / "light-to-full.yaml"
PROMOTED_DIRNAME = "promoted"  # next to the target recipe: trials/promoted/
PROVENANCE_MARK = "# provenance"
PROVENANCE_PREFIX = "#   "
GIT_TIMEOUT_S = 10.0


class PromotionError(ConfigError):
    """A promotion that cannot be made (names the experiment, the trial or the file)."""


# ------------------------------------------------------------------ selection


def skip_reason(row: Any, max_fidelity: int) -> str | None:
    """Why a trial cannot be promoted (None: it completed the final fidelity with a finite metric)."""
    if row.status != "completed":
        where = f" at step {row.fidelity}" if row.fidelity is not None else ""
        if row.status == "pruned":
            return f"stopped early by the scheduler{where} (max {max_fidelity})"
        return f"status {row.status}{where}"
    if row.fidelity is None or int(row.fidelity) != int(max_fidelity):
        return f"last step {row.fidelity}, not the final fidelity {max_fidelity}"
    if not finite(row.metric):
        return f"metric {row.metric!r} is not a finite number"
    return None


@dataclass
class Selection:
    picked: list[Any]  # TrialRows, best first
    skipped: list[tuple[Any, str]]  # (TrialRow, reason) of every trial not eligible
    eligible: int  # trials that completed the final fidelity


def select_trials(results: Any, top_k: int) -> Selection:
    """The best ``top_k`` trials of :func:`vlptune.search.results.collect`'s results that completed the final fidelity."""
    if top_k < 1:
        raise PromotionError(f"--top-k: expected at least 1, got {top_k}")
    ok, skipped = [], []
    for row in results.rows:
        reason = skip_reason(row, results.max_fidelity)
        if reason is None:
            ok.append(row)
        else:
            skipped.append((row, reason))
    ok.sort(key=lambda r: r.metric, reverse=results.mode == "max")
    return Selection(picked=ok[:top_k], skipped=skipped, eligible=len(ok))


# ------------------------------------------------------------------ provenance


def git_commit(repo: Path = REPO) -> str:
    """``git rev-parse HEAD`` of the project, plus ' (dirty)' when its tree has changes; 'unknown' outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = head.stdout.strip()
    return f"{commit} (dirty)" if status.returncode == 0 and status.stdout.strip() else commit


def provenance_header(provenance: dict[str, Any]) -> str:
    body = yaml.safe_dump({"provenance": provenance}, sort_keys=False, width=1000).splitlines()[1:]
    lines = [f"{PROVENANCE_MARK} (written by `vlptune promote`; YAML under '# ', read with vlptune.study.promote.read_provenance):"]
    lines += [PROVENANCE_PREFIX + line[2:] if line.startswith("  ") else PROVENANCE_PREFIX + line for line in body]
    return "\n".join(lines) + "\n"


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance mapping in a promoted recipe's header comments."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith(PROVENANCE_MARK):
        raise PromotionError(f"{path}: no provenance header (the first line should start with {PROVENANCE_MARK!r}); was it written by `vlptune promote`?")
    body = []
    for line in lines[1:]:
        if not line.startswith(PROVENANCE_PREFIX):
            break
        body.append(line[len(PROVENANCE_PREFIX) :])
    data = yaml.safe_load("\n".join(body))
    if not isinstance(data, dict):
        raise PromotionError(f"{path}: the provenance header is not a YAML mapping")
    return data


# ------------------------------------------------------------------ promotion


@dataclass
class PromotedTrial:
    trial_id: str
    rank: int  # 1 = the best light trial
    metric_value: float
    fidelity: int
    searched: dict[str, Any]
    mapped: list[dict[str, Any]]  # MappedValue.as_dict() of each searched value
    overrides: dict[str, Any]  # dotted path -> value written into the promoted recipe
    file: str


@dataclass
class Promotion:
    source_experiment: str
    experiment: str  # the source experiment's name (the promoted files' folder)
    metric: str
    mode: str
    max_fidelity: int
    target: str
    fidelity_map: str
    git_commit: str
    date: str
    trials: list[PromotedTrial]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    eligible: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Promotion:
        data = dict(data)
        data["trials"] = [PromotedTrial(**t) for t in data["trials"]]
        return cls(**data)


def _nested(overrides: dict[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in overrides.items():
        set_dotted(out, path.split("."), value, source)
    return out


def promoted_recipe_text(target: Path, out_file: Path, overrides: dict[str, Any], provenance: dict[str, Any], defaults: dict[str, Any] | None = None) -> str:
    """``defaults``: sections written in full under the overrides (the default objectives when
    the target lists none: a partial ``objectives:`` would replace them all)."""
    base = os.path.relpath(target.resolve(), out_file.parent.resolve())
    body = {"base": base, **deep_merge(defaults or {}, _nested(overrides, str(out_file)))}
    return provenance_header(provenance) + yaml.safe_dump(body, sort_keys=False)


def promote(
    exp_dir: str | Path,
    *,
    top_k: int,
    target: str | Path,
    fidelity_map: str | Path | FidelityMap = DEFAULT_MAP,
    promoted_dir: str | Path | None = None,
) -> Promotion:
    """Pick, map, validate and write the promoted recipes; returns what was written."""
    exp_dir = Path(exp_dir).resolve()
    target = Path(target)
    try:
        meta = read_meta(exp_dir)
    except SearchError as exc:
        raise PromotionError(str(exc)) from None
    if meta.get("kind", "search") != "search":
        raise PromotionError(f"{exp_dir}: an experiment of kind {meta['kind']!r}, not a search; promote the trials of a `vlptune search` experiment")
    fmap = fidelity_map if isinstance(fidelity_map, FidelityMap) else load_fidelity_map(fidelity_map)
    # every searched parameter must be covered, checked before anything is written
    missing = fmap.uncovered(meta["parameters"])
    if missing:
        raise FidelityMapError(
            f"{fmap.file}: no rule for the searched parameter(s) {', '.join(missing)} of {exp_dir}; "
            "add each to rules: with carry, target, lr_linear, lr_sqrt or steps (a silent carry-over is refused)"
        )
    target_recipe = load_recipe(target)
    target_raw = load_raw(target)
    lists_no_objectives = "objectives" not in target_raw
    if lists_no_objectives:  # as a search space does: objectives.X.* must not drop the other default objectives
        target_raw["objectives"] = default_objectives()
    collected = res.collect(exp_dir)
    selection = select_trials(collected, top_k)
    if not selection.picked:
        lines = [f"  {row.trial_id}: {reason}" for row, reason in selection.skipped] or ["  (no trials)"]
        raise PromotionError(
            "\n".join(
                [
                    f"{exp_dir}: no trial completed the final fidelity (step {collected.max_fidelity}) with a finite {collected.metric}; nothing to promote:",
                    *lines,
                ]
            )
        )
    out_root = Path(promoted_dir) if promoted_dir is not None else target.parent / PROMOTED_DIRNAME
    out_dir = out_root / exp_dir.name
    commit, date = git_commit(), _dt.datetime.now().isoformat(timespec="seconds")
    promoted: list[PromotedTrial] = []
    pending: list[tuple[Path, str]] = []
    for rank, row in enumerate(selection.picked, start=1):
        context = f"trial {row.trial_id} of {exp_dir}"
        source = validate_recipe(res.trial_recipe(collected, row), context)
        searched = {p: row.params[p] for p in meta["parameters"] if p in row.params}
        mapped = map_values(fmap, searched, source, target_recipe, target_raw, context)
        overrides = overrides_of(mapped)
        out_file = out_dir / f"{row.trial_id}.yaml"
        # the promoted recipe must validate (and its objectives agree) before anything is written
        merged = deep_merge(target_raw, _nested(overrides, str(out_file)))
        check_objectives(validate_recipe(copy.deepcopy(merged), f"{out_file} (target {target} with the mapped values of {context})"))
        provenance = {
            "source_experiment": str(exp_dir),
            "trial_id": row.trial_id,
            "rank": rank,
            "metric": collected.metric,
            "mode": collected.mode,
            "metric_value": float(row.metric),
            "fidelity": int(row.fidelity),
            "max_fidelity": int(collected.max_fidelity),
            "searched": searched,
            "mapped": [m.as_dict() for m in mapped],
            "target": str(target.resolve()),
            "fidelity_map": str(Path(fmap.file).resolve()),
            "git_commit": commit,
            "date": date,
        }
        defaults = {"objectives": target_raw["objectives"]} if lists_no_objectives and any(p.startswith("objectives.") for p in overrides) else None
        pending.append((out_file, promoted_recipe_text(target, out_file, overrides, provenance, defaults)))
        promoted.append(
            PromotedTrial(row.trial_id, rank, float(row.metric), int(row.fidelity), searched, provenance["mapped"], overrides, str(out_file.resolve()))
        )
    for out_file, text in pending:
        atomic_write_text(out_file, text)
        load_recipe(out_file)  # the written file resolves its base: and validates
    return Promotion(
        source_experiment=str(exp_dir),
        experiment=exp_dir.name,
        metric=collected.metric,
        mode=collected.mode,
        max_fidelity=int(collected.max_fidelity),
        target=str(target.resolve()),
        fidelity_map=str(Path(fmap.file).resolve()),
        git_commit=commit,
        date=date,
        trials=promoted,
        skipped=[{"trial_id": row.trial_id, "metric": row.metric if finite(row.metric) else None, "reason": reason} for row, reason in selection.skipped],
        eligible=selection.eligible,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value) if isinstance(value, str) else str(value)


def format_promotion(promotion: Promotion, requested: int | None = None) -> str:
    lines = [
        f"promoted {len(promotion.trials)} trial(s) of {promotion.source_experiment} onto {promotion.target}",
        f"  metric {promotion.metric} ({promotion.mode}) at the final fidelity, step {promotion.max_fidelity}; fidelity map {promotion.fidelity_map}; commit {promotion.git_commit}",
    ]
    if requested is not None and len(promotion.trials) < requested:
        lines.append(f"  only {promotion.eligible} trial(s) completed the final fidelity, fewer than --top-k {requested}")
    for t in promotion.trials:
        lines.append(f"  #{t.rank} {t.trial_id}: {promotion.metric} = {t.metric_value:.4g} -> {t.file}")
        for m in t.mapped:
            lines.append(f"      {m['path']}: {_fmt(m['trial'])} -> {_fmt(m['promoted'])}  [{m['rule']}: {m['note']}]")
    better = [
        s
        for s in promotion.skipped
        if s["metric"] is not None
        and promotion.trials
        and ((s["metric"] > promotion.trials[0].metric_value) if promotion.mode == "max" else (s["metric"] < promotion.trials[0].metric_value))
    ]
    if promotion.skipped:
        lines.append(f"  not promoted ({len(promotion.skipped)}): " + "; ".join(f"{s['trial_id']} {s['reason']}" for s in promotion.skipped))
    if better:
        lines.append(
            f"  note: {', '.join(s['trial_id'] for s in better)} showed a better {promotion.metric} than the promoted winner but did not reach the final fidelity (an early value is not a final one)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ running promoted recipes


MIN_RUN_CONFIGS = 2  # an ablation study compares a baseline with at least one other variant


def promotion_study(
    promotion: Promotion,
    *,
    seeds: int,
    fixed: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    max_concurrent: int | None = None,
    name: str | None = None,
):
    """An ablation ``StudySpec``: the target recipe as base, one variant per promoted trial
    (its mapped overrides, the same that its promoted file holds), ``seeds`` seeds each,
    the best light trial as the baseline."""
    from vlptune.study.ablation import study_from_dict  # scipy (via study.stats): heavy, only when a study runs or is read

    if seeds < 1:
        raise PromotionError(f"--seeds: expected at least 1, got {seeds}")
    if len(promotion.trials) < MIN_RUN_CONFIGS:
        raise PromotionError(
            f"{promotion.source_experiment}: {len(promotion.trials)} promoted config(s); running them as one study needs at least "
            f"{MIN_RUN_CONFIGS} (it compares them, and the report ranks them); raise --top-k, or train the single recipe with `vlptune train`"
        )
    target = Path(promotion.target)
    doc: dict[str, Any] = {
        "name": name or f"promoted-{promotion.experiment}",
        "description": f"promoted from {promotion.source_experiment} (trials {', '.join(t.trial_id for t in promotion.trials)}) onto {promotion.target}",
        "base": str(target),
        "baseline": promotion.trials[0].trial_id,
        "variants": {t.trial_id: dict(t.overrides) for t in promotion.trials},
        "seeds": seeds,
        "metrics": [promotion.metric],
        "metric": promotion.metric,
        "mode": promotion.mode,
        "fixed": dict(fixed or {}),
    }
    if resources:
        doc["resources"] = dict(resources)
    if max_concurrent is not None:
        doc["max_concurrent"] = max_concurrent
    return study_from_dict(doc, source=f"promotion of {promotion.source_experiment}", base_dir=target.parent, default_name=doc["name"])


def steps_conflicts(promotion: Promotion, fixed: dict[str, Any]) -> list[str]:
    """Values mapped with the 'steps' rule when the run changes train.max_steps (they were scaled for the target's)."""
    if "train.max_steps" not in fixed:
        return []
    return sorted({m["path"] for t in promotion.trials for m in t.mapped if m["rule"] == "steps"})


def write_promotion_record(exp_dir: str | Path, promotion: Promotion, run: dict[str, Any]) -> Path:
    path = Path(exp_dir) / PROMOTION_FILE
    atomic_write_text(path, json.dumps({"promotion": promotion.to_json(), "run": run}, indent=1, default=str) + "\n")
    return path


def read_promotion_record(exp_dir: str | Path) -> tuple[Promotion, dict[str, Any]]:
    path = Path(exp_dir) / PROMOTION_FILE
    if not path.is_file():
        problem = f"not a promoted run ({PROMOTION_FILE} is missing); give the experiment directory printed by `vlptune promote --run`"
        raise PromotionError(not_an_experiment(exp_dir, problem))
    data = json.loads(path.read_text())
    return Promotion.from_json(data["promotion"]), data.get("run", {})


def run_promotion(
    promotion: Promotion,
    spec: Any,
    *,
    exp_dir: str | Path | None = None,
    address: str | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    worker_fn: Callable | None = None,
    verbose: int = 0,
) -> Path:
    """Run a :func:`promotion_study` through the ablation runner; returns its experiment directory.

    The promotion record (:data:`PROMOTION_FILE`) is written into the experiment
    directory when the run ends, however it ends (an interrupted run resumed with
    ``vlptune ablate --resume`` keeps it), so ``vlptune promote --report`` can pair it.
    """
    from vlptune.study.ablation import default_exp_dir, run_study  # scipy (via study.stats): heavy, only when a study runs or is read

    exp_dir = Path(exp_dir).resolve() if exp_dir is not None else Path(default_exp_dir(spec, storage, name))
    run = {"seeds": spec.seeds, "fixed": dict(spec.fixed), "study": spec.name, "address": address, "exp_dir": str(exp_dir)}
    fresh = not (exp_dir.exists() and any(exp_dir.iterdir()))  # run_study refuses a used directory: leave that one alone
    try:
        return Path(run_study(spec, exp_dir=exp_dir, address=address, worker_fn=worker_fn, verbose=verbose))
    finally:
        if fresh and exp_dir.is_dir() and any(exp_dir.iterdir()):
            write_promotion_record(exp_dir, promotion, run)


def run_note(promotion: Promotion, fixed: dict[str, Any]) -> str:
    """What the run changes with respect to the promoted files (said before it starts)."""
    if not fixed:
        return "the runs use the promoted recipes as written (target recipe + mapped values)"
    lines = [f"the runs differ from the promoted files by the study's fixed overrides: {', '.join(f'{k}={v!r}' for k, v in fixed.items())}"]
    if "train.max_steps" in fixed:
        target_steps = load_recipe(promotion.target).train.max_steps
        lines.append(f"  train.max_steps = {fixed['train.max_steps']} instead of the target's {target_steps}: the full results are of shorter runs")
    conflicts = steps_conflicts(promotion, fixed)
    if conflicts:
        lines.append(f"  note: {', '.join(conflicts)} were scaled (rule steps) for the target's train.max_steps, not for this run's")
    return "\n".join(lines)
