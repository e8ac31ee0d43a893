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
parameter and what is allowed (:class:`~vlptune.config.ConfigError`).

The fidelity of a trial is its training step: ``train.max_steps`` of the
resolved base recipe is the maximum fidelity; the loop reports ``step`` with
its metrics at every evaluation, which is what the schedulers act on.
"""

from __future__ import annotations

import copy
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlptune.config import (
    ConfigError,
    Recipe,
    describe_field,
    field_adapter,
    field_at,
    field_bounds,
    format_validation_error,
    load_raw_with_sources,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    validate_recipe,
)
from vlptune.config import objectives as objective_configs
from vlptune.errors import did_you_mean
from vlptune.search.when import WhenError, eval_when, parse_when

DISTRIBUTIONS = ("categorical", "int", "uniform", "loguniform")
SCHEDULERS = ("asha", "hyperband", "median", "fifo")
SEARCHERS = ("tpe", "random", "grid", "cmaes")
FIDELITY_PATH = "train.max_steps"
TIME_ATTR = "step"  # the loop reports this with every evaluation

# Space-level keys that `-o key=value` may override; any other override is a recipe field.
SPACE_OVERRIDE_KEYS = ("num_samples", "max_concurrent", "metric", "mode", "scheduler", "searcher", "failures", "storage")

# Settings each scheduler accepts (besides `type`).
SCHEDULER_SETTINGS: dict[str, tuple[str, ...]] = {
    "asha": ("grace_period", "reduction_factor", "brackets"),
    "hyperband": ("reduction_factor",),
    "median": ("grace_period", "min_samples_required", "min_time_slice", "hard_stop"),
    "fifo": (),
}
SEARCHER_SETTINGS: dict[str, tuple[str, ...]] = {
    "tpe": ("seed", "multivariate", "constant_liar", "group", "n_startup_trials"),
    "random": ("seed",),
    "grid": ("seed",),
    "cmaes": ("seed", "sigma0", "n_startup_trials", "restart_strategy", "popsize"),
}


# ------------------------------------------------------------------ file schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    """Early stopping of trials on the fidelity axis (training steps)."""

    type: Literal["asha", "hyperband", "median", "fifo"] = Field("asha", description="asha (default), hyperband, median (median stopping rule) or fifo (no early stopping)")
    grace_period: int | None = Field(None, ge=1, description="asha/median: steps before a trial can be stopped; default train.eval_every (the first report)")
    reduction_factor: float = Field(2.0, gt=1.0, le=100.0, description="asha/hyperband: 1/reduction_factor of the trials go on at each rung")
    brackets: int = Field(1, ge=1, le=16, description="asha: number of brackets (1 = plain ASHA, more = asynchronous hyperband)")
    min_samples_required: int = Field(3, ge=1, le=10_000, description="median: completed results needed before stopping anyone")
    min_time_slice: int = Field(0, ge=0, description="median: minimum steps between two stopping decisions of a trial")
    hard_stop: bool = Field(True, description="median: stop (true) or pause (false) a trial below the median")


class SearcherSpec(_Strict):
    """The Optuna sampler behind the searcher."""

    type: Literal["tpe", "random", "grid", "cmaes"] = Field("tpe", description="tpe (default), random, grid or cmaes (all Optuna samplers)")
    seed: int | None = Field(0, ge=0, le=2**31 - 1, description="sampler seed (null: not seeded)")
    multivariate: bool = Field(True, description="tpe: model the parameters jointly")
    constant_liar: bool = Field(True, description="tpe: treat running trials as bad so parallel trials spread out")
    group: bool | None = Field(None, description="tpe: split conditional parameters into groups (default: on when multivariate and a parameter has when:)")
    n_startup_trials: int | None = Field(None, ge=0, le=100_000, description="tpe/cmaes: random trials before the model is used (default: tpe min(10, num_samples // 2), cmaes 1)")
    sigma0: float | None = Field(None, gt=0.0, description="cmaes: initial step size")
    restart_strategy: Literal["ipop", "bipop"] | None = Field(None, description="cmaes: restart strategy")
    popsize: int | None = Field(None, ge=2, description="cmaes: population size")


class FailuresSpec(_Strict):
    """Fault tolerance."""

    max_failures: int = Field(2, ge=-1, le=1000, description="worker-group restarts of one trial, each from its last checkpoint (Ray Train FailureConfig); -1 = unlimited")
    trial_max_failures: int = Field(0, ge=-1, le=1000, description="Tune-level restarts of a failed trial (its trainer resumes from the last checkpoint); -1 = unlimited")


class SpaceFile(_Strict):
    """The top level of a search-space file."""

    name: str | None = Field(None, min_length=1, description="experiment name prefix (default: the file name)")
    description: str = Field("", description="free text, shown by `vlptune space check`")
    base: str = Field(..., min_length=1, description="the recipe every trial starts from (path relative to this file)")
    metric: str = Field(..., min_length=1, description="metric the searcher optimises and the scheduler compares, as reported by the loop")
    mode: Literal["min", "max"] = Field(..., description="minimise or maximise the metric")
    num_samples: int = Field(8, ge=1, le=1_000_000, description="trials to run (grid: at most the grid size; default for grid: the grid size)")
    max_concurrent: int = Field(2, ge=1, le=10_000, description="trials running at once (also bounded by the cluster's CPUs/GPUs)")
    resources: dict[str, Any] = Field(default_factory=dict, description="recipe.resources for each trial: workers, cpus_per_worker, gpus_per_worker, torch_threads")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    searcher: SearcherSpec = Field(default_factory=SearcherSpec)
    failures: FailuresSpec = Field(default_factory=FailuresSpec)
    storage: str | None = Field(None, min_length=1, description="Optuna storage URL (default: sqlite:///EXP_DIR/optuna.db)")
    fixed: dict[str, Any] = Field(default_factory=dict, description="dotted recipe path -> value, applied to every trial")
    parameters: dict[str, Any] = Field(..., description="dotted recipe path -> distribution, in sampling order")


# ------------------------------------------------------------------ parameters


@dataclass
class Param:
    """One searched recipe field."""

    path: str
    kind: str  # categorical | int | uniform | loguniform
    low: float | int | None = None
    high: float | int | None = None
    choices: list[Any] | None = None
    step: float | int | None = None
    log: bool = False
    when: str | None = None
    when_names: list[str] = field(default_factory=list)
    otherwise: Any = None  # `else:` value set when `when` is false (None: keep the base recipe's value)
    has_otherwise: bool = False

    def __post_init__(self) -> None:
        self._tree = parse_when(self.when)[0] if self.when else None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_tree", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tree = parse_when(self.when)[0] if self.when else None

    def active(self, lookup: typing.Callable[[str], Any]) -> bool:
        return True if self._tree is None else bool(eval_when(self._tree, lookup))

    @property
    def encoded_choices(self) -> bool:
        """Optuna categoricals hold None/bool/int/float/str only: others travel as JSON strings."""
        return self.kind == "categorical" and any(not isinstance(c, (type(None), bool, int, float, str)) for c in self.choices or [])

    def optuna_choices(self) -> list[Any]:
        return [json.dumps(c) for c in self.choices] if self.encoded_choices else list(self.choices or [])

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded_choices else value

    def grid_values(self) -> list[Any]:
        """Every value of the parameter, for the grid searcher."""
        if self.kind == "categorical":
            return self.optuna_choices()
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "uniform" and self.step:
            n = int(round((self.high - self.low) / self.step))
            return [float(round(self.low + i * self.step, 12)) for i in range(n + 1)]
        raise ConfigError(f"parameters.{self.path}: the grid searcher needs a finite set of values (categorical, int, or uniform with step)")

    def corners(self) -> list[Any]:
        """Extreme values (every choice of a categorical)."""
        if self.kind == "categorical":
            return list(self.choices or [])
        return [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "categorical":
            text = f"categorical {self.choices}"
        else:
            text = f"{self.kind} [{self.low}, {self.high}]"
            if self.step:
                text += f" step {self.step}"
            if self.log and self.kind == "int":
                text += " log"
        if self.when:
            text += f"  when {self.when}"
            if self.has_otherwise:
                text += f", else {self.otherwise!r}"
        return text


def _number(value: Any, what: str, integer: bool = False) -> float | int:
    """YAML numbers (PyYAML reads 1e-4 as a string: accept it)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{what}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def parse_param(path: str, spec: Any) -> Param:
    """A ``parameters:`` entry -> :class:`Param` (shape only; ranges are checked against the schema later)."""
    if not isinstance(spec, dict):
        raise ValueError(f"expected a mapping with one of {', '.join(DISTRIBUTIONS)}, e.g. {{uniform: [0.0, 1.0]}}; got {spec!r}")
    kinds = [k for k in DISTRIBUTIONS if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"give exactly one distribution of {', '.join(DISTRIBUTIONS)}; got {sorted(spec) or 'none'}")
    kind = kinds[0]
    unknown = sorted(set(spec) - {kind, "step", "log", "when", "else"})
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {kind}, step, log (int), when, else")
    when = spec.get("when")
    if "else" in spec and when is None:
        raise ValueError("else: only with when: (the value used when the condition is false)")
    otherwise = {"otherwise": spec["else"], "has_otherwise": True} if "else" in spec else {}
    when_names: list[str] = []
    if when is not None:
        try:
            _, when_names = parse_when(when)
        except WhenError as exc:
            raise ValueError(f"when: {when!r}: {exc}") from None
    args = spec[kind]
    if kind == "categorical":
        if "step" in spec or "log" in spec:
            raise ValueError("categorical takes no step or log")
        if not isinstance(args, list) or not args:
            raise ValueError(f"categorical: expected a non-empty list of choices, got {args!r}")
        keys = [json.dumps(c, sort_keys=True, default=str) for c in args]
        if len(set(keys)) != len(keys):
            raise ValueError(f"categorical: duplicate choices in {args!r}")
        return Param(path, kind, choices=list(args), when=when, when_names=when_names, **otherwise)
    if not isinstance(args, list) or len(args) != 2:
        raise ValueError(f"{kind}: expected [low, high], got {args!r}")
    integer = kind == "int"
    low = _number(args[0], f"{kind} low", integer)
    high = _number(args[1], f"{kind} high", integer)
    if not low < high:
        raise ValueError(f"{kind}: low ({low}) must be below high ({high})")
    step = spec.get("step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"log: expected true or false, got {log!r}")
    if log and kind != "int":
        raise ValueError("log: only for int (use loguniform for floats)")
    if step is not None:
        if kind == "loguniform":
            raise ValueError("loguniform takes no step")
        step = _number(step, "step", integer)
        if step <= 0:
            raise ValueError(f"step: must be positive, got {step}")
        if log and step != 1:
            raise ValueError("int with log: step must be 1 (Optuna)")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"step {step} does not divide [{low}, {high}]: high must be low + k*step")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform: low must be positive, got {low}")
    if log and low <= 0:
        raise ValueError(f"int with log: low must be positive, got {low}")
    return Param(path, kind, low=low, high=high, step=step, log=log, when=when, when_names=when_names, **otherwise)


