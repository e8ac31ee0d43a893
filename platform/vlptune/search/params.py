"""The schema of a search-space file and its parameters.

* :class:`SpaceFile` and its sections (:class:`SchedulerSpec`,
  :class:`SearcherSpec`, :class:`FailuresSpec`): the top level of the YAML
  file, strict (unknown keys refused), with each setting's range.
* :class:`Param`: one searched recipe field, as :func:`parse_param` reads a
  ``parameters:`` entry (distribution, range, step, ``when:``/``else:``);
  :func:`check_param_range` checks it against its recipe field (type,
  bounds, Literal choices).

:func:`vlptune.search.space.load_space` puts these together.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlptune.config import ConfigError, describe_field, field_adapter, field_at, field_bounds
from vlptune.search.when import WhenError, eval_when, parse_when

DISTRIBUTIONS = ("categorical", "int", "uniform", "loguniform")
SCHEDULERS = ("asha", "hyperband", "median", "fifo")
SEARCHERS = ("tpe", "random", "grid", "cmaes")

# Settings each scheduler accepts (besides `type`).
SCHEDULER_SETTINGS: dict[str, tuple[str, ...]] = {
    "asha": ("grace_period", "reduction_factor", "brackets"),
    "hyperband": ("reduction_factor",),
    "median": ("grace_period", "min_samples_required", "min_time_slice", "hard_stop"),
    "fifo": (),
}
SEARCHER_SETTINGS: dict[str, tuple[str, ...]] = {
    "tpe": ("seed", "multivariate", "constant_liar", "group", "n_startup_trials", "repeats", "max_resamples"),
    "random": ("seed", "repeats", "max_resamples"),
    "grid": ("seed",),  # grid points are distinct: no repeats
    "cmaes": ("seed", "sigma0", "n_startup_trials", "restart_strategy", "popsize", "repeats", "max_resamples"),
}


# ------------------------------------------------------------------ file schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    """Early stopping of trials on the fidelity axis (training steps)."""

    type: Literal["asha", "hyperband", "median", "fifo"] = Field(
        "asha", description="asha (default), hyperband, median (median stopping rule) or fifo (no early stopping)"
    )
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
    n_startup_trials: int | None = Field(
        None, ge=0, le=100_000, description="tpe/cmaes: random trials before the model is used (default: tpe min(10, num_samples // 2), cmaes 1)"
    )
    repeats: Literal["reuse", "train"] = Field(
        "reuse",
        description="a sample equal to a trial already finished (all searched values the same): reuse = tell Optuna that trial's outcome "
        "and sample again, no compute spent (training is seeded, so a repeat only costs); train = run it again",
    )
    max_resamples: int = Field(
        20, ge=1, le=10_000, description="repeats: reuse: samples drawn per suggestion before a repeat is trained anyway (a nearly exhausted space)"
    )
    sigma0: float | None = Field(None, gt=0.0, description="cmaes: initial step size")
    restart_strategy: Literal["ipop", "bipop"] | None = Field(None, description="cmaes: restart strategy")
    popsize: int | None = Field(None, ge=2, description="cmaes: population size")


class FailuresSpec(_Strict):
    """Fault tolerance."""

    max_failures: int = Field(
        2, ge=-1, le=1000, description="worker-group restarts of one trial, each from its last checkpoint (Ray Train FailureConfig); -1 = unlimited"
    )
    trial_max_failures: int = Field(
        0, ge=-1, le=1000, description="Tune-level restarts of a failed trial (its trainer resumes from the last checkpoint); -1 = unlimited"
    )


class SpaceFile(_Strict):
    """The top level of a search-space file."""

    name: str | None = Field(None, min_length=1, description="experiment name prefix (default: the file name)")
    description: str = Field("", description="free text, shown by `vlptune space check`")
    base: str = Field(..., min_length=1, description="the recipe every trial starts from (path relative to this file)")
    metric: str = Field(..., min_length=1, description="metric the searcher optimises and the scheduler compares, as reported by the loop")
    mode: Literal["min", "max"] = Field(..., description="minimise or maximise the metric")
    prune_metric: str | None = Field(
        None,
        min_length=1,
        description="pretraining metric the scheduler prunes on at its rungs; default: metric, or val/loss when metric is a downstream/... one",
    )
    prune_mode: Literal["min", "max"] | None = Field(None, description="minimise or maximise prune_metric; default: mode, or min for the val/loss default")
    finetune_parallel: bool = Field(
        False, description="trials that finetune on several downstream tasks run them at once, as separate Ray Train runs (needs room for them)"
    )
    num_samples: int = Field(8, ge=1, le=1_000_000, description="trials to run (grid: at most the grid size; default for grid: the grid size)")
    max_concurrent: int = Field(2, ge=1, le=10_000, description="trials running at once (also bounded by the cluster's CPUs/GPUs)")
    resources: dict[str, Any] = Field(
        default_factory=dict, description="recipe.resources for each trial: workers, cpus_per_worker, gpus_per_worker, torch_threads"
    )
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
        return [json.dumps(c) for c in self.choices or []] if self.encoded_choices else list(self.choices or [])

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded_choices else value

    def grid_values(self) -> list[Any]:
        """Every value of the parameter, for the grid searcher."""
        if self.kind == "categorical":
            return self.optuna_choices()
        assert self.low is not None and self.high is not None  # parse_param gives every numeric parameter its bounds
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
    assert low is not None and high is not None  # parse_param gives every numeric parameter its bounds
    if "ge" in b and low < b["ge"]:
        problems.append(f"low {low} is below the field's minimum; allowed: {allowed}")
    if "gt" in b and low <= b["gt"]:
        problems.append(f"low {low} must be above {b['gt']}; allowed: {allowed}")
    if "le" in b and high > b["le"]:
        problems.append(f"high {high} is above the field's maximum; allowed: {allowed}")
    if "lt" in b and high >= b["lt"]:
        problems.append(f"high {high} must be below {b['lt']}; allowed: {allowed}")
    return problems
