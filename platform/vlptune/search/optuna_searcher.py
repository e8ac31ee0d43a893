"""A Ray Tune searcher that drives an Optuna study with ask-and-tell.

Why our own and not ``ray.tune.search.optuna.OptunaSearch``: a trial the
scheduler stops early must reach Optuna as PRUNED, with the intermediate
values it reported, never as COMPLETE with its last value (OptunaSearch tells
every trial stopped without an error as complete); and parameters that depend
on one another (``when:``) need define-by-run sampling.

* ``suggest``: ``study.ask()``, then each parameter of the space in file
  order, skipping those whose ``when:`` is false (define-by-run, so TPE's
  ``group`` option models conditional parameters properly).
  A sample equal to a finished trial's is told that trial's outcome and drawn
  again (``searcher.repeats: reuse``, the default): a repeat of a seeded run
  costs compute and tells nothing new.
* ``on_trial_result``: ``trial.report(metric, step)`` at each evaluation.
* ``on_trial_complete``: COMPLETE with the final metric when the trial reached
  the maximum fidelity (``train.max_steps``); PRUNED when it was stopped
  before (the last reported value is Optuna's value of a pruned trial); FAIL
  on an error, a non-finite metric, or a loop that stopped itself (its
  ``stop_reason``, kept as a user attribute).

The study lives in an RDB storage (SQLite in the experiment directory by
default), so ``optuna-dashboard sqlite:///EXP_DIR/optuna.db`` opens it and a
resumed experiment keeps its history. ``save``/``restore`` keep the mapping
of Tune trials to Optuna trials as plain JSON (``searcher-state-*.pkl`` is
Tune's file name; its content is JSON, never unpickled). The sampler is not
saved: the study is the source of truth, and a restored searcher builds its
sampler afresh from the space (:func:`resumed_sampler`: TPE and CMA-ES learn
from the study's trials; the seed is advanced by the number of trials the
study holds, so a resumed search does not repeat its first samples).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from vlptune.io import finite
from vlptune.search.layout import REPEAT_ATTR
from vlptune.search.space import TIME_ATTR, Param, SearchSpace, is_downstream

log = logging.getLogger(__name__)

RAY_TRIAL_ATTR = "ray_trial_id"
STOP_REASON_ATTR = "stop_reason"
FIDELITY_ATTR = "fidelity"
OUTCOME_ATTR = "outcome"  # completed | pruned | failed | nan | error | lost | repeat of N

# Saved storage URL -> where that study is now. A searcher restored from Tune's state names
# the SQLite file where the experiment first ran; a resumed experiment whose directory (or,
# for a URI experiment, whose local mirror) is elsewhere now registers the new place here.
STORAGE_RELOCATIONS: dict[str, str] = {}


SEED_MODULUS = 2**32  # Optuna's samplers take a seed in [0, 2**32)
STATE_VERSION = 1  # the searcher state's JSON layout


def make_sampler(space: SearchSpace, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The space's sampler; ``seed_offset`` advances a set seed (see :func:`resumed_sampler`)."""
    s = (
        space.searcher.model_copy(update={"seed": (space.searcher.seed + seed_offset) % SEED_MODULUS})
        if space.searcher.seed is not None and seed_offset
        else space.searcher
    )
    if s.type == "tpe":
        with warnings.catch_warnings():  # `group` is marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=s.seed,
                multivariate=s.multivariate,
                group=space.tpe_group,
                constant_liar=s.constant_liar,
                n_startup_trials=space.n_startup_trials,
            )
    if s.type == "cmaes":
        kwargs: dict[str, Any] = {"seed": s.seed, "n_startup_trials": space.n_startup_trials}
        if s.sigma0 is not None:
            kwargs["sigma0"] = s.sigma0
        if s.restart_strategy is not None:
            kwargs["restart_strategy"] = s.restart_strategy
        if s.popsize is not None:
            kwargs["popsize"] = s.popsize
        return optuna.samplers.CmaEsSampler(**kwargs)
    # random, and grid (whose points are enqueued, see grid_points)
    return optuna.samplers.RandomSampler(seed=s.seed)