# ------------------------------------------------------------------ range checks


def check_param_range(param: Param) -> list[str]:
    """Problems of ``param`` against its recipe field (type, bounds, Literal choices)."""
    model, name = field_at(param.path)
    info = model.model_fields[name]
    ann = info.annotation
    allowed = describe_field(model, name)
    problems = []
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [f"{param.path} is a section, not a value; search one of its fields: {sorted(ann.model_fields)}"]
    if param.has_otherwise:
        try:
            field_adapter(model, name).validate_python(param.otherwise)
        except ValidationError as exc:
            problems.append(f"else: {param.otherwise!r} is not allowed ({exc.errors()[0]['msg']}); allowed: {allowed}")
    if param.kind == "categorical":
        adapter = field_adapter(model, name)
        for choice in param.choices or []:
            try:
                adapter.validate_python(choice)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                problems.append(f"choice {choice!r} is not allowed ({msg}); allowed: {allowed}")
        return problems
    if typing.get_origin(ann) is Literal:
        return [f"{param.kind} cannot search a field with fixed choices; use categorical with some of: {allowed}"]
    if param.kind == "int" and ann is not int:
        hint = "use uniform or loguniform" if ann is float else "use categorical"
        return [f"int distribution on a {getattr(ann, '__name__', ann)} field; {hint} (allowed: {allowed})"]
    if param.kind in ("uniform", "loguniform") and ann is not float:
        hint = "use int" if ann is int else "use categorical"
        return [f"{param.kind} distribution on a {getattr(ann, '__name__', ann)} field; {hint} (allowed: {allowed})"]
    b = field_bounds(info)
    low, high = param.low, param.high
    if "ge" in b and low < b["ge"]:
        problems.append(f"low {low} is below the field's minimum; allowed: {allowed}")
    if "gt" in b and low <= b["gt"]:
        problems.append(f"low {low} must be above {b['gt']}; allowed: {allowed}")
    if "le" in b and high > b["le"]:
        problems.append(f"high {high} is above the field's maximum; allowed: {allowed}")
    if "lt" in b and high >= b["lt"]:
        problems.append(f"high {high} must be below {b['lt']}; allowed: {allowed}")
    return problems


