"""Ablation studies: named variants of one recipe, each trained with several seeds,
as one Ray Tune experiment, and the table a paper would print.

A study file (YAML, format in docs/ablation.md)::

    name: soho-vd
    base: ../../trials/demo-light.yaml   # relative to this file
    baseline: no-vd
    variants:
      no-vd: {model.vd.size: 0, objectives.mvm.weight: 0.0}
      vd-32: {model.vd.size: 32}
    seeds: 3                              # seed i trains with train.seed = seed_base + i
    metrics: [retrieval/rsum, val/itm_acc]
    metric: retrieval/rsum                # the primary one
    mode: max
    fixed: {train.max_steps: 40}

:func:`load_study` validates everything before anything runs: every overlay
path exists in the recipe schema and every value is allowed there (the same
machinery as ``vlptune space check``), and every variant's recipe validates
and reports the primary metric. :func:`run_study` runs variants x seeds with
the search's trial machinery (:func:`vlptune.search.runner.run_experiment`:
one Tune function trainable per trial building a ``TorchTrainer``, resume,
retries, TensorBoard per trial), every trial to the full fidelity (no
searcher, FIFO). :func:`collect_study` reads the finished trials back and
:func:`~vlptune.study.ablation_table.study_table` computes the statistics
(:mod:`vlptune.study.stats`); :func:`write_study_outputs` writes the table.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlptune.config import (
    ConfigError,
    Recipe,
    check_field_value,
    field_at,
    format_validation_error,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    validate_recipe,
)
from vlptune.io import atomic_write_text, finite
from vlptune.search import layout
from vlptune.search import results as search_results
from vlptune.search.layout import BASE_COPY, META_FILE, TB_DIR, SearchError, absolute_paths, not_an_experiment
from vlptune.search.location import DirUploader, Location
from vlptune.search.params import FailuresSpec
from vlptune.search.plan_file import describe_failures, describe_fixed, describe_header, resolve_base, split_overrides
from vlptune.search.results import read_results
from vlptune.search.runner import TrialPlan, run_experiment
from vlptune.search.space import FIDELITY_PATH, TIME_ATTR, check_objectives, metric_problem
from vlptune.search.trainable import apply_config
from vlptune.study import stats
from vlptune.study.ablation_table import format_csv, format_markdown, study_table

log = logging.getLogger(__name__)

STUDY_FILE_COPY = "ablation_study.yaml"  # the study file as given
STUDY_SPEC = "vlptune_study.json"  # the resolved StudySpec (resume and collect_study read it)
TABLE_MD = "ablation.md"
TABLE_CSV = "ablation.csv"
TB_RUN = "ablation"  # TensorBoard run (under EXP_DIR/tb) holding the table as text
TB_TEXT_TAG = "ablation/table"
DEFAULT_STORAGE = "runs/ablation"
# What the driver of a URI study uploads (and a resume downloads) besides the trials: layout.DRIVER_FILES for a study.
STUDY_DRIVER_FILES = (META_FILE, BASE_COPY, STUDY_SPEC, STUDY_FILE_COPY)
KIND = "ablation"
VARIANT_KEY = "variant"  # Tune config keys of a study trial
SEED_KEY = "seed"
SEED_PATH = "train.seed"
MAX_SEEDS = 1000
MAX_SEED = 2**31 - 1  # TrainConfig.seed's upper bound
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]*$")

# Study-level keys that `-o key=value` may override; any other override is a recipe field of every variant.
STUDY_OVERRIDE_KEYS = (
    "name",
    "description",
    "baseline",
    "variants",
    "seeds",
    "seed_base",
    "metrics",
    "metric",
    "mode",
    "confidence",
    "max_concurrent",
    "failures",
)
# Overlay paths a variant may not set, and why.
RESERVED_PATHS = {
    SEED_PATH: "seeds are the study's: seed i trains with train.seed = seed_base + i (set seeds:/seed_base:)",
    FIDELITY_PATH: "every variant trains to the same fidelity; set train.max_steps in fixed:",
}


class StudyError(RuntimeError):
    """A study that cannot start, resume or be read (names the directory and the problem)."""


# ------------------------------------------------------------------ the file


class StudyFile(BaseModel):
    """The top level of a study file (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, description="experiment name prefix (default: the file name)")
    description: str = Field("", description="free text, printed with the plan and the table")
    base: str = Field(..., min_length=1, description="the recipe every variant starts from (path relative to the study file)")
    baseline: str = Field(..., min_length=1, description="the variant the others are compared with")
    variants: dict[str, dict[str, Any] | None] = Field(..., description="variant name -> overlay (dotted recipe path -> value); the baseline's may be empty")
    seeds: int = Field(3, ge=1, le=MAX_SEEDS, description="seeds per variant; seed i trains with train.seed = seed_base + i")
    seed_base: int = Field(0, ge=0, le=MAX_SEED - MAX_SEEDS, description="train.seed of the first seed")
    metrics: list[str] = Field(
        ..., min_length=1, description="result keys reported in the table (the loop's evaluation keys, e.g. retrieval/rsum, val/itm_acc)"
    )
    metric: str = Field(..., min_length=1, description="the primary metric (every variant must report it; listed first in the table)")
    mode: Literal["min", "max"] = Field(..., description="whether the primary metric is better when lower or higher")
    confidence: float = Field(stats.DEFAULT_CONFIDENCE, gt=0.5, lt=1.0, description="level of the confidence interval of the difference to the baseline")
    max_concurrent: int = Field(2, ge=1, le=10_000, description="trials running at once (also bounded by the cluster's CPUs/GPUs)")
    resources: dict[str, Any] = Field(
        default_factory=dict, description="recipe.resources of every trial: workers, cpus_per_worker, gpus_per_worker, torch_threads"
    )
    failures: FailuresSpec = Field(default_factory=FailuresSpec)
    fixed: dict[str, Any] = Field(default_factory=dict, description="dotted recipe path -> value, applied to every variant")