def resumed_sampler(space: SearchSpace, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The sampler of a restored searcher: built from the space, its seed advanced by the study's trial count.

    Nothing of the old sampler is read back (it would have to be unpickled):
    TPE and CMA-ES model the study's stored trials, random sampling needs only
    a fresh seed, and grid points are the study's WAITING trials.
    """
    return make_sampler(space, seed_offset=trials_so_far)


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Every distinct combination of the active parameters' values, shuffled by the seed.

    Conditional parameters take part only where their ``when:`` holds, so a
    grid over ``vd.size in [0, 64]`` x ``mvm.weight in [0.5, 1]`` (when
    vd.size > 0) has 3 points, not 4.
    """
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    grids = [p.grid_values() for p in space.params]
    for combo in itertools.product(*grids):
        chosen = dict(zip((p.path for p in space.params), combo))
        values: dict[str, Any] = {}
        for p in space.params:
            if p.active(space.lookup({k: space.param(k).decode(v) for k, v in values.items()})):
                values[p.path] = chosen[p.path]
        key = repr(sorted(values.items()))
        if key not in seen:
            seen.add(key)
            points.append(values)
    random.Random(space.searcher.seed).shuffle(points)
    return points


def suggest_value(trial: optuna.Trial, p: Param) -> Any:
    if p.kind == "categorical":
        return p.decode(trial.suggest_categorical(p.path, p.optuna_choices()))
    assert p.low is not None and p.high is not None  # load_space gives every numeric parameter its bounds
    if p.kind == "int":
        return trial.suggest_int(p.path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    if p.kind == "uniform":
        return trial.suggest_float(p.path, float(p.low), float(p.high), step=float(p.step) if p.step else None)
    return trial.suggest_float(p.path, float(p.low), float(p.high), log=True)


def sample(space: SearchSpace, trial: optuna.Trial) -> dict[str, Any]:
    """Define-by-run: suggest each active parameter in file order."""
    return space.active_values(lambda p: suggest_value(trial, p))


class OptunaSearcher(Searcher):
    """Ray Tune searcher over a :class:`SearchSpace`, backed by an Optuna study in ``storage_url``."""

    def __init__(self, space: SearchSpace, storage_url: str, study_name: str):
        super().__init__(metric=space.metric, mode=space.mode)
        self.space = space
        self.storage_url = storage_url
        self.study_name = study_name
        self._sampler: optuna.samplers.BaseSampler = make_sampler(space)
        self._study: optuna.Study | None = None
        self._live: dict[str, int] = {}  # Tune trial id -> Optuna storage trial id (running trials)
        self._last_step: dict[str, int] = {}  # Tune trial id -> last step reported to Optuna
        self._suggested = 0
        self._grid_enqueued = False

    # ------------------------------------------------------------ study

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            direction = "maximize" if self.space.mode == "max" else "minimize"
            self._study = optuna.create_study(
                storage=self.storage_url,
                study_name=self.study_name,
                sampler=self._sampler,
                pruner=optuna.pruners.NopPruner(),  # the Tune scheduler decides; Optuna records
                direction=direction,
                load_if_exists=True,
            )
            if self._study.direction != optuna.study.StudyDirection[direction.upper()]:
                raise ValueError(f"study {self.study_name!r} in {self.storage_url} has direction {self._study.direction.name}, the space asks for {direction}")
            self._study.set_user_attr("metric", self.space.metric)
            self._study.set_user_attr("space_file", self.space.file)
            self._study.set_user_attr("max_fidelity", self.space.max_fidelity)
            if self.space.searcher.type == "grid" and not self._grid_enqueued:
                self._enqueue_grid()
        return self._study

    def _enqueue_grid(self) -> None:
        study = self._study
        assert study is not None  # called by the study property once it exists
        if len(study.get_trials(deepcopy=False)) == 0:
            for point in grid_points(self.space)[: self.space.num_samples]:
                study.enqueue_trial(point, skip_if_exists=False)
        self._grid_enqueued = True

    def _trial(self, storage_id: int) -> optuna.Trial:
        return optuna.Trial(self.study, storage_id)

    def _find(self, trial_id: str) -> int | None:
        """Storage id of the Optuna trial of a Tune trial (from the map or the study's user attributes)."""
        if trial_id in self._live:
            return self._live[trial_id]
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.user_attrs.get(RAY_TRIAL_ATTR) == trial_id:
                self._live[trial_id] = frozen._trial_id
                steps = frozen.intermediate_values
                self._last_step[trial_id] = max(steps) if steps else -1
                return frozen._trial_id
        return None

    # ------------------------------------------------------------ Searcher API

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if metric not in (None, self.space.metric) or mode not in (None, self.space.mode):
            raise ValueError(f"the searcher optimises {self.space.metric} ({self.space.mode}); Tune asked for {metric} ({mode})")
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        study = self.study
        if self.space.searcher.type == "grid":
            waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not waiting:
                return Searcher.FINISHED
        trial, values = self._ask_new(study)
        trial.set_user_attr(RAY_TRIAL_ATTR, trial_id)
        self._live[trial_id] = trial._trial_id
        self._last_step[trial_id] = -1
        self._suggested += 1
        log.info("trial %s = optuna trial %d: %s", trial_id, trial.number, values)
        return dict(values)

    def _ask_new(self, study: optuna.Study) -> tuple[optuna.Trial, dict[str, Any]]:
        """A sample to train: with ``searcher.repeats: reuse``, one that no finished trial holds.

        A sample equal to a finished trial's (every searched value the same) is told that trial's
        outcome at once (COMPLETE with its value, or PRUNED with its reports: what training it
        again would give, since training is seeded) with the user attribute ``repeat_of``, so the
        sampler learns from it without compute, and another is drawn, up to
        ``searcher.max_resamples`` times; then the last repeat is trained (a nearly exhausted space).
        Grid points are distinct already."""
        cfg = self.space.searcher
        for attempt in range(1, cfg.max_resamples + 1):
            trial = study.ask()
            values = sample(self.space, trial)
            if cfg.repeats == "train" or cfg.type == "grid":
                return trial, values
            same = self._finished_with(study, trial)
            if same is None:
                return trial, values
            if attempt == cfg.max_resamples:
                log.info("optuna trial %d repeats trial %d, and %d samples in a row did: trained again", trial.number, same.number, attempt)
                return trial, values
            trial.set_user_attr(REPEAT_ATTR, same.number)
            trial.set_user_attr(OUTCOME_ATTR, f"repeat of {same.number}")
            if same.state is TrialState.COMPLETE:
                study.tell(trial, values=same.value, state=TrialState.COMPLETE)
            else:
                for step, value in sorted(same.intermediate_values.items()):
                    trial.report(value, step)
                study.tell(trial, state=TrialState.PRUNED)
            log.info("optuna trial %d repeats finished trial %d (%s): told its outcome, sampled again", trial.number, same.number, same.state.name)
        raise AssertionError("unreachable: the loop returns by its last attempt")

    @staticmethod
    def _finished_with(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
        """The first trial that finished (COMPLETE or PRUNED, never a repeat itself) with ``trial``'s values."""
        params = study._storage.get_trial(trial._trial_id).params
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if frozen.params == params and REPEAT_ATTR not in frozen.user_attrs:
                return frozen
        return None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        storage_id = self._find(trial_id)
        if storage_id is None:
            return
        self._report(trial_id, storage_id, result)

    def _report(self, trial_id: str, storage_id: int, result: dict[str, Any]) -> None:
        step, value = result.get(TIME_ATTR), result.get(self.space.metric)
        if not finite(value) or not isinstance(step, (int, float)):
            return
        step = int(step)
        if step <= self._last_step.get(trial_id, -1):
            return  # a restarted trial re-reporting from its checkpoint
        self._trial(storage_id).report(float(value), step)
        self._last_step[trial_id] = step

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        storage_id = self._find(trial_id)
        if storage_id is None:
            return
        trial = self._trial(storage_id)
        if self.study._storage.get_trial(storage_id).state.is_finished():
            # told already: a resumed experiment whose study (uploaded after every trial) is
            # newer than Tune's saved state, which runs the trial's end once more
            self._live.pop(trial_id, None)
            self._last_step.pop(trial_id, None)
            log.info("trial %s: optuna trial already finished; kept as it was told", trial_id)
            return
        state, value, outcome = self.classify(result, error)
        if result is not None and state is not TrialState.FAIL:
            # Tune does not pass the result that made the scheduler stop a trial to
            # on_trial_result: report it here, so it is the pruned trial's last value.
            self._report(trial_id, storage_id, result)
        if result is not None:
            if isinstance(result.get(TIME_ATTR), (int, float)):
                trial.set_user_attr(FIDELITY_ATTR, int(result[TIME_ATTR]))
            if result.get("stop_reason"):
                trial.set_user_attr(STOP_REASON_ATTR, str(result["stop_reason"]))
        trial.set_user_attr(OUTCOME_ATTR, outcome)
        self.study.tell(trial, values=value if state is TrialState.COMPLETE else None, state=state, skip_if_finished=True)
        self._live.pop(trial_id, None)
        self._last_step.pop(trial_id, None)
        log.info("trial %s -> optuna %s (%s)", trial_id, state.name, outcome)

    def classify(self, result: dict[str, Any] | None, error: bool) -> tuple[TrialState, float | None, str]:
        """(Optuna state, value, outcome) of a finished Tune trial."""
        if error:
            return TrialState.FAIL, None, "error"
        if not result:
            return TrialState.FAIL, None, "no result"
        value = result.get(self.space.metric)
        step = result.get(TIME_ATTR)
        stop_reason = result.get("stop_reason")
        if stop_reason and stop_reason != "max_steps":
            return TrialState.FAIL, None, f"stopped: {stop_reason}"
        reached = isinstance(step, (int, float)) and step >= self.space.max_fidelity
        if not finite(value) and not reached and is_downstream(self.space.metric):
            # a downstream metric is NaN until the trial has pretrained and finetuned: a trial the
            # scheduler stopped before its last step was pruned, not diverged
            return TrialState.PRUNED, None, "pruned"
        if not finite(value):
            return TrialState.FAIL, None, "nan" if value is not None else "no metric"
        if reached:
            return TrialState.COMPLETE, float(value), "completed"
        return TrialState.PRUNED, None, "pruned"

    # ------------------------------------------------------------ persistence

    def get_state(self) -> dict[str, Any]:
        """The searcher's own state, plain JSON values only (the sampler is rebuilt, not saved)."""
        return {
            "version": STATE_VERSION,
            "storage_url": self.storage_url,
            "study_name": self.study_name,
            "live": dict(self._live),
            "last_step": dict(self._last_step),
            "suggested": self._suggested,
            "grid_enqueued": self._grid_enqueued,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"searcher state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        self.storage_url = STORAGE_RELOCATIONS.get(state["storage_url"], state["storage_url"])
        self.study_name = state["study_name"]
        self._live = {str(k): int(v) for k, v in state["live"].items()}
        self._last_step = {str(k): int(v) for k, v in state["last_step"].items()}
        self._suggested = int(state["suggested"])
        self._grid_enqueued = bool(state["grid_enqueued"])
        self._study = None
        self._sampler = resumed_sampler(self.space, len(self.study.get_trials(deepcopy=False)))
        self._study = None  # reopened with the new sampler
        self._fail_lost_trials()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))

    def _fail_lost_trials(self) -> None:
        """Optuna trials left RUNNING by an interrupted driver whose Tune trial was never recorded."""
        known = set(self._live.values())
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                trial = self._trial(frozen._trial_id)
                trial.set_user_attr(OUTCOME_ATTR, "lost")
                self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                log.warning("optuna trial %d was running when the driver stopped and is not in the restored experiment: told FAIL", frozen.number)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_study"] = None  # holds a database connection; reopened on use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