# ------------------------------------------------------------------ recipe-level checks


def check_objectives(recipe: Recipe) -> None:
    """Let each active objective refuse the recipe (e.g. MVM with the VD off), as the loop will."""
    objective_configs.check_objectives(recipe)


def metric_problem(metric: str, recipe: Recipe) -> str | None:
    """Why a recipe would not report ``metric`` (retrieval needs ITM; val/<obj>_* needs <obj>)."""
    active = recipe.active_objectives()
    if metric.startswith("retrieval/") and not any(cfg.scores_pairs for cfg in active.values()):
        scorers = objective_configs.pair_scorer_names()
        return f"retrieval is scored by an objective that scores image-text pairs, and {' and '.join(f'objectives.{name}.weight' for name in scorers)} is 0 here"
    if metric.startswith("val/"):
        head = metric[4:].split("_", 1)[0]
        if head in recipe.objectives and head not in active:
            return f"objective {head!r} has weight 0 here, so {metric} is not reported"
    return None


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


def describe_header(kind: str, plan: Any, base: Recipe) -> list[str]:
    """First lines of a plan file's ``describe()`` (a search space or a study): file, description, name, base recipe (``base``, validated)."""
    lines = [f"{kind} {plan.file}"]
    if plan.description:
        lines.append(f"  {plan.description.strip()}")
    lines += [f"  experiment name: {plan.name}", f"  base recipe: {plan.base_file} (name {base.name!r})"]
    return lines


