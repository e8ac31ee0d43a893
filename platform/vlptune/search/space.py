"""Search-space files: what a search explores, on which recipe, and how.

A search space is a YAML file (format in docs/search.md)::

    base: ../trials/demo-light.yaml     # the recipe every trial starts from
    metric: retrieval/rsum              # reported by the loop at each evaluation
    mode: max
    num_samples: 8
    max_concurrent: 2
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    scheduler: {type: asha, grace_period: 20, reduction_factor: 2}
    searcher: {type: tpe, seed: 0, multivariate: true, constant_liar: true}
    fixed: {train.max_steps: 60}
    parameters:
      model.vd.size: {categorical: [0, 32, 64]}
      objectives.mvm.weight: {uniform: [0.25, 2.0], when: model.vd.size > 0}

:func:`load_space` reads and validates it before anything runs: every
parameter path exists in the recipe schema, every range is legal for its field
(bounds, integer or float, Literal choices), every ``when:`` expression is a
small safe comparison of earlier parameters, and the recipes at the corners of
the space validate. Each problem is reported at once with the file, the
parameter and what is allowed (:class:`~vlptune.config.ConfigError`). The file
schema and the parameter types are in :mod:`vlptune.search.params`, the
``when:`` language in :mod:`vlptune.search.when`, what a space file shares
with an ablation-study file (the base recipe, ``-o`` overrides) in
:mod:`vlptune.search.plan_file`.

The fidelity of a trial is its training step: ``train.max_steps`` of the
resolved base recipe is the maximum fidelity; the loop reports ``step`` with
its metrics at every evaluation, which is what the schedulers act on.
"""

from __future__ import annotations

import copy
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from vlptune.config import (
    ConfigError,
    Recipe,
    field_at,
    format_validation_error,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    validate_recipe,
)
from vlptune.config import objectives as objective_configs
from vlptune.config.downstream import DOWNSTREAM_PREFIX, is_combined, task_of_metric
from vlptune.search.params import (
    SCHEDULER_SETTINGS,
    SEARCHER_SETTINGS,
    FailuresSpec,
    Param,
    SchedulerSpec,
    SearcherSpec,
    SpaceFile,
    check_param_range,
    parse_param,
)
from vlptune.search.plan_file import describe_failures, describe_fixed, describe_header, resolve_base, split_overrides
from vlptune.search.when import WhenError

FIDELITY_PATH = "train.max_steps"
TIME_ATTR = "step"  # the loop reports this with every evaluation

# Space-level keys that `-o key=value` may override; any other override is a recipe field.
SPACE_OVERRIDE_KEYS = (
    "num_samples",
    "max_concurrent",
    "metric",
    "mode",
    "prune_metric",
    "prune_mode",
    "finetune_parallel",
    "scheduler",
    "searcher",
    "failures",
    "storage",
)

# What the scheduler prunes on (and Ray Train ranks a trial's pretraining checkpoints by) when the
# searched metric is a downstream one, reported only once a trial has pretrained and finetuned.
DEFAULT_PRUNE_METRIC = "val/loss"
DEFAULT_PRUNE_MODE = "min"


def is_downstream(metric: str | None) -> bool:
    """Is ``metric`` a downstream task's (``downstream/<task>/<metric>``), reported after a trial's finetuning?"""
    return bool(metric) and str(metric).startswith(DOWNSTREAM_PREFIX)


def pruning_metric(metric: str, mode: str, prune_metric: str | None = None, prune_mode: str | None = None) -> tuple[str, str]:
    """The pretraining metric and mode the scheduler compares trials by at its rungs.

    ``prune_metric`` when given (its mode ``prune_mode``, default ``mode``
    when it is the searched metric, else min); else the searched ``metric``
    when it is a pretraining one; else :data:`DEFAULT_PRUNE_METRIC`."""
    if prune_metric:
        return prune_metric, prune_mode or (mode if prune_metric == metric else DEFAULT_PRUNE_MODE)
    if is_downstream(metric):
        return DEFAULT_PRUNE_METRIC, prune_mode or DEFAULT_PRUNE_MODE
    return metric, prune_mode or mode