class StudySpec(StudyFile):
    """A validated study: the file's fields, resolved (see :func:`load_study`)."""

    variants: dict[str, dict[str, Any]] = Field(..., description="variant name -> overlay (dotted recipe path -> value), in file order")  # type: ignore[assignment]  # resolved: no overlay is None
    name: str = Field(..., min_length=1, description="experiment name prefix")
    file: str = Field(..., description="the study file (or a label for a study built in code)")
    base_file: str = Field(..., description="the base recipe file, resolved")
    base_raw: dict[str, Any] = Field(..., description="the base recipe with resources, fixed and command-line overrides applied")
    overrides: list[str] = Field(default_factory=list, description="command-line recipe overrides applied to every variant")

    # -------------------------------------------------------------- derived

    @property
    def base_recipe(self) -> Recipe:
        return Recipe.model_validate(self.base_raw)

    @property
    def max_fidelity(self) -> int:
        return int(self.base_recipe.train.max_steps)

    @property
    def variant_names(self) -> list[str]:
        """Baseline first, then the others in file order."""
        return [self.baseline, *(v for v in self.variants if v != self.baseline)]

    @property
    def seed_values(self) -> list[int]:
        return [self.seed_base + i for i in range(self.seeds)]

    @property
    def num_trials(self) -> int:
        return len(self.variants) * self.seeds

    def variant_raw(self, variant: str, seed: int) -> dict[str, Any]:
        """The raw recipe of one trial: base + the variant's overlay + train.seed."""
        return resolve_trial(self.base_raw, {VARIANT_KEY: variant, SEED_KEY: seed}, f"{self.file}: variant {variant!r}", variants=self.variants)

    def variant_recipe(self, variant: str, seed: int | None = None) -> Recipe:
        seed = self.seed_base if seed is None else seed
        return validate_recipe(self.variant_raw(variant, seed), f"{self.file}: variant {variant!r} (seed {seed})")

    def describe(self) -> str:
        base = self.base_recipe
        res = base.resources
        lines = describe_header("ablation study", self, base)
        lines += [
            f"  trials: {len(self.variants)} variants x {self.seeds} seeds = {self.num_trials}, each to train.max_steps = {self.max_fidelity} (no early stopping), at most {self.max_concurrent} at once; each {res.workers} worker(s) x {res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU",
            f"  seeds: train.seed = {', '.join(str(s) for s in self.seed_values)}",
            f"  metrics: {', '.join(self.metrics)}; primary {self.metric} ({self.mode}); {self.confidence:.0%} intervals, Welch's t-test",
            describe_failures(self.failures),
            "  variants:",
        ]
        for name in self.variant_names:
            overlay = self.variants[name]
            tag = " (baseline)" if name == self.baseline else ""
            text = ", ".join(f"{k}={v!r}" for k, v in overlay.items()) or "the base recipe as is"
            lines.append(f"    {name}{tag}: {text}")
            for m in self.metrics:
                problem = metric_problem(m, self.variant_recipe(name))
                if problem:
                    lines.append(f"      {m} will be missing: {problem}")
        lines += describe_fixed(self)
        return "\n".join(lines)