def describe_failures(failures: "FailuresSpec") -> str:
    return f"  failures: {failures.max_failures} worker-group restart(s) per trial from its last checkpoint, {failures.trial_max_failures} trial restart(s)"


def describe_fixed(plan: Any) -> list[str]:
    """The ``fixed:`` block of a plan's ``describe()``: file-level fixed paths, then command-line overrides."""
    if not (plan.fixed or plan.overrides):
        return []
    lines = ["  fixed:"]
    lines += [f"    {path} = {value!r}" for path, value in plan.fixed.items()]
    lines += [f"    {text}   (command line)" for text in plan.overrides]
    return lines


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

    # -------------------------------------------------------------- derived

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
                out.append(self.active_values(lambda p, q=q, c=choice: c if p is q else p.corners()[0]))
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
            f"  trials: {self.num_samples}, at most {self.max_concurrent} at once; each {res.workers} worker(s) x {res.cpus_per_worker:g} CPU, {res.gpus_per_worker:g} GPU",
        ]
        s = self.scheduler
        if s.type == "asha":
            lines.append(f"  scheduler: asha (grace_period {self.grace_period}, reduction_factor {s.reduction_factor:g}, brackets {s.brackets}); rungs at steps {self.asha_rungs()}")
        elif s.type == "hyperband":
            lines.append(f"  scheduler: hyperband (max_t {self.max_fidelity}, reduction_factor {s.reduction_factor:g})")
        elif s.type == "median":
            lines.append(f"  scheduler: median stopping rule (grace_period {self.grace_period}, min_samples_required {s.min_samples_required}, min_time_slice {s.min_time_slice}, hard_stop {s.hard_stop})")
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


# ------------------------------------------------------------------ the base recipe of a file


@dataclass
class ResolvedBase:
    """The base recipe of a search space or an ablation study, with resources/fixed/overrides applied."""

    file: str  # the recipe file (absolute), or the label given with an already resolved base
    raw: dict[str, Any]
    fixed: dict[str, Any]  # dotted path -> value: resources.*, fixed:, then command-line overrides
    recipe: Recipe | None  # None when it does not validate (then ``problems`` says why)
    problems: list[str]


