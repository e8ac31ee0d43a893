"""Run a search: Ray Tune trials, each a Ray Train run of the one training loop.

Flow: :func:`run_search` validates the space (before anything starts) and
writes the experiment's files (:mod:`vlptune.search.layout`: the directory,
or the driver mirror of a URI experiment); :func:`run_experiment`, the one
code path of searches and ablation studies (:class:`TrialPlan` is what they
differ in), prepares the data once (:mod:`vlptune.search.preflight`),
connects to Ray (:func:`vlptune.cluster.session.connect`: a local in-process
cluster bound to 127.0.0.1 by default, or ``address``), checks the storage,
and runs a Tune ``Tuner`` whose trainable
(:func:`vlptune.search.trainable.make_trainable`) builds a Train V2
``TorchTrainer`` around :func:`vlptune.train.loop.train_worker` and calls
``fit()``. Metrics reach Tune through ``TuneReportCallback``; the scheduler
(:func:`make_scheduler`) acts on ``step``; the searcher is
:class:`~vlptune.search.optuna_searcher.OptunaSearcher`.

Resources: a trial driver reserves no CPU (1 MiB of Ray's ``memory``
resource, which every node has), so on a 2-CPU machine two 1-CPU trials
really run at once; the number of trials at once (:func:`concurrency`) is the
space's ``max_concurrent`` bounded by what the cluster's CPUs and GPUs can hold.

Ray, Tune, Optuna and the Tune callbacks are imported inside the functions
that run the experiment (heavy dependencies kept lazy).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlptune.cluster import session
from vlptune.cluster.session import RAY_ENV, local_session_for
from vlptune.cluster.storage import StorageError
from vlptune.config import Recipe
from vlptune.search.console import LOG_FILE, ConsoleLog, Progress, progress_callback
from vlptune.search.layout import (
    DRIVER_FILES,
    OPTUNA_DB,
    SearchError,
    absolute_paths,
    check_fresh,
    default_exp_dir,
    download_for_resume,
    experiment_location,
    kept_log_path,
    load_experiment_space,
    read_meta,
    study_url,
    write_experiment_files,
)
from vlptune.search.location import ACTIVE_MIRRORS, DriverSync, Location
from vlptune.search.preflight import check_experiment_storage, prepare_recipes_data
from vlptune.search.space import TIME_ATTR, SearchSpace, is_downstream, load_space, pruning_metric
from vlptune.search.trainable import STARTUP_KEY, StartupTimer, make_trainable

log = logging.getLogger(__name__)

DRIVER_MEMORY_BYTES = 2**20  # what a trial driver reserves instead of a CPU (see module docstring)


def connect(address: str | None, **kwargs: Any) -> str | None:
    """:func:`vlptune.cluster.session.connect`, a cluster that cannot be joined reported as a :class:`SearchError`."""
    try:
        return session.connect(address, **kwargs)
    except session.SessionError as exc:
        raise SearchError(str(exc)) from None


# ------------------------------------------------------------------ scheduler


def tune_metric(source: Any) -> tuple[str, str] | None:
    """Tune's top-level (metric, mode) of an experiment: its metric, unless the scheduler prunes on
    another one (``prune_metric``: a search ranked by a downstream metric), then None."""
    prune = getattr(source, "prune_metric", None) or source.metric
    return (source.metric, source.mode) if prune == source.metric and not is_downstream(source.metric) else None


def make_scheduler(space: SearchSpace):
    from ray.tune.schedulers import FIFOScheduler  # heavy dependency kept lazy

    from vlptune.search.schedulers import ASHA, HyperBand, MedianStopping  # imports Ray Tune: kept lazy

    s = space.scheduler
    # pruning on another metric than the searched one (a downstream metric, reported only at a
    # trial's end): the scheduler gets its own, and Tune's top-level metric is left to the searcher
    own = {"metric": space.prune_metric, "mode": space.prune_mode} if tune_metric(space) is None else {}
    if s.type == "asha":
        # stop_last_trials=False: a trial at the last rung ends by itself, so its final
        # evaluation, checkpoint and TensorBoard events are written, never cut off.
        return ASHA(
            **own,
            time_attr=TIME_ATTR,
            max_t=space.max_fidelity,
            grace_period=space.grace_period,
            reduction_factor=s.reduction_factor,
            brackets=s.brackets,
            stop_last_trials=False,
        )
    if s.type == "hyperband":
        return HyperBand(**own, time_attr=TIME_ATTR, max_t=space.max_fidelity, reduction_factor=s.reduction_factor, stop_last_trials=False)
    if s.type == "median":
        return MedianStopping(
            **own,
            time_attr=TIME_ATTR,
            grace_period=space.grace_period,
            min_samples_required=s.min_samples_required,
            min_time_slice=s.min_time_slice,
            hard_stop=s.hard_stop,
        )
    return FIFOScheduler()


def concurrency(space: SearchSpace) -> int:
    """Trials at once: the space's max_concurrent, bounded by the cluster's CPUs/GPUs."""
    import ray  # heavy dependency kept lazy

    res = space.base_recipe.resources
    total = ray.cluster_resources()
    limit = space.max_concurrent
    need_cpu = res.workers * res.cpus_per_worker
    have_cpu = float(total.get("CPU", 0.0))
    if need_cpu > have_cpu + 1e-9:
        raise SearchError(
            f"{space.file}: a trial needs {res.workers} worker(s) x {res.cpus_per_worker:g} CPU = {need_cpu:g} CPUs; the cluster has {have_cpu:g}"
        )
    limit = min(limit, int(have_cpu // need_cpu + 1e-9))
    if res.gpus_per_worker > 0:
        need_gpu = res.workers * res.gpus_per_worker
        have_gpu = float(total.get("GPU", 0.0))
        if need_gpu > have_gpu + 1e-9:
            raise SearchError(
                f"{space.file}: a trial needs {res.workers} worker(s) x {res.gpus_per_worker:g} GPU = {need_gpu:g} GPUs; the cluster has {have_gpu:g}"
            )
        limit = min(limit, int(have_gpu // need_gpu + 1e-9))
    return max(1, limit)


# ------------------------------------------------------------------ the search


def run_search(
    space_file: str | Path | None = None,
    *,
    exp_dir: str | Path | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    overrides: list[str] | None = None,
    address: str | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: int = 0,
    worker_log_level: str = "WARNING",
    worker_fn: Callable | None = None,
    callbacks: list | None = None,
    mirror_dir: str | Path | None = None,
    shared_storage: bool = False,
):
    """Start (or, with ``resume``, continue) a search; returns Tune's ``ResultGrid``.

    ``exp_dir`` / ``storage``: a directory or a URI pyarrow opens (``s3://``,
    ``gs://``, ``file://``...; see :mod:`vlptune.search.location`).
    ``mirror_dir``: root of the local mirrors of URI experiments (default
    :data:`vlptune.search.location.DEFAULT_MIRROR_ROOT`). ``shared_storage``:
    accept a local directory on a multi-node cluster although its filesystem
    is not one known to be shared (the user says every node mounts it).

    ``worker_fn``: the per-worker function, ``train_worker``'s signature
    (tests pass a stand-in); default :func:`vlptune.train.loop.train_worker`.
    """
    fresh = False
    if resume:
        if exp_dir is None:
            raise SearchError("--resume needs the experiment directory")
        loc = experiment_location(exp_dir, mirror_dir)
        if overrides:
            raise SearchError(f"{loc.path}: a resumed experiment keeps its settings; -o is not accepted with --resume")
        if loc.remote:
            download_for_resume(loc)
        exp_dir = loc.local
        meta = read_meta(exp_dir)
        if meta.get("study_file") and study_url(meta, exp_dir) != meta["storage_url"]:
            from vlptune.search.optuna_searcher import STORAGE_RELOCATIONS  # imports optuna and Ray Tune: kept lazy

            # the searcher restored from Tune's state names the study where it was first
            STORAGE_RELOCATIONS[meta["storage_url"]] = study_url(meta, exp_dir)
        space = load_experiment_space(exp_dir)
        if space_file is not None and Path(space_file).resolve() != Path(meta["space_file"]):
            log.warning("resuming %s with its saved space (from %s), not %s", exp_dir, meta["space_file"], space_file)
    else:
        if space_file is None:
            raise SearchError("a search needs a search-space file")
        space = load_space(space_file, overrides)
        loc = experiment_location(exp_dir if exp_dir else default_exp_dir(space, storage, name), mirror_dir)
        exp_dir = loc.local
        check_fresh(loc)
        space.base_raw = absolute_paths(space.base_raw, Path.cwd())
        fresh = True
        meta = write_experiment_files(space, exp_dir, Path(space_file), address, location=loc.path)

    plan = TrialPlan(
        source=space,
        data_recipes=[space.base_recipe],
        tune_settings=lambda: _search_settings(space, meta),
        hparams=[p.path for p in space.params],
    )
    return run_experiment(
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
        shared_storage=shared_storage,
    )


# ------------------------------------------------------------------ one code path for searches and studies


@dataclass
class TrialPlan:
    """What a search and an ablation study differ in; :func:`run_experiment` does the rest.

    ``source``: the validated experiment (a :class:`SearchSpace` or a
    :class:`vlptune.study.ablation.StudySpec`); what is read from it: ``file``,
    ``base_raw``, ``base_recipe``, ``metric``, ``mode``, ``max_concurrent``,
    ``failures``. ``data_recipes``: the recipes whose data must exist before a
    trial starts. ``resolve``: a trial's raw recipe from Tune's config (see
    :func:`make_trainable`; None: the config's keys are dotted recipe paths).
    ``tune_settings()``: ``search_alg``, ``scheduler``, ``num_samples`` and
    optionally ``param_space`` of a fresh experiment (not called on resume:
    Tune restores them). ``hparams``: what the experiment varies, in the order
    the trials' HParams list it (see :func:`make_trainable`; None: the config's keys).
    ``driver_files``: the experiment's own files the driver uploads to a URI
    experiment (with the Optuna study, if any) and a resume downloads.
    """

    source: Any
    data_recipes: list[Recipe]
    tune_settings: Callable[[], dict[str, Any]]
    resolve: Callable[[dict[str, Any], dict[str, Any], str], dict[str, Any]] | None = None
    hparams: list[str] | None = None
    driver_files: tuple[str, ...] = DRIVER_FILES


def _search_settings(space: SearchSpace, meta: dict[str, Any]) -> dict[str, Any]:
    from vlptune.search.optuna_searcher import OptunaSearcher  # imports optuna and Ray Tune: kept lazy

    searcher = OptunaSearcher(space, storage_url=meta["storage_url"], study_name=meta["study_name"])
    _ = searcher.study  # create the study (and fail early on a bad storage URL)
    return {"search_alg": searcher, "scheduler": make_scheduler(space), "num_samples": space.num_samples}


def run_experiment(
    plan: TrialPlan,
    exp_dir: Path,
    *,
    fresh: bool,
    resume: bool,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: int = 0,
    worker_log_level: str = "WARNING",
    worker_fn: Callable | None = None,
    callbacks: list | None = None,
    location: Location | None = None,
    shared_storage: bool = False,
):
    """Prepare the data, connect to Ray, check the storage and run (or restore) the Tune experiment in ``exp_dir``.

    ``fresh``: the caller has just created ``exp_dir``; if the experiment fails
    before Tune saved any state, the directory is removed (its name stays free
    for the next try). ``location``: where the experiment lives (default: the
    directory ``exp_dir``); for a URI experiment ``exp_dir`` is its driver
    mirror. After joining the cluster the storage is checked
    (:func:`check_experiment_storage`): a local directory on a cluster of
    several nodes is refused before any trial starts. Returns Tune's ``ResultGrid``.
    """
    exp_dir = Path(exp_dir)
    console = ConsoleLog(exp_dir / LOG_FILE, quiet=verbose == 0)
    if console.quiet:
        print(f"log: {console.log_path} (Ray, Tune and worker output; --verbose shows it here)", flush=True)
    try:
        with console:
            return _run_logged(
                plan,
                exp_dir,
                console,
                fresh=fresh,
                resume=resume,
                address=address,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                verbose=verbose,
                worker_log_level=worker_log_level,
                worker_fn=worker_fn,
                callbacks=callbacks,
                location=location,
                shared_storage=shared_storage,
            )
    except BaseException:
        if console.quiet:
            kept = _keep_log(console.log_path)
            if kept is not None:
                print(f"the experiment stopped on an error; Ray's and the workers' output: {kept}", file=sys.stderr, flush=True)
        raise


def _keep_log(log_path: Path) -> Path | None:
    """The log of a failed experiment, where it survives: moved next to the directory when the
    directory itself was removed (a fresh experiment that failed before Tune saved its state)."""
    for candidate in (log_path, kept_log_path(log_path.parent)):
        if candidate.is_file():
            return candidate
    return None


def _run_logged(
    plan: TrialPlan,
    exp_dir: Path,
    console,
    *,
    fresh: bool,
    resume: bool,
    address,
    num_cpus,
    num_gpus,
    verbose: int,
    worker_log_level: str,
    worker_fn,
    callbacks,
    location,
    shared_storage: bool,
):

    loc = location or Location(local=Path(exp_dir).resolve())
    local = local_session_for(address)
    sync = None
    try:
        prepare_recipes_data(plan.data_recipes)
        connect(address, num_cpus=num_cpus, num_gpus=num_gpus, worker_log_level=worker_log_level, say=console.say)
        check_experiment_storage(loc, shared_storage)
        # The Tune driver (this process) reads some of these too.
        for key, value in RAY_ENV.items():
            os.environ.setdefault(key, value)
        if loc.remote:
            ACTIVE_MIRRORS[loc.remote_uri] = loc.local
            sync = DriverSync(loc, plan.driver_files, OPTUNA_DB)
            callbacks = [*(callbacks or []), sync.callback()]
        if console.quiet:
            callbacks = [*(callbacks or []), _progress(plan.source, console)]
        grid = _fit(plan, exp_dir, resume, worker_fn, callbacks, verbose, loc)
        if sync is not None:
            try:
                sync.upload(strict=True)
            except StorageError as exc:
                raise SearchError(str(exc)) from None
        return grid
    except BaseException:
        if fresh and not _tune_state_saved(loc):
            _remove_keeping_log(exp_dir, console.log_path if console.quiet else None)
            if sync is not None and sync.uploads:
                _delete_driver_uploads(loc, plan.driver_files)
        elif sync is not None:
            sync.upload()  # what the driver has, best effort (the error raised is the one that matters)
        raise
    finally:
        if loc.remote:
            ACTIVE_MIRRORS.pop(loc.remote_uri, None)
        if local is not None:
            local.close()  # the local cluster this call started ends with it


def _remove_keeping_log(exp_dir: Path, log_path: Path | None) -> None:
    """Remove a fresh experiment that failed before Tune saved its state (its name stays free),
    but keep its log: moved to ``<exp_dir>.log`` beside it."""
    if log_path is not None and log_path.is_file():
        os.replace(log_path, kept_log_path(exp_dir))
    shutil.rmtree(exp_dir, ignore_errors=True)


def _progress(source: Any, console):
    """The progress callback of an experiment: trials to run, the fidelity and the metric of ``source``."""
    total = getattr(source, "num_trials", None) or source.num_samples
    progress = Progress(total, source.max_fidelity, source.metric, source.mode, TIME_ATTR)
    return progress_callback(console, progress, STARTUP_KEY)


def _tune_state_saved(loc: Location) -> bool:
    """Has Tune saved the experiment's state (so it can be resumed)? Unknown counts as yes."""
    if not loc.remote:
        return any(loc.local.glob("experiment_state-*.json"))
    try:
        return any(name.startswith("experiment_state-") and "/" not in name for name in loc.remote_files())
    except Exception:
        return True


def _delete_driver_uploads(loc: Location, names: tuple[str, ...] = DRIVER_FILES) -> None:
    """Remove the driver files a fresh URI experiment uploaded before it failed (its name stays free)."""
    try:
        loc.delete_files((*names, OPTUNA_DB))
    except Exception as exc:
        log.warning("could not remove the files uploaded to %s: %s", loc.uri, exc)


def _fit(plan: TrialPlan, exp_dir: Path, resume: bool, worker_fn: Callable | None, callbacks: list | None, verbose: int, location: Location | None = None):
    from ray import tune  # heavy dependency kept lazy
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback  # ray: heavy, only when this runs

    from vlptune.search.finetune import finetune_trial  # the trials' finetuning: imported when an experiment runs
    from vlptune.search.retention import CheckpointRetention  # imports Ray Tune and torch: kept lazy

    source = plan.source
    loc = location or Location(local=Path(exp_dir).resolve())
    rank_by = pruning_metric(source.metric, source.mode, getattr(source, "prune_metric", None), getattr(source, "prune_mode", None))
    trainable = tune.with_resources(
        make_trainable(
            exp_dir,
            source.base_raw,
            source.metric,
            source.failures.max_failures,
            worker_fn,
            plan.resolve,
            location=loc,
            hparams=plan.hparams,
            mode=source.mode,
            metrics=list(getattr(source, "metrics", None) or []),
            finetune_parallel=bool(getattr(source, "finetune_parallel", False)),
            rank_by=rank_by,
            finetune=finetune_trial,
        ),
        tune.PlacementGroupFactory([{"CPU": 0, "memory": DRIVER_MEMORY_BYTES}]),
    )
    # StartupTimer first: it adds to the result that the loggers then write.
    run_callbacks = [
        StartupTimer(),
        CSVLoggerCallback(),
        JsonLoggerCallback(),
        *(callbacks or []),
        CheckpointRetention(source.base_raw, *rank_by, plan.resolve),
    ]
    if resume:
        if not tune.Tuner.can_restore(loc.path):
            raise SearchError(f"{loc.path}: no Tune experiment state to resume from (did the experiment start?)")
        tuner = tune.Tuner.restore(loc.path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        settings = dict(plan.tune_settings())
        top = tune_metric(source)
        param_space = settings.pop("param_space", None)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=top[0] if top else None,
                mode=top[1] if top else None,
                max_concurrent_trials=concurrency(source),
                **settings,
            ),
            run_config=tune.RunConfig(
                name=loc.name,
                storage_path=loc.tune_storage_path,
                failure_config=tune.FailureConfig(max_failures=source.failures.trial_max_failures),
                callbacks=run_callbacks,
                verbose=verbose,
            ),
        )
    return tuner.fit()