# ------------------------------------------------------------------ recipe-level checks


def check_objectives(recipe: Recipe) -> None:
    """Let each active objective refuse the recipe (e.g. MVM with the VD off), as the loop will."""
    objective_configs.check_objectives(recipe)


def metric_problem(metric: str, recipe: Recipe) -> str | None:
    """Why a recipe would not report ``metric`` (retrieval needs ITM; val/<obj>_* needs <obj>)."""
    if is_downstream(metric):
        try:
            task_of_metric(metric)
        except ConfigError as exc:
            return f"{exc} (a downstream metric is downstream/<task>/<metric> or downstream/combined/<name>)"
        if is_combined(metric) and not recipe.downstream:
            return f"{metric} combines the results of the tasks in the recipe's downstream: section, and it has none (add e.g. downstream: {{vqa: {{}}, nlvr2: {{}}}})"
        if metric.count("/") != 2:
            return "a downstream metric is downstream/<task>/<metric>, e.g. downstream/vqa/score"
        return None
    if metric.startswith("val/") and recipe.eval.loss_batches == 0 and metric[4:] in ("loss", *(f"{n}_loss" for n in recipe.objectives)):
        return f"{metric} is measured on eval.loss_batches validation batches, and eval.loss_batches is 0 here"
    active = recipe.active_objectives()
    if metric.startswith("retrieval/") and not any(cfg.scores_pairs for cfg in active.values()):
        scorers = objective_configs.pair_scorer_names()
        return (
            f"retrieval is scored by an objective that scores image-text pairs, and {' and '.join(f'objectives.{name}.weight' for name in scorers)} is 0 here"
        )
    if metric.startswith("val/"):
        head = metric[4:].split("_", 1)[0]
        if head in recipe.objectives and head not in active:
            return f"objective {head!r} has weight 0 here, so {metric} is not reported"
    return None


def trial_tasks(recipe: Recipe, metrics: typing.Iterable[str]) -> list[str]:
    """The downstream tasks a trial finetunes on after pretraining: its recipe's ``downstream:`` section, then the tasks of ``metrics``."""
    tasks = list(recipe.downstream)
    for metric in metrics:
        task = task_of_metric(metric) if is_downstream(metric) else None
        if task and task not in tasks:
            tasks.append(task)
    return tasks


# ------------------------------------------------------------------ the space