def resolve_base(
    src: str,
    base_dir: Path,
    base: str,
    resources: dict[str, Any],
    fixed: dict[str, Any],
    recipe_overrides: list[str],
    base_raw: dict[str, Any] | None = None,
) -> ResolvedBase:
    """Read ``base`` (relative to ``base_dir``) and apply ``resources``, ``fixed`` and overrides.

    Problems (unknown paths, a recipe that does not validate) are returned as
    indented lines, so the caller can report them with its own; a missing or
    unreadable base file raises :class:`ConfigError` naming ``src``.
    ``base_raw``: an already resolved base (resume) used as is.
    """
    problems: list[str] = []
    if base_raw is None:
        base_path = (Path(base_dir) / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{src}: base: recipe file not found: {base_path} (the path is relative to {src})")
        base_file = str(base_path)
        try:
            raw, _ = load_raw_with_sources(base_path)
        except ConfigError as exc:
            raise ConfigError(f"{src}: base: {exc}") from None
    else:
        base_file = base
        raw = copy.deepcopy(base_raw)
    if base_raw is None and "objectives" not in raw:
        # Setting objectives.X.* on a base that lists none must not drop the default
        # objectives (a partial dict would replace the schema default entirely).
        raw["objectives"] = copy.deepcopy(Recipe.model_fields["objectives"].default_factory())
    entries: list[tuple[str, str, Any]] = [(f"resources.{key}", f"resources.{key}", value) for key, value in resources.items()]
    entries += [(f"fixed.{dotted}", dotted, value) for dotted, value in fixed.items()]
    for text in recipe_overrides:
        parts, value = parse_override(text)
        entries.append((f"override {text!r}", ".".join(parts), value))
    applied: dict[str, Any] = {}
    for label, dotted, value in entries:
        try:
            field_at(dotted)
        except ConfigError as exc:
            problems.append(f"  {label}: {exc}")
            continue
        applied[dotted] = value
        if base_raw is None:
            set_dotted(raw, dotted.split("."), value, f"{src}: {label}")
    recipe: Recipe | None = None
    try:
        recipe = validate_recipe(raw, f"base recipe {base_file} with resources/fixed/overrides")
    except ConfigError as exc:
        lines = str(exc).splitlines()
        problems.append(f"  {lines[0]}")
        problems += [f"  {line}" for line in lines[1:]]
    return ResolvedBase(base_file, raw, applied, recipe, problems)


# ------------------------------------------------------------------ loading


def split_overrides(overrides: list[str] | None, own_keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """``-o`` overrides split into those of the file itself (top-level key in ``own_keys``) and the recipe's.

    A key that is neither is refused here, with the closest of both as the suggestion.
    """
    keys = set(own_keys)
    own, recipe = [], []
    for text in overrides or []:
        parts, _ = parse_override(text)
        if parts[0] not in keys and parts[0] not in Recipe.model_fields:
            hint = did_you_mean(parts[0], [*keys, *Recipe.model_fields])
            raise ConfigError(f"override {text!r}: {parts[0]!r} is neither a setting of this file ({', '.join(sorted(keys))}) nor a recipe section{hint}")
        (own if parts[0] in keys else recipe).append(text)
    return own, recipe


def read_space_document(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    data = read_yaml_mapping(Path(path))
    for text in overrides or []:
        parts, value = parse_override(text)
        set_dotted(data, parts, value, f"override {text!r}")
    return data


def load_space(path: str | Path, overrides: list[str] | None = None, base_raw: dict[str, Any] | None = None) -> SearchSpace:
    """Read, check and resolve a search-space file.

    ``overrides``: ``key=value`` texts; keys starting with one of
    :data:`SPACE_OVERRIDE_KEYS` change the space (``num_samples=3``,
    ``scheduler.grace_period=10``), any other is a recipe field applied on top
    of ``fixed``. ``base_raw``: an already resolved base recipe (used on
    resume, from the copy saved in the experiment directory) instead of the
    file's ``base:``.
    """
    path = Path(path)
    src = str(path)
    space_overrides, recipe_overrides = split_overrides(overrides, SPACE_OVERRIDE_KEYS)
    doc = read_space_document(path, space_overrides)
    problems: list[str] = []
    try:
        spec = SpaceFile.model_validate(doc)
    except ValidationError as exc:
        # Report these, then go on with the rest of the file (placeholders for
        # the bad top-level keys) so that every problem is listed at once.
        problems += format_validation_error(exc, src, SpaceFile).splitlines()[1:]
        bad = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
        if "base" in bad or "parameters" in bad:
            raise ConfigError("\n".join([f"{src}: invalid search space:", *problems])) from None
        placeholders = {"metric": "metric", "mode": "max"}
        doc = {k: v for k, v in doc.items() if k not in bad}
        doc.update({k: placeholders[k] for k in bad if k in placeholders})
        try:
            spec = SpaceFile.model_validate(doc)
        except ValidationError:
            raise ConfigError("\n".join([f"{src}: invalid search space:", *problems])) from None
    # scheduler / searcher settings that do not apply to the chosen type
    for section, settings, allowed_by_type in (("scheduler", doc.get("scheduler"), SCHEDULER_SETTINGS), ("searcher", doc.get("searcher"), SEARCHER_SETTINGS)):
        if isinstance(settings, dict):
            kind = getattr(spec, section).type
            extra = sorted(set(settings) - {"type"} - set(allowed_by_type[kind]))
            if extra:
                problems.append(f"  {section}: {', '.join(extra)} do(es) not apply to {section} type {kind!r}; it takes: {', '.join(allowed_by_type[kind]) or 'no settings'}")

    # the base recipe, with resources, fixed and command-line overrides
    base = resolve_base(src, path.parent, spec.base, spec.resources, spec.fixed, recipe_overrides, base_raw)
    base_file, raw, fixed, base_recipe = base.file, base.raw, base.fixed, base.recipe
    problems += base.problems

    # parameters
    params: list[Param] = []
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
        for name in param.when_names:
            if name == dotted:
                problems.append(f"{label}: when: {param.when!r} refers to the parameter itself")
            elif name in later:
                problems.append(f"{label}: when: {param.when!r} refers to {name}, which is defined after it; parameters are sampled in file order, move {name} above")
            elif name not in earlier:
                try:
                    field_at(name)
                except ConfigError as exc:
                    problems.append(f"{label}: when: {param.when!r}: {name!r} is neither an earlier parameter nor a recipe field ({exc})")
        params.append(param)
    if spec.searcher.type == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            problems.append("  searcher.type: cmaes needs the `cmaes` package (pip install cmaes); or use tpe or random")
    if spec.searcher.type == "grid":
        for p in params:
            if p.kind == "loguniform" or (p.kind == "uniform" and not p.step):
                problems.append(f"  parameters.{p.path}: the grid searcher needs a finite set of values; use categorical, int, or uniform with step")
    if base_recipe is not None and spec.scheduler.grace_period is not None and spec.scheduler.grace_period > base_recipe.train.max_steps:
        problems.append(f"  scheduler.grace_period: {spec.scheduler.grace_period} is beyond train.max_steps = {base_recipe.train.max_steps}")
    if problems:
        raise ConfigError("\n".join([f"{src}: invalid search space:", *problems]))

    space = SearchSpace(
        file=src,
        name=spec.name or path.stem,
        description=spec.description,
        base_file=base_file,
        base_raw=raw,
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
    )
    if spec.searcher.type == "grid" and "num_samples" not in doc:
        space.num_samples = space.grid_size()

    # corners of the space must give valid recipes
    corner_problems: list[str] = []
    try:
        corners = space.corner_values()
    except WhenError as exc:
        raise ConfigError(f"{src}: invalid search space:\n  when: {exc}") from None
    for values in corners:
        try:
            recipe = validate_recipe(space.resolve(values), "corner")
            check_objectives(recipe)
        except ConfigError as exc:
            lines = [line.strip() for line in str(exc).splitlines()]
            detail = "; ".join(lines[1:]) if len(lines) > 1 and lines[0].endswith("invalid configuration:") else "; ".join(lines)
            corner_problems.append(f"  corner {values}: {detail}")
            continue
        problem = metric_problem(space.metric, recipe)
        if problem:
            corner_problems.append(f"  corner {values}: metric {space.metric!r}: {problem}")
    if corner_problems:
        raise ConfigError("\n".join([f"{src}: invalid search space: these combinations of values give an invalid recipe:", *corner_problems]))
    return space