def resolve_trial(base_raw: dict[str, Any], config: dict[str, Any], source: str, *, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A study trial's raw recipe from Tune's config ``{variant, seed}`` (the trainable's ``resolve``)."""
    name = config[VARIANT_KEY]
    if name not in variants:
        raise StudyError(f"{source}: unknown variant {name!r}; the study has {sorted(variants)}")
    overlay = {**copy.deepcopy(variants[name]), SEED_PATH: int(config[SEED_KEY])}
    return apply_config(base_raw, overlay, f"{source}: variant {name!r}")


def study_hparams(spec: StudySpec) -> list[str]:
    """What a study varies, in the order its trials' HParams list it: the variant, the seed
    (``train.seed``), then every path a variant's overlay sets (in file order)."""
    paths = dict.fromkeys(path for overlay in spec.variants.values() for path in overlay)
    return [VARIANT_KEY, SEED_PATH, *paths]


# ------------------------------------------------------------------ loading


def study_from_dict(
    doc: dict[str, Any],
    *,
    source: str,
    base_dir: str | Path,
    overrides: list[str] | None = None,
    default_name: str = "study",
) -> StudySpec:
    """Validate a study given as a mapping (the parsed file; or built in code, e.g. by promotion).

    ``base_dir``: what ``base:`` is relative to. ``overrides``: ``key=value``
    texts; keys in :data:`STUDY_OVERRIDE_KEYS` change the study
    (``seeds=2``, ``variants.vd-64={model.vd.size: 64}``), any other is a
    recipe field of every variant, applied after ``fixed``. Every problem is
    reported at once in one :class:`ConfigError` naming ``source``.
    """
    doc = copy.deepcopy(doc)
    study_overrides, recipe_overrides = split_overrides(overrides, STUDY_OVERRIDE_KEYS)
    for text in study_overrides:
        parts, value = parse_override(text)
        set_dotted(doc, parts, value, f"override {text!r}")
    head = f"{source}: invalid ablation study:"
    try:
        spec = StudyFile.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError("\n".join([head, *format_validation_error(exc, source, StudyFile).splitlines()[1:]])) from None
    problems: list[str] = []
    base = resolve_base(source, Path(base_dir), spec.base, spec.resources, spec.fixed, recipe_overrides)
    problems += base.problems

    variants: dict[str, dict[str, Any]] = {}
    for name, overlay in spec.variants.items():
        label = f"  variants.{name}"
        if not isinstance(name, str) or not VARIANT_NAME.match(name):
            problems.append(f"{label}: a variant name is letters, digits, '_', '+' and '-' (starting with a letter or digit); got {name!r}")
            continue
        overlay = dict(overlay or {})
        for path, value in overlay.items():
            where = f"{label}.{path}"
            try:
                field_at(path)
            except ConfigError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if path in RESERVED_PATHS:
                problems.append(f"{where}: {RESERVED_PATHS[path]}")
            elif path.startswith("resources."):
                problems.append(f"{where}: resources are per study, not per variant; set them in resources:")
            elif path in base.fixed:
                problems.append(f"{where}: also set in fixed/resources/overrides for every variant; a path is either fixed or set per variant")
            else:
                problem = check_field_value(path, value)
                if problem:
                    problems.append(f"{where}: {problem}")
        variants[name] = overlay
    if not variants:
        problems.append("  variants: empty; give the baseline and at least one other variant")
    elif len(variants) < 2:
        problems.append(f"  variants: only {sorted(variants)}; an ablation compares the baseline with at least one other variant")
    if spec.baseline not in spec.variants:
        problems.append(f"  baseline: {spec.baseline!r} is not one of the variants {list(spec.variants)}")
    if len(set(spec.metrics)) != len(spec.metrics):
        problems.append(f"  metrics: listed twice: {sorted({m for m in spec.metrics if spec.metrics.count(m) > 1})}")
    if problems:
        raise ConfigError("\n".join([head, *problems]))

    metrics = list(spec.metrics)
    if spec.metric not in metrics:
        metrics.insert(0, spec.metric)
    else:  # the primary one first
        metrics.remove(spec.metric)
        metrics.insert(0, spec.metric)
    study = StudySpec(
        **{**spec.model_dump(exclude={"variants", "name", "metrics", "failures"}), "failures": spec.failures},
        name=spec.name or default_name,
        metrics=metrics,
        variants=variants,
        file=source,
        base_file=base.file,
        base_raw=base.raw,
        overrides=list(recipe_overrides),
    )
    # every variant's recipe validates, its objectives accept it, and it reports the primary metric
    for name in study.variant_names:
        try:
            recipe = validate_recipe(
                study.variant_raw(name, study.seed_base), f"variant {name!r}", sources=dict.fromkeys(study.variants[name], f"variant {name!r}")
            )
            check_objectives(recipe)
        except ConfigError as exc:
            problems += [
                f"  variants.{name}: {line.strip()}" for line in str(exc).splitlines() if line.strip() and not line.strip().endswith("invalid configuration:")
            ]
            continue
        problem = metric_problem(study.metric, recipe)
        if problem:
            problems.append(f"  variants.{name}: the primary metric {study.metric!r} would not be reported: {problem}")
    if problems:
        raise ConfigError("\n".join([head, *problems]))
    return study


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Read and validate a study file (see :func:`study_from_dict` for ``overrides``)."""
    path = Path(path)
    doc = read_yaml_mapping(path)
    return study_from_dict(doc, source=str(path), base_dir=path.parent, overrides=overrides, default_name=path.stem)


def load_experiment_study(exp_dir: str | Path) -> StudySpec:
    """The study of an experiment, from the resolved copy saved in its directory."""
    path = Path(exp_dir) / STUDY_SPEC
    if not path.is_file():
        raise StudyError(not_an_experiment(exp_dir, f"not a vlptune ablation study ({STUDY_SPEC} is missing)"))
    try:
        return StudySpec.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise StudyError(f"{path}: unreadable study copy: {exc}") from None


# ------------------------------------------------------------------ running


def default_exp_dir(spec: StudySpec, storage: str | Path | None, name: str | None) -> Path | str:
    """``STORAGE/NAME`` (default storage :data:`DEFAULT_STORAGE`): a directory, or a URI when ``storage`` is one."""
    return layout.default_exp_dir(spec, storage, name, default_storage=DEFAULT_STORAGE)


def write_experiment_files(spec: StudySpec, exp_dir: Path, address: str | None, location: str | None = None) -> dict[str, Any]:
    """The study's copy and the experiment meta file that `vlptune results`/`board` read, in ``exp_dir``
    (the directory, or the driver mirror of a URI study; ``location``: where it lives, default ``exp_dir``)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    if Path(spec.file).is_file():
        shutil.copyfile(spec.file, exp_dir / STUDY_FILE_COPY)
    atomic_write_text(exp_dir / STUDY_SPEC, spec.model_dump_json(indent=1) + "\n")
    layout.write_base_copy(exp_dir, spec.base_raw)
    meta = {
        "kind": KIND,
        "name": exp_dir.name,
        "space_file": str(Path(spec.file).resolve()) if Path(spec.file).is_file() else spec.file,
        "base_file": spec.base_file,
        "overrides": spec.overrides,
        "metric": spec.metric,
        "mode": spec.mode,
        "max_fidelity": spec.max_fidelity,
        "time_attr": TIME_ATTR,
        "parameters": [VARIANT_KEY, SEED_KEY],
        "storage_url": None,  # no searcher, no Optuna study
        "study_name": exp_dir.name,
        "location": location or str(exp_dir),
        "scheduler": "fifo",
        "searcher": None,
        "num_samples": spec.num_trials,
        "address": address,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    return layout.write_meta(exp_dir, meta)


def _study_settings(spec: StudySpec) -> dict[str, Any]:
    """Every (variant, seed) once, to the full fidelity: Tune's grid, no searcher, FIFO."""
    from ray import tune  # ray: heavy, only when a study runs
    from ray.tune.schedulers import FIFOScheduler  # ray: as above

    return {
        "param_space": {VARIANT_KEY: tune.grid_search(spec.variant_names), SEED_KEY: tune.grid_search(spec.seed_values)},
        "num_samples": 1,
        "scheduler": FIFOScheduler(),
    }


def run_study(
    spec: StudySpec | None,
    *,
    exp_dir: str | Path | None = None,
    address: str | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    resume: bool = False,
    worker_fn: Callable | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: int = 0,
    worker_log_level: str = "WARNING",
    callbacks: list | None = None,
) -> Path:
    """Run (or, with ``resume``, continue) variants x seeds as one Ray Tune experiment.

    Returns the experiment directory, where the table (``ablation.md``,
    ``ablation.csv``, TensorBoard text in ``tb/ablation``) is written when the
    trials are done. On resume the saved study is used (``spec`` may be None;
    a different one is ignored with a warning). ``worker_fn``: the per-worker
    function (``train_worker``'s signature; tests pass a stand-in).

    ``exp_dir`` / ``storage``: a directory or a URI (:mod:`vlptune.search.location`);
    a URI study runs like a URI search (the driver's files kept in its local
    mirror and uploaded, the table uploaded at the end) and the directory
    returned is that mirror.
    """
    if resume and exp_dir is None:
        raise StudyError("resuming a study needs its experiment directory")
    if not resume and spec is None:
        raise StudyError("a study needs a StudySpec (load_study(FILE)), or resume=True with exp_dir")
    fresh = False
    try:
        if exp_dir is None:
            assert spec is not None  # refused above otherwise
            exp_dir = default_exp_dir(spec, storage, name)
        loc = layout.experiment_location(exp_dir)
        if resume:
            if loc.remote:
                layout.download_for_resume(loc, STUDY_DRIVER_FILES)
            exp_dir = loc.local
            saved = load_experiment_study(exp_dir)
            if spec is not None and spec.model_dump(exclude={"base_raw", "file", "base_file"}) != saved.model_dump(exclude={"base_raw", "file", "base_file"}):
                log.warning("resuming %s with its saved study (from %s), not the one given", exp_dir, saved.file)
            spec = saved
        else:
            exp_dir = loc.local
            layout.check_fresh(loc)
            assert spec is not None  # refused above otherwise
            spec = spec.model_copy(update={"base_raw": absolute_paths(spec.base_raw, Path.cwd())})
            fresh = True
            write_experiment_files(spec, exp_dir, address, location=loc.path)

        plan = TrialPlan(
            source=spec,
            data_recipes=[spec.variant_recipe(v) for v in spec.variant_names],
            tune_settings=lambda: _study_settings(spec),
            resolve=functools.partial(resolve_trial, variants=spec.variants),
            hparams=study_hparams(spec),
            driver_files=STUDY_DRIVER_FILES,
        )
        run_experiment(
            plan,
            exp_dir,
            fresh=fresh,
            resume=resume,
            address=address,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            verbose=verbose,
            worker_log_level=worker_log_level,
            worker_fn=worker_fn,
            callbacks=callbacks,
            location=loc,
        )
    except SearchError as exc:
        raise StudyError(str(exc)) from None
    write_study_outputs(exp_dir)
    if loc.remote:
        _upload_outputs(loc)
    return exp_dir


def _upload_outputs(loc: Location) -> None:
    """The table of a URI study, next to its trials at the URI (its TensorBoard text run too)."""
    try:
        loc.upload_driver_files((TABLE_MD, TABLE_CSV), None)
        DirUploader(loc.local / TB_DIR / TB_RUN, loc.join(TB_DIR, TB_RUN)).sync()
    except Exception as exc:
        raise StudyError(f"{loc.uri}: cannot upload the study's table: {' '.join(str(exc).split())}") from None


# ------------------------------------------------------------------ results


@dataclass
class StudyTrial:
    """One trial of a study: which variant and seed, how it ended, its final metrics."""

    trial_id: str
    variant: str
    seed: int
    status: str  # completed | stopped: <reason> | error | unfinished | pending | ... (vlptune results' words)
    step: int | None  # last step reported
    metrics: dict[str, float]  # the study's metrics at its last report (finite values only)
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Reached the full fidelity: its metrics count in the table."""
        return self.status == "completed"


@dataclass
class StudyResults:
    """Everything the table needs: the study's shape and its trials."""

    exp_dir: str
    name: str
    description: str
    baseline: str
    variants: list[str]  # baseline first
    seeds: list[int]  # train.seed values
    metrics: list[str]  # primary first
    metric: str
    mode: str
    confidence: float
    max_fidelity: int
    trials: list[StudyTrial] = field(default_factory=list)

    @classmethod
    def for_spec(cls, spec: StudySpec, trials: list[StudyTrial], exp_dir: str | Path = "") -> StudyResults:
        return cls(
            str(exp_dir),
            spec.name,
            spec.description,
            spec.baseline,
            spec.variant_names,
            spec.seed_values,
            list(spec.metrics),
            spec.metric,
            spec.mode,
            spec.confidence,
            spec.max_fidelity,
            list(trials),
        )

    @property
    def runs(self) -> dict[str, dict[int, dict[str, float]]]:
        """variant -> seed -> metrics, of the finished trials (the latest one if a seed ran twice)."""
        out: dict[str, dict[int, dict[str, float]]] = {v: {} for v in self.variants}
        for t in self.trials:
            if t.finished and t.variant in out:
                out[t.variant][t.seed] = dict(t.metrics)
        return out

    def values(self, variant: str, metric: str) -> list[float]:
        """The finite values of ``metric`` over the finished seeds of ``variant``, in seed order."""
        per_seed = self.runs.get(variant, {})
        return [per_seed[s][metric] for s in sorted(per_seed) if metric in per_seed[s]]

    def unfinished(self, variant: str) -> list[StudyTrial]:
        done = self.runs.get(variant, {})
        return [t for t in self.trials if t.variant == variant and t.seed not in done]


def collect_study(exp_dir: str | Path) -> StudyResults:
    """Read a study's experiment directory (finished, running or interrupted)."""
    exp_dir = Path(exp_dir).resolve()
    spec = load_experiment_study(exp_dir)
    trials = []
    for row in search_results.collect(exp_dir).rows:
        if VARIANT_KEY not in row.params or SEED_KEY not in row.params:
            continue
        reports = read_results(Path(row.trial_dir)) if row.trial_dir else []
        last = reports[-1] if reports else {}
        metrics = {m: float(last[m]) for m in spec.metrics if finite(last.get(m))}
        trials.append(StudyTrial(row.trial_id, str(row.params[VARIANT_KEY]), int(row.params[SEED_KEY]), row.status, row.fidelity, metrics, row.error))
    trials.sort(key=lambda t: (spec.variant_names.index(t.variant) if t.variant in spec.variant_names else len(spec.variant_names), t.seed))
    return StudyResults.for_spec(spec, trials, exp_dir)


# ------------------------------------------------------------------ output


def write_study_outputs(exp_dir: str | Path, results: StudyResults | None = None) -> str:
    """Write ``ablation.md``, ``ablation.csv`` and the TensorBoard text; returns the Markdown."""
    exp_dir = Path(exp_dir)
    results = collect_study(exp_dir) if results is None else results
    rows = study_table(results)
    markdown = format_markdown(results, rows)
    atomic_write_text(exp_dir / TABLE_MD, markdown)
    atomic_write_text(exp_dir / TABLE_CSV, format_csv(rows))
    from torch.utils.tensorboard import SummaryWriter  # torch, tensorboard: heavy, only when the table is written

    writer = SummaryWriter(log_dir=str(exp_dir / TB_DIR / TB_RUN))
    try:
        writer.add_text(TB_TEXT_TAG, markdown, global_step=sum(len(v) for v in results.runs.values()))
    finally:
        writer.close()
    return markdown