def _get_dotted(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def recipe_value(data: dict[str, Any], path: str) -> Any:
    """Value of ``path`` in a raw recipe dict, falling back to the schema default."""
    try:
        return _get_dotted(data, path)
    except KeyError:
        pass
    recipe = Recipe.model_validate(data)
    node: Any = recipe
    for part in path.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node.model_dump() if isinstance(node, BaseModel) else node


def find_recipe_value(data: dict[str, Any], path: str, default: Any = None) -> Any:
    """:func:`recipe_value`, or ``default`` when ``path`` names no field of the recipe."""
    try:
        return recipe_value(data, path)
    except (KeyError, AttributeError, TypeError):
        return default


_ABSENT = object()  # find_recipe_value's answer for a path that names no field


def _choice_else_first_corner(param: Param, choice: Any, p: Param) -> Any:
    """``choice`` for ``param``, the first corner of every other parameter."""
    return choice if p is param else p.corners()[0]


@dataclass
class SearchSpace:
    """A validated search space (picklable: it travels to the searcher and the trials)."""

    file: str
    name: str
    description: str
    base_file: str
    base_raw: dict[str, Any]  # base recipe with resources, fixed and -o overrides applied
    metric: str
    mode: str
    num_samples: int
    max_concurrent: int
    scheduler: SchedulerSpec
    searcher: SearcherSpec
    failures: FailuresSpec
    storage: str | None
    params: list[Param]
    fixed: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    prune_metric: str = ""  # the scheduler's metric (pruning_metric(); load_space sets it)
    prune_mode: str = ""
    finetune_parallel: bool = False

    # -------------------------------------------------------------- derived

    def __post_init__(self) -> None:
        if not self.prune_metric:
            self.prune_metric, self.prune_mode = pruning_metric(self.metric, self.mode)

    @property
    def downstream(self) -> bool:
        """Is the searched metric a downstream one (trials pretrain, then finetune)?"""
        return is_downstream(self.metric)

    @property
    def base_recipe(self) -> Recipe:
        return Recipe.model_validate(self.base_raw)

    @property
    def max_fidelity(self) -> int:
        return int(self.base_recipe.train.max_steps)

    @property
    def eval_every(self) -> int:
        return int(self.base_recipe.train.eval_every)

    @property
    def grace_period(self) -> int:
        return int(self.scheduler.grace_period or min(self.eval_every, self.max_fidelity))

    @property
    def has_conditionals(self) -> bool:
        return any(p.when for p in self.params)

    def param(self, path: str) -> Param:
        for p in self.params:
            if p.path == path:
                return p
        raise KeyError(path)

    def grid_size(self) -> int:
        return math.prod(len(p.grid_values()) for p in self.params)

    def asha_rungs(self) -> list[int]:
        """The steps at which ASHA compares trials (as Ray's ASHA computes them)."""
        rf, min_t, max_t = self.scheduler.reduction_factor, self.grace_period, self.max_fidelity
        if max_t <= min_t:
            return [max_t]
        n = int(math.log(max_t / min_t) / math.log(rf) + 1)
        return sorted({int(round(min_t * rf**k)) for k in range(n)} | {max_t})

    def lookup(self, values: dict[str, Any]) -> typing.Callable[[str], Any]:
        """Value of a dotted path: sampled values first, else the resolved base recipe."""

        def get(path: str) -> Any:
            if path in values:
                return values[path]
            value = find_recipe_value(self.base_raw, path, _ABSENT)
            if value is _ABSENT:
                raise WhenError(f"{path!r} is neither a parameter nor a recipe field")
            return value

        return get

    def resolve(self, values: dict[str, Any]) -> dict[str, Any]:
        """The raw recipe dict of a trial: base + sampled values (inactive parameters absent)."""
        raw = copy.deepcopy(self.base_raw)
        for path, value in values.items():
            set_dotted(raw, path.split("."), value, f"{self.file}: parameters.{path}")
        return raw

    def trial_recipe(self, values: dict[str, Any]) -> Recipe:
        return validate_recipe(self.resolve(values), f"{self.file} (trial values {values})")

    def active_values(self, choose: typing.Callable[[Param], Any]) -> dict[str, Any]:
        """Walk the parameters in order; ``choose(param)`` gives a value for each active one.

        An inactive parameter (its ``when`` is false) takes its ``else`` value if
        it has one, and is otherwise left out (the base recipe's value stays).
        """
        values: dict[str, Any] = {}
        for p in self.params:
            if p.active(self.lookup(values)):
                values[p.path] = choose(p)
            elif p.has_otherwise:
                values[p.path] = p.otherwise
        return values

    def corner_values(self) -> list[dict[str, Any]]:
        """The low and high corners, plus every choice of each categorical (others low)."""
        out = [self.active_values(lambda p: p.corners()[0]), self.active_values(lambda p: p.corners()[-1])]
        for q in self.params:
            if q.kind != "categorical":
                continue
            for choice in q.choices[1:-1] if q.choices else []:
                out.append(self.active_values(functools.partial(_choice_else_first_corner, q, choice)))
        unique = []
        for values in out:
            if values not in unique:
                unique.append(values)
        return unique

    # -------------------------------------------------------------- text

    def describe(self) -> str:
        base = self.base_recipe
        res = base.resources
        lines = describe_header("search space", self, base)
        lines += [
            f"  metric: {self.metric} ({self.mode}); fidelity: step, up to train.max_steps = {self.max_fidelity} (evaluation every {self.eval_every})",
        ]
        if self.prune_metric != self.metric:
            lines.append(f"  the scheduler prunes on {self.prune_metric} ({self.prune_mode})")
        tasks = trial_tasks(base, [self.metric])
        if tasks:
            lines.append(
                f"  trials that reach train.max_steps then finetune on {', '.join(tasks)}{' at once' if self.finetune_parallel and len(tasks) > 1 else ''}"
                " (each a Ray Train run) and report the downstream metrics; pruned trials are not finetuned"
            )
        lines += [
            f"  trials: {self.num_samples}, at most {self.max_concurrent} at once; each {res.workers} worker(s) x {res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU",
        ]
        s = self.scheduler
        if s.type == "asha":
            lines.append(
                f"  scheduler: asha (grace_period {self.grace_period}, reduction_factor {s.reduction_factor:g}, brackets {s.brackets}); rungs at steps {self.asha_rungs()}"
            )
        elif s.type == "hyperband":
            lines.append(f"  scheduler: hyperband (max_t {self.max_fidelity}, reduction_factor {s.reduction_factor:g})")
        elif s.type == "median":
            lines.append(
                f"  scheduler: median stopping rule (grace_period {self.grace_period}, min_samples_required {s.min_samples_required}, min_time_slice {s.min_time_slice}, hard_stop {s.hard_stop})"
            )
        else:
            lines.append("  scheduler: fifo (no early stopping)")
        sr = self.searcher
        extra = ""
        if sr.type == "tpe":
            extra = f", multivariate {sr.multivariate}, constant_liar {sr.constant_liar}, group {self.tpe_group}, n_startup_trials {self.n_startup_trials}"
        elif sr.type == "grid":
            extra = f", grid of {self.grid_size()} points"
        lines.append(f"  searcher: optuna {sr.type} (seed {sr.seed}{extra}); study storage: {self.storage or 'sqlite:///EXP_DIR/optuna.db'}")
        lines.append(describe_failures(self.failures))
        width = max((len(p.path) for p in self.params), default=10)
        lines.append(f"  parameters ({len(self.params)}, sampled in this order):")
        for p in self.params:
            base_value = find_recipe_value(self.base_raw, p.path, "(absent)")
            lines.append(f"    {p.path:<{width}}  {p.describe()}   [base: {base_value!r}]")
        lines += describe_fixed(self)
        return "\n".join(lines)

    @property
    def tpe_group(self) -> bool:
        if self.searcher.group is not None:
            return self.searcher.group
        return self.searcher.multivariate and self.has_conditionals

    @property
    def n_startup_trials(self) -> int:
        if self.searcher.n_startup_trials is not None:
            return self.searcher.n_startup_trials
        if self.searcher.type == "cmaes":
            return 1
        return max(1, min(10, self.num_samples // 2))


# ------------------------------------------------------------------ loading


def read_space_document(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    data = read_yaml_mapping(Path(path))
    for text in overrides or []:
        parts, value = parse_override(text)
        set_dotted(data, parts, value, f"override {text!r}")
    return data


def _read_space_file(path: Path, space_overrides: list[str]) -> tuple[SpaceFile, dict[str, Any], list[str]]:
    """Step 1: the file (with its own ``-o`` overrides) validated as a :class:`SpaceFile`.

    Returns the spec, the document and the schema problems. A bad top-level
    key is reported and replaced by a placeholder (or dropped to its default)
    so that the rest of the file is still checked and every problem is listed
    at once; without a usable ``base`` or ``parameters`` it raises at once.
    """
    src = str(path)
    doc = read_space_document(path, space_overrides)
    try:
        return SpaceFile.model_validate(doc), doc, []
    except ValidationError as exc:
        problems = format_validation_error(exc, src, SpaceFile).splitlines()[1:]
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
    if "base" in bad or "parameters" in bad:
        raise ConfigError("\n".join([f"{src}: invalid search space:", *problems]))
    placeholders = {"metric": "metric", "mode": "max"}
    doc = {k: v for k, v in doc.items() if k not in bad}
    doc.update({k: placeholders[k] for k in bad if k in placeholders})
    try:
        spec = SpaceFile.model_validate(doc)
    except ValidationError:
        raise ConfigError("\n".join([f"{src}: invalid search space:", *problems])) from None
    return spec, doc, problems


def _settings_problems(spec: SpaceFile, doc: dict[str, Any]) -> list[str]:
    """Step 2: scheduler / searcher settings that do not apply to the chosen type."""
    problems = []
    for section, settings, allowed_by_type in (("scheduler", doc.get("scheduler"), SCHEDULER_SETTINGS), ("searcher", doc.get("searcher"), SEARCHER_SETTINGS)):
        if isinstance(settings, dict):
            kind = getattr(spec, section).type
            extra = sorted(set(settings) - {"type"} - set(allowed_by_type[kind]))
            if extra:
                problems.append(
                    f"  {section}: {', '.join(extra)} do(es) not apply to {section} type {kind!r}; it takes: {', '.join(allowed_by_type[kind]) or 'no settings'}"
                )
    return problems


def _when_problems(label: str, param: Param, earlier: set[str], later: set[str]) -> list[str]:
    """The names a parameter's ``when:`` reads must be earlier parameters or recipe fields."""
    problems = []
    for name in param.when_names:
        if name == param.path:
            problems.append(f"{label}: when: {param.when!r} refers to the parameter itself")
        elif name in later:
            problems.append(
                f"{label}: when: {param.when!r} refers to {name}, which is defined after it; parameters are sampled in file order, move {name} above"
            )
        elif name not in earlier:
            try:
                field_at(name)
            except ConfigError as exc:
                problems.append(f"{label}: when: {param.when!r}: {name!r} is neither an earlier parameter nor a recipe field ({exc})")
    return problems


def _parse_parameters(spec: SpaceFile, fixed: dict[str, Any]) -> tuple[list[Param], list[str]]:
    """Step 4: each ``parameters:`` entry as a :class:`Param`, checked against its recipe field; with the problems."""
    params: list[Param] = []
    problems: list[str] = []
    if not spec.parameters:
        problems.append("  parameters: empty; give at least one dotted recipe path with a distribution")
    for dotted, pspec in spec.parameters.items():
        label = f"  parameters.{dotted}"
        try:
            field_at(dotted)
        except ConfigError as exc:
            problems.append(f"{label}: {exc}")
            continue
        if dotted == FIDELITY_PATH:
            problems.append(f"{label}: the fidelity (train.max_steps) cannot be searched; set it in fixed:, the scheduler stops trials early")
            continue
        if dotted.startswith("resources."):
            problems.append(f"{label}: resources are per search, not searched; set them in resources:")
            continue
        if dotted in fixed:
            problems.append(f"{label}: also set in fixed/resources/overrides; a path is either searched or fixed")
            continue
        try:
            param = parse_param(dotted, pspec)
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
            continue
        for problem in check_param_range(param):
            problems.append(f"{label}: {problem}")
        earlier = {p.path for p in params}
        later = set(spec.parameters) - earlier - {dotted}
        problems += _when_problems(label, param, earlier, later)
        params.append(param)
    return params, problems


def _searcher_problems(spec: SpaceFile, params: list[Param], base_recipe: Recipe | None) -> list[str]:
    """Step 5: what the searcher and the scheduler need (cmaes installed, a finite grid, a grace period within the fidelity)."""
    problems = []
    if spec.searcher.type == "cmaes":
        try:
            import cmaes  # noqa: F401  # optional package: only checked for, when the cmaes searcher is asked for
        except ImportError:
            problems.append("  searcher.type: cmaes needs the `cmaes` package (pip install cmaes); or use tpe or random")
    if spec.searcher.type == "grid":
        for p in params:
            if p.kind == "loguniform" or (p.kind == "uniform" and not p.step):
                problems.append(f"  parameters.{p.path}: the grid searcher needs a finite set of values; use categorical, int, or uniform with step")
    if base_recipe is not None and spec.scheduler.grace_period is not None and spec.scheduler.grace_period > base_recipe.train.max_steps:
        problems.append(f"  scheduler.grace_period: {spec.scheduler.grace_period} is beyond train.max_steps = {base_recipe.train.max_steps}")
    return problems


def _corner_problems(space: SearchSpace) -> list[str]:
    """Step 7: the corners of the space (:meth:`SearchSpace.corner_values`) must give valid recipes that report the metric."""
    try:
        corners = space.corner_values()
    except WhenError as exc:
        raise ConfigError(f"{space.file}: invalid search space:\n  when: {exc}") from None
    problems: list[str] = []
    for values in corners:
        try:
            recipe = validate_recipe(space.resolve(values), "corner")
            check_objectives(recipe)
        except ConfigError as exc:
            lines = [line.strip() for line in str(exc).splitlines()]
            detail = "; ".join(lines[1:]) if len(lines) > 1 and lines[0].endswith("invalid configuration:") else "; ".join(lines)
            problems.append(f"  corner {values}: {detail}")
            continue
        for name, metric in (("metric", space.metric), ("prune_metric", space.prune_metric)):
            problem = metric_problem(metric, recipe)
            if problem:
                problems.append(f"  corner {values}: {name} {metric!r}: {problem}")
            if name == "metric" and metric == space.prune_metric:
                break
    return problems


def load_space(path: str | Path, overrides: list[str] | None = None, base_raw: dict[str, Any] | None = None) -> SearchSpace:
    """Read, check and resolve a search-space file.

    ``overrides``: ``key=value`` texts; keys starting with one of
    :data:`SPACE_OVERRIDE_KEYS` change the space (``num_samples=3``,
    ``scheduler.grace_period=10``), any other is a recipe field applied on top
    of ``fixed``. ``base_raw``: an already resolved base recipe (used on
    resume, from the copy saved in the experiment directory) instead of the
    file's ``base:``.

    The steps: read the file against its schema, check the scheduler/searcher
    settings, resolve the base recipe (:func:`resolve_base`), parse the
    parameters, check what the searcher needs, build the
    :class:`SearchSpace`, check its corners. All problems of the first five
    steps are reported together, then those of the corners.
    """
    path = Path(path)
    src = str(path)
    space_overrides, recipe_overrides = split_overrides(overrides, SPACE_OVERRIDE_KEYS)
    spec, doc, problems = _read_space_file(path, space_overrides)
    problems += _settings_problems(spec, doc)
    # Step 3: the base recipe, with resources, fixed and command-line overrides
    base = resolve_base(src, path.parent, spec.base, spec.resources, spec.fixed, recipe_overrides, base_raw)
    problems += base.problems
    params, param_problems = _parse_parameters(spec, base.fixed)
    problems += param_problems
    problems += _searcher_problems(spec, params, base.recipe)
    if problems:
        raise ConfigError("\n".join([f"{src}: invalid search space:", *problems]))

    # Step 6: the space
    space = SearchSpace(
        file=src,
        name=spec.name or path.stem,
        description=spec.description,
        base_file=base.file,
        base_raw=base.raw,
        metric=spec.metric,
        mode=spec.mode,
        num_samples=spec.num_samples,
        max_concurrent=spec.max_concurrent,
        scheduler=spec.scheduler,
        searcher=spec.searcher,
        failures=spec.failures,
        storage=spec.storage,
        params=params,
        fixed=dict(spec.fixed),
        overrides=list(recipe_overrides),
        finetune_parallel=spec.finetune_parallel,
    )
    space.prune_metric, space.prune_mode = pruning_metric(spec.metric, spec.mode, spec.prune_metric, spec.prune_mode)
    if is_downstream(space.prune_metric):
        raise ConfigError(
            f"{src}: invalid search space:\n  prune_metric: {space.prune_metric!r} is a downstream metric; the scheduler prunes on a pretraining one (e.g. val/loss)"
        )
    if spec.searcher.type == "grid" and "num_samples" not in doc:
        space.num_samples = space.grid_size()

    corner_problems = _corner_problems(space)
    if corner_problems:
        raise ConfigError("\n".join([f"{src}: invalid search space: these combinations of values give an invalid recipe:", *corner_problems]))
    return space
