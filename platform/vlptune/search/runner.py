"""Run a search: Ray Tune trials, each a Ray Train run of the one training loop.

Layout of an experiment directory ``EXP_DIR`` (``--storage``/``--name``; with a URI
storage the same layout lives at the URI, and the driver keeps the Optuna study in
a local mirror: :mod:`vlptune.search.location`)::

    EXP_DIR/
      vlptune_search.json     what this experiment is (metric, mode, fidelity, study, parameters)
      search_space.yaml       the space file as given (resume reads this copy)
      base_recipe.yaml        the resolved base recipe (resources, fixed, -o applied)
      optuna.db               the Optuna study (SQLite; unless the space names another storage)
      tb/<trial_id>/          one TensorBoard run per trial: the loop's out_dir (events, checkpoints)
      train/<trial_id>/       Ray Train run storage: checkpoints reported to Ray (resume on any node)
      vlptune_trial_<...>/    Tune's trial directories (result.json, progress.csv, recipe.yaml)
      experiment_state-*.json, tuner.pkl, searcher-state-*.pkl   Tune's own state (resume)

Flow: :func:`run_search` validates the space (before anything starts),
prepares the data once, connects to Ray (a local in-process cluster bound to
127.0.0.1 by default, or ``address``), and runs a Tune ``Tuner`` whose
trainable is a function that builds a Train V2 ``TorchTrainer`` around
:func:`vlptune.train.loop.train_worker` and calls ``fit()``. Metrics reach Tune
through ``TuneReportCallback``; the scheduler acts on ``step``; the searcher is
:class:`~vlptune.search.optuna_searcher.OptunaSearcher`.

Resources: a trial driver reserves no CPU (1 MiB of Ray's ``memory``
resource, which every node has), so on a 2-CPU machine two 1-CPU trials
really run at once; the number of trials at once is the space's
``max_concurrent`` bounded by what the cluster's CPUs and GPUs can hold.
"""

from __future__ import annotations

import copy
import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from vlptune.config import Recipe, recipe_to_dict, validate_recipe
from vlptune.io import atomic_write_text
from vlptune.search.lean_train import NO_AUTOSCALER_ENV
from vlptune.search.location import ACTIVE_MIRRORS, DriverSync, Location, join_uri
from vlptune.search.space import TIME_ATTR, SearchSpace, load_space

log = logging.getLogger(__name__)

META_FILE = "vlptune_search.json"
SPACE_COPY = "search_space.yaml"
BASE_COPY = "base_recipe.yaml"
OPTUNA_DB = "optuna.db"
TB_DIR = "tb"
TRAIN_DIR = "train"
TRIAL_RECIPE = "recipe.yaml"
TRAINABLE_NAME = "vlptune_trial"
DRIVER_MEMORY_BYTES = 2**20  # what a trial driver reserves instead of a CPU (see module docstring)
DEFAULT_STORAGE = "runs/search"

# Environment of every Ray process of a local cluster (set before ray.init, inherited),
# or of the job's processes on a cluster joined with --address (runtime_env).
RAY_ENV = {
    # Workers keep the driver's working directory: relative paths in recipes keep working.
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # One actor process less per trial (preemption watching matters on spot clusters only).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The Train controller polls workers (and forwards their reports) every 2 s by default.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # No Prometheus metrics of Train runs (a callback on the controller and on each worker).
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # Train V2 (the default in Ray 2.60; stated so an older environment default cannot flip it).
    "RAY_TRAIN_V2_ENABLED": "1",
    # No Ray usage statistics, nothing leaves the machine.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Tune's own TensorBoard logger would add a second run per trial; CSV/JSON are added explicitly.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
}


class SearchError(RuntimeError):
    """A search that cannot start or resume (names the directory and the problem)."""


# ------------------------------------------------------------------ experiment files


def storage_url_for(space: SearchSpace, exp_dir: Path) -> str:
    return space.storage or f"sqlite:///{(exp_dir / OPTUNA_DB).resolve()}"


def study_url(meta: dict[str, Any], exp_dir: str | Path) -> str:
    """The Optuna storage of an experiment read from ``exp_dir``: its own ``optuna.db`` when the
    study is the default SQLite one (wherever the directory now is: moved, resumed elsewhere, or a
    downloaded copy of a URI experiment), else the RDB URL the space named."""
    study_file = meta.get("study_file")
    if study_file:
        return f"sqlite:///{(Path(exp_dir) / study_file).resolve()}"
    return meta["storage_url"]


DRIVER_FILES = (META_FILE, SPACE_COPY, BASE_COPY)  # what the driver uploads to a URI experiment (and the study)


def _absolute_paths(raw: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative paths of a recipe made absolute (workers may run elsewhere than the driver's cwd)."""
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    root = Path(str(data.get("root", Recipe().data.root))).expanduser()
    if not root.is_absolute():
        data["root"] = str((cwd / root).resolve())
    for section, key in (("data", "tokenizer"), ("model.backbone", "init"), ("model.fusion", "init")):
        node = raw
        for part in section.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and (cwd / value).exists():
            node[key] = str((cwd / value).resolve())
    return raw


def write_experiment_files(space: SearchSpace, exp_dir: Path, space_path: Path, address: str | None, location: str | None = None) -> dict[str, Any]:
    """The experiment's own files in ``exp_dir`` (the directory, or the driver mirror of a URI experiment).

    ``location``: where the experiment lives (its URI, or the directory; default ``exp_dir``).
    """
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp_dir / SPACE_COPY, Path(space_path).read_text())
    atomic_write_text(exp_dir / BASE_COPY, yaml.safe_dump(space.base_raw, sort_keys=False))
    meta = {
        "name": exp_dir.name,
        "space_file": str(space_path.resolve()),
        "base_file": space.base_file,
        "overrides": space.overrides,
        "metric": space.metric,
        "mode": space.mode,
        "max_fidelity": space.max_fidelity,
        "time_attr": TIME_ATTR,
        "parameters": [p.path for p in space.params],
        "storage_url": storage_url_for(space, exp_dir),
        "study_file": None if space.storage else OPTUNA_DB,
        "study_name": exp_dir.name,
        "location": location or str(exp_dir),
        "scheduler": space.scheduler.type,
        "searcher": space.searcher.type,
        "num_samples": space.num_samples,
        "address": address,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_text(exp_dir / META_FILE, json.dumps(meta, indent=1) + "\n")
    return meta


def read_meta(exp_dir: str | Path) -> dict[str, Any]:
    path = Path(exp_dir) / META_FILE
    if not path.is_file():
        from vlptune.search.experiments import not_an_experiment

        raise SearchError(not_an_experiment(exp_dir, f"not a vlptune search experiment ({META_FILE} is missing)"))
    return json.loads(path.read_text())


def load_experiment_space(exp_dir: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """The space of an experiment, from the copies saved in its directory."""
    exp_dir = Path(exp_dir)
    meta = read_meta(exp_dir)
    base_raw = yaml.safe_load((exp_dir / BASE_COPY).read_text())
    space = load_space(exp_dir / SPACE_COPY, overrides=overrides, base_raw=base_raw)
    space.base_file = meta.get("base_file", space.base_file)
    space.overrides = list(meta.get("overrides", []))
    return space


# ------------------------------------------------------------------ inside a Ray Train worker


def _plain(value: Any) -> Any:
    """Metrics as plain Python values (tensors and numpy scalars become floats)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


COMMIT_TIMEOUT_S = 120.0  # how long rank 0 waits for Ray Train to record a reported checkpoint


class RayTrainReporter:
    """The loop's Reporter on a Ray Train worker: ``ray.train.report`` with the checkpoint.

    ``metric``: the searched metric; a report that stops the run (it carries
    ``stop_reason``) before any evaluation gets it as NaN, so Tune and the
    searcher see a result, not a missing key. The first report carries the
    wall-clock times of the loop's start and of this report, from which
    :class:`StartupTimer` derives the trial's start-up cost.

    ``uploader``: on rank 0 of a trial of a URI experiment, uploads the run
    directory (TensorBoard events, recipe) to the URI before each report (a
    report may be the last: the scheduler can stop the trial on it).

    :meth:`persisted` tells the loop when its local copy of a reported
    checkpoint may go (one copy of each checkpoint: Ray's).
    """

    def __init__(self, metric: str | None = None, loop_entry: float | None = None, uploader: Any = None, first_extra: dict[str, float] | None = None):
        self.metric = metric
        self.loop_entry = loop_entry
        self.first_extra = dict(first_extra or {})  # more start-up figures for the first report
        self.uploader = uploader
        self.last: dict[str, Any] = {}
        self.count = 0
        self._copy: tuple[str, Any] | None = None  # (local checkpoint dir, Ray's persisted copy of it)

    def upload(self, final: bool = False) -> None:
        """Upload the run directory's new files; a failure is logged, or raised when ``final``."""
        if self.uploader is None:
            return
        try:
            self.uploader.sync()
        except Exception as exc:  # noqa: BLE001 - an intermediate upload is retried at the next report
            if final:
                raise RuntimeError(f"cannot upload the trial's run directory {self.uploader.local} to {self.uploader.uri}: {exc}") from exc
            log.warning("upload of %s to %s failed (retried at the next report): %s", self.uploader.local, self.uploader.uri, exc)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        payload = {k: _plain(v) for k, v in metrics.items()}
        if self.metric and self.metric not in payload and payload.get("stop_reason"):
            payload[self.metric] = float("nan")
        if self.count == 0 and self.loop_entry is not None:
            payload[LOOP_ENTRY_KEY] = self.loop_entry
            payload[FIRST_REPORT_KEY] = time.time()
            payload.update(self.first_extra)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self.upload()
        ray.train.report(payload, checkpoint=checkpoint)
        # The default (synchronous) upload has copied the directory into the run's storage by now;
        # get_checkpoint() is that copy.
        self._copy = (checkpoint_dir, ray.train.get_checkpoint()) if checkpoint_dir else None
        self.last = payload
        self.count += 1

    def persisted(self, checkpoint_dir: str) -> bool:
        """Is the checkpoint just reported from ``checkpoint_dir`` recorded by Ray Train?

        ``ray.train.report`` returns once the files are in the run's storage,
        but Ray's controller records them (its snapshot, which a restarted
        worker group or a resumed experiment reads) a moment later; this waits
        for that (``get_all_reported_checkpoints(COMMITTED)``, at most
        :data:`COMMIT_TIMEOUT_S`). False (keep the local copy) when the
        checkpoint is not the last reported, or Ray cannot confirm it.
        """
        import ray.train

        if self._copy is None or self._copy[0] != checkpoint_dir or self._copy[1] is None:
            return False
        copy = self._copy[1]
        try:
            recorded = ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=COMMIT_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 - the local copy then stays: nothing is lost
            log.warning("cannot confirm that Ray Train recorded %s (the local copy stays): %s", copy.path, exc)
            return False
        return any(getattr(r.checkpoint, "path", None) == copy.path for r in recorded)


def _materialize_ray_checkpoint(out_dir: Path) -> None:
    """Put the run's latest Ray checkpoint where the loop resumes from (``out_dir``), if newer.

    On one machine the loop finds its own checkpoints in ``out_dir``; on a
    cluster a restarted worker may land on a node that never saw them, so the
    checkpoint Ray kept in the run's storage is copied in first.
    """
    import ray.train

    from vlptune.train import checkpoint as ck

    reported = ray.train.get_checkpoint()
    if reported is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".ray_checkpoint.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with reported.as_directory() as src:
                state_file = Path(src) / ck.STATE_FILE
                if not state_file.is_file():
                    return
                step = int(json.loads(state_file.read_text())["step"])
                local = ck.latest_checkpoint(out_dir)
                if local is not None and json.loads((local / ck.STATE_FILE).read_text())["step"] >= step:
                    return
                root = ck.checkpoint_root(out_dir)
                root.mkdir(parents=True, exist_ok=True)
                final = root / ck.step_dir_name(step)
                tmp = root / f".tmp-ray-{final.name}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                pointer = root / f".{ck.LATEST}.tmp-{os.getpid()}"
                pointer.write_text(final.name + "\n")
                os.replace(pointer, root / ck.LATEST)
                log.info("restored checkpoint of step %d from Ray storage into %s", step, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _default_worker_fn() -> Callable[..., dict]:
    from vlptune.train.loop import train_worker

    return train_worker


def _hparams_kwargs(worker_fn: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """``hparams=`` for ``worker_fn`` when it takes it (train_worker does; a stand-in of the older signature does not)."""
    import inspect

    params = inspect.signature(worker_fn).parameters.values()
    if not any(p.name == "hparams" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {}
    from vlptune.train.tensorboard import HParamsPlan

    return {"hparams": HParamsPlan(config.get("hparams") or {}, config.get("metric"))}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the recipe, a reporter, the loop."""
    loop_entry = time.time()
    recipe = Recipe.model_validate(config["recipe"])
    out_dir = Path(config["out_dir"])
    import_start = time.perf_counter()
    worker_fn = config.get("worker_fn") or _default_worker_fn()
    first_extra = {IMPORT_KEY: round(time.perf_counter() - import_start, 3)}
    if config.get("trial_fn_ts") is not None:
        first_extra[TRIAL_FN_KEY] = config["trial_fn_ts"]
    _materialize_ray_checkpoint(out_dir)
    uploader = None
    if config.get("tb_uri"):
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:  # rank 0 writes the run directory
            from vlptune.search.location import DirUploader
            from vlptune.train.checkpoint import CHECKPOINT_DIR

            # checkpoints/ stays local: Ray Train stores the reported ones in the experiment's train/
            uploader = DirUploader(out_dir, config["tb_uri"], exclude=(CHECKPOINT_DIR,))
    reporter = RayTrainReporter(config.get("metric"), loop_entry, uploader, first_extra)
    try:
        summary = worker_fn(recipe, reporter, str(out_dir), resume=True, **_hparams_kwargs(worker_fn, config)) or {}
    except BaseException:
        reporter.upload()  # what the run wrote before it failed (upload errors are only logged here)
        raise
    reporter.upload(final=True)
    stop_reason = summary.get("stop_reason") if isinstance(summary, dict) else None
    if stop_reason and stop_reason != "max_steps" and reporter.last.get("stop_reason") != stop_reason:
        # Every rank returns the same summary, so every rank makes this last report.
        final = dict(reporter.last)
        final.update({k: _plain(v) for k, v in summary.items() if isinstance(_plain(v), (int, float, str, bool)) or v is None})
        final["stop_reason"] = str(stop_reason)
        if reporter.metric and reporter.metric not in final:
            final[reporter.metric] = float("nan")
        import ray.train

        ray.train.report(final)


# ------------------------------------------------------------------ the trial driver (a Tune function trainable)


def apply_config(base_raw: dict[str, Any], config: dict[str, Any], source: str) -> dict[str, Any]:
    """A search trial's raw recipe: the base with every dotted path of Tune's config set."""
    from vlptune.config import set_dotted

    raw = copy.deepcopy(base_raw)
    for path, value in config.items():
        set_dotted(raw, path.split("."), value, source)
    return raw


def make_trainable(
    exp_dir: Path,
    base_raw: dict[str, Any],
    metric: str,
    failures_max: int,
    worker_fn: Callable | None = None,
    resolve: Callable[[dict[str, Any], dict[str, Any], str], dict[str, Any]] | None = None,
    location: Location | None = None,
    hparams: list[str] | None = None,
    mode: str | None = None,
) -> Callable[[dict], None]:
    """The function Tune runs per trial: build a TorchTrainer for the trial's recipe and ``fit()`` it.

    ``resolve(base_raw, config, source)``: the trial's raw recipe from Tune's
    config; default :func:`apply_config` (a search: config keys are dotted
    recipe paths). An ablation study passes its own (config: variant and seed).

    ``hparams``: what the experiment varies, in order (default: the config's
    keys); the trial's HParams list these first, with their values from the
    trial's recipe (a dotted recipe path) or from Tune's config (any other
    name, e.g. a study's ``variant``), see :func:`vlptune.train.tensorboard.hparam_values`.
    Ray Train keeps the trial's ``train.keep_checkpoints`` best checkpoints by
    ``metric`` in ``mode`` and always the latest (without ``mode``: the latest
    ones); :class:`vlptune.search.retention.CheckpointRetention` prunes them
    once the trial has ended.

    ``location``: the experiment; for a URI one, Ray Train's run storage is
    ``URI/train`` and rank 0 uploads the trial's run directory (written under
    ``exp_dir/tb``, the driver mirror's path, on whichever node it runs) to
    ``URI/tb/<trial_id>``.
    """
    exp_dir = Path(exp_dir).resolve()
    remote = location is not None and location.remote
    train_storage = location.join(TRAIN_DIR) if remote else str(exp_dir / TRAIN_DIR)
    resolve = resolve or apply_config

    def vlptune_trial(config: dict[str, Any]) -> None:
        trial_fn_ts = time.time()  # this process (Tune's trial actor) has started and imported Ray
        import ray.train
        from ray import tune
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        from vlptune.search.lean_train import lean_trainer_class

        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        raw = resolve(base_raw, dict(config), f"trial {trial_id}")
        recipe = validate_recipe(raw, f"trial {trial_id}")
        from vlptune.search.space import check_objectives

        check_objectives(recipe)  # refuse an inconsistent sample before starting workers
        trial_dir = Path(ctx.get_trial_dir())
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / TRIAL_RECIPE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        res = recipe.resources
        score = {"checkpoint_score_attribute": metric, "checkpoint_score_order": mode} if metric and mode else {}
        per_worker = {"CPU": res.cpus_per_worker}
        if res.gpus_per_worker > 0:
            per_worker["GPU"] = res.gpus_per_worker
        from vlptune.train.tensorboard import hparam_values

        tree = recipe_to_dict(recipe)
        trainer = lean_trainer_class(TorchTrainer)(
            train_loop_per_worker,
            train_loop_config={
                "recipe": tree,
                "out_dir": str(exp_dir / TB_DIR / trial_id),
                "metric": metric,
                "hparams": hparam_values(hparams if hparams is not None else list(config), tree, config),
                "worker_fn": worker_fn,
                "tb_uri": location.join(TB_DIR, trial_id) if remote else None,
                "trial_fn_ts": trial_fn_ts,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=per_worker),
            run_config=ray.train.RunConfig(
                name=trial_id,
                storage_path=train_storage,
                callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=failures_max),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints, **score),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray Train's own chatter; the loop's logs pass
            ),
        )
        trainer.fit()

    vlptune_trial.__name__ = vlptune_trial.__qualname__ = TRAINABLE_NAME
    return vlptune_trial


# ------------------------------------------------------------------ start-up cost


LOOP_ENTRY_KEY = "trial/loop_entry_ts"
FIRST_REPORT_KEY = "trial/first_report_ts"
TRIAL_FN_KEY = "trial/trial_fn_ts"  # the trial function started in Tune's trial actor
STARTUP_KEY = "startup/to_loop_s"  # Tune starts the trial -> the loop runs on the workers (Ray's share)
FIRST_RESULT_KEY = "startup/to_first_report_s"  # Tune starts the trial -> its first evaluation reported
TRIAL_ACTOR_KEY = "startup/trial_actor_s"  # Tune starts the trial -> its actor process runs the trial function
WORKER_GROUP_KEY = "startup/worker_group_s"  # trial function -> per-worker function (controller, placement group, workers, torch.distributed)
IMPORT_KEY = "startup/import_loop_s"  # importing the training loop (torch, transformers) on a worker
# The loop's own phases (train/loop.py PhaseTimer): startup/prepare_data_s, build_model_s, open_data_s, first_step_s.


def _startup_timer_class():
    from ray.tune import Callback

    class StartupTimer(Callback):
        """Adds the trial's start-up cost to its first result (before the loggers write it)."""

        def __init__(self) -> None:
            self.started: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.started[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            start = self.started.pop(trial.trial_id, None)
            if start is None or LOOP_ENTRY_KEY not in result:
                return
            result[STARTUP_KEY] = round(result[LOOP_ENTRY_KEY] - start, 3)
            result[FIRST_RESULT_KEY] = round(result.get(FIRST_REPORT_KEY, time.time()) - start, 3)
            if TRIAL_FN_KEY in result:
                result[TRIAL_ACTOR_KEY] = round(result[TRIAL_FN_KEY] - start, 3)
                result[WORKER_GROUP_KEY] = round(result[LOOP_ENTRY_KEY] - result[TRIAL_FN_KEY], 3)

    return StartupTimer


def StartupTimer():  # noqa: N802 - a factory standing for the class (Ray is imported lazily)
    return _startup_timer_class()()


# ------------------------------------------------------------------ scheduler


def make_scheduler(space: SearchSpace):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    s = space.scheduler
    if s.type == "asha":
        # stop_last_trials=False: a trial at the last rung ends by itself, so its final
        # evaluation, checkpoint and TensorBoard events are written, never cut off.
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=space.max_fidelity, grace_period=space.grace_period, reduction_factor=s.reduction_factor, brackets=s.brackets, stop_last_trials=False)
    if s.type == "hyperband":
        return HyperBandScheduler(time_attr=TIME_ATTR, max_t=space.max_fidelity, reduction_factor=s.reduction_factor, stop_last_trials=False)
    if s.type == "median":
        return MedianStoppingRule(time_attr=TIME_ATTR, grace_period=space.grace_period, min_samples_required=s.min_samples_required, min_time_slice=s.min_time_slice, hard_stop=s.hard_stop)
    return FIFOScheduler()


# ------------------------------------------------------------------ Ray


LOCAL_ENV_KEYS = (*RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT", NO_AUTOSCALER_ENV)


def _set_local_env() -> None:
    """Environment for a local cluster: inherited by every Ray process it starts."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    # Bind the local cluster to the loopback interface: with clustering disabled Ray
    # uses 127.0.0.1 as the node address (GCS, raylet, object manager, dashboard).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # a local cluster has no autoscaler: trials make no resource requests (search/lean_train.py)
    os.environ[NO_AUTOSCALER_ENV] = "1"
    _set_cluster_flag(os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False"))


def _set_cluster_flag(enabled: bool) -> None:
    try:
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = enabled
    except (ImportError, AttributeError):  # pragma: no cover - layout of a future Ray
        pass


class _LocalSession:
    """Undo what starting a local cluster did to this process (env, Ray's node-address
    flag), and stop the cluster: a later ``ray.init()`` in the same process (a test,
    a notebook) must not find a RAY_ADDRESS pointing at a cluster that is gone."""

    def __init__(self) -> None:
        self.saved = {key: os.environ.get(key) for key in LOCAL_ENV_KEYS}
        try:
            import ray._private.ray_constants as rc

            self.flag = rc.ENABLE_RAY_CLUSTER
        except (ImportError, AttributeError):  # pragma: no cover
            self.flag = True

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _set_cluster_flag(self.flag)


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Set by Ray's job supervisor in the environment of a job's entrypoint (with RAY_ADDRESS, the
# cluster's GCS address): `vlptune submit -- search ...` runs with both.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def cluster_address(address: str | None, environ: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The Ray cluster a search joins, and why: ``(address, source)``; ``None``: start a local one.

    ``--address`` first; else ``RAY_ADDRESS`` (inside a Ray job the supervisor
    sets it to the job's cluster, so the search runs on that cluster); a
    ``RAY_ADDRESS`` that is a dashboard URL (``http://HEAD:8265``, what
    ``vlptune submit`` and ``ray job`` use) names no cluster to join and is
    ignored; else a new local cluster.
    """
    environ = os.environ if environ is None else environ
    if address:
        return address, "--address"
    env = (environ.get("RAY_ADDRESS") or "").strip()
    if not env:
        return None, "no --address and no RAY_ADDRESS"
    if env.lower().startswith(("http://", "https://")):
        return None, (
            f"no --address; RAY_ADDRESS={env} is a dashboard (job API) address, not a cluster to join, so it is "
            "ignored here; pass --address auto (or the GCS address HEAD:6379, or ray://HEAD:10001) to join a cluster"
        )
    if environ.get(RAY_JOB_ENV_VAR):
        return env, "RAY_ADDRESS, set by the Ray job that runs this search"
    return env, "RAY_ADDRESS from the environment; unset it to start a local cluster on this machine instead"


def _unreachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why ``HOST:PORT`` (or ``ray://HOST:PORT``) cannot be reached, or None (reached, or not that form:
    ``auto`` is Ray's to resolve). Ray itself retries a dead address for many minutes."""
    import socket

    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or exc})"


def describe_cluster() -> str:
    """``N alive node(s), C CPU, G GPU`` of the Ray this process joined."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return f"{len(alive)} alive node(s), {float(total.get('CPU', 0)):g} CPU, {float(total.get('GPU', 0)):g} GPU"


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None, worker_log_level: str = "WARNING", say: Callable[[str], None] | None = None) -> str | None:
    """Join a cluster or start a local in-process one on 127.0.0.1 (with its dashboard).

    Which: :func:`cluster_address` (``address``, else ``RAY_ADDRESS``, else a
    local cluster). Prints one line saying which cluster this is and why, so a
    ``RAY_ADDRESS`` left in a shell cannot silently send a search elsewhere.
    Returns the address joined (``None``: a local cluster, or Ray was already
    initialised by the caller).

    ``worker_log_level``: Python logging level on every worker of the job (the
    loop's per-step INFO lines of many trials would drown Tune's status table;
    TensorBoard has them all). Ray keeps every worker's full log in its
    session directory either way. ``say``: where the one line goes (default: print).
    """
    say = say or (lambda line: print(line, flush=True))
    import ray

    if ray.is_initialized():
        return None
    logging_config = ray.LoggingConfig(log_level=worker_log_level.upper())
    target, source = cluster_address(address)
    if target:
        unreachable = _unreachable(target)
        if unreachable:
            raise SearchError(f"cannot join the Ray cluster at {target} ({source}): {unreachable}")
        try:
            ray.init(address=target, runtime_env={"env_vars": dict(RAY_ENV)}, log_to_driver=True, logging_config=logging_config)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise SearchError(f"cannot join the Ray cluster at {target} ({source}): {' '.join(str(exc).split())}") from None
        say(f"ray cluster: joined {target} ({source}): {describe_cluster()}")
        return target
    _start_local(num_cpus, num_gpus, logging_config)
    say(f"ray cluster: started a local cluster at {os.environ.get('RAY_ADDRESS')} ({source}): {describe_cluster()}")
    return None


def _start_local(num_cpus: int | None, num_gpus: int | None, logging_config: Any) -> None:
    import ray

    _set_local_env()
    cpus = num_cpus if num_cpus is not None else len(os.sched_getaffinity(0))
    kwargs: dict[str, Any] = {}
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    # The cluster's own processes find it through RAY_ADDRESS. Without it, Ray
    # Train's placement-group cleaner (a state-API client inside the cluster)
    # auto-detects "the" Ray instance on the machine, and gives up when another
    # user's cluster runs there too: the placement groups of stopped trials then
    # stay reserved and later trials wait for workers forever. So the GCS port is
    # chosen here and exported (inherited by every process of the new cluster).
    for attempt in range(3):
        port = _free_loopback_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        try:
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                logging_config=logging_config,
                **kwargs,
            )
            return
        except Exception:  # noqa: BLE001 - the port was taken in between: try another
            if ray.is_initialized():
                ray.shutdown()
            if attempt == 2:
                raise
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)


def concurrency(space: SearchSpace) -> int:
    """Trials at once: the space's max_concurrent, bounded by the cluster's CPUs/GPUs."""
    import ray

    res = space.base_recipe.resources
    total = ray.cluster_resources()
    limit = space.max_concurrent
    need_cpu = res.workers * res.cpus_per_worker
    have_cpu = float(total.get("CPU", 0.0))
    if need_cpu > have_cpu + 1e-9:
        raise SearchError(f"{space.file}: a trial needs {res.workers} worker(s) x {res.cpus_per_worker:g} CPU = {need_cpu:g} CPUs; the cluster has {have_cpu:g}")
    limit = min(limit, int(have_cpu // need_cpu + 1e-9))
    if res.gpus_per_worker > 0:
        need_gpu = res.workers * res.gpus_per_worker
        have_gpu = float(total.get("GPU", 0.0))
        if need_gpu > have_gpu + 1e-9:
            raise SearchError(f"{space.file}: a trial needs {res.workers} worker(s) x {res.gpus_per_worker:g} GPU = {need_gpu:g} GPUs; the cluster has {have_gpu:g}")
        limit = min(limit, int(have_gpu // need_gpu + 1e-9))
    return max(1, limit)


def prepare_data(space: SearchSpace) -> None:
    """Generate the synthetic world once, before trials start (they would all wait on its lock)."""
    prepare_recipes_data([space.base_recipe])


def prepare_recipes_data(recipes: list[Recipe]) -> None:
    """Generate the synthetic world of each data root once, before trials start.

    Recipes sharing a root get one world, with phrase-label similarities when
    any of them needs them (guided OMVM, PRA). A world that already exists
    without them while a recipe needs them is refused here, before any trial
    starts, instead of failing in every trial that needs them.
    """
    from vlptune.data.dataset import ensure_data, needs_phrase_similarity
    from vlptune.data.shards import read_manifest
    from vlptune.data.similarity import MANIFEST_KEY

    by_root: dict[Path, tuple[Recipe, bool]] = {}
    for recipe in recipes:
        root = Path(recipe.data.root).resolve()
        needs = needs_phrase_similarity(recipe)
        if root not in by_root or (needs and not by_root[root][1]):
            by_root[root] = (recipe, needs)
    for root, (recipe, needs) in by_root.items():
        if (root / "manifest.json").is_file():
            if needs and MANIFEST_KEY not in read_manifest(root):
                raise SearchError(
                    f"{root}: this dataset has no phrase-label similarities ({MANIFEST_KEY!r} missing from its manifest), "
                    "but a trial's objectives need them (guided OMVM or PRA); delete the directory so it is generated again "
                    "with them, or set data.root to another directory"
                )
            continue
        if not recipe.data.synthesize:
            continue
        log.info("preparing data in %s", root)
        ensure_data(recipe)


# ------------------------------------------------------------------ the search


def default_exp_dir(space: SearchSpace, storage: str | Path | None, name: str | None) -> Path | str:
    """``STORAGE/NAME``: an absolute directory, or a URI when ``storage`` is one (``s3://B/DIR/NAME``)."""
    from vlptune.cluster.storage import is_uri

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    leaf = name or f"{space.name}-{stamp}"
    root = os.fspath(storage) if storage else DEFAULT_STORAGE
    if is_uri(root):
        return join_uri(root, leaf)
    return (Path(root) / leaf).resolve()


def experiment_location(exp: str | Path, mirror_dir: str | Path | None = None) -> Location:
    """The :class:`Location` of an experiment given as a directory or a URI (a bad URI: :class:`SearchError`)."""
    from vlptune.cluster.storage import StorageError

    try:
        return Location.of(exp, mirror_dir)
    except StorageError as exc:
        raise SearchError(str(exc)) from None


def download_for_resume(location: Location) -> None:
    """Into the driver mirror of a URI experiment: its experiment files, and its SQLite study
    unless the mirror's own copy is newer (this machine ran the driver last)."""
    try:
        got = location.download_driver_files(DRIVER_FILES, OPTUNA_DB)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors: network, credentials, missing bucket
        raise SearchError(f"{location.uri}: cannot download the experiment files: {' '.join(str(exc).split())}") from None
    if META_FILE not in got:
        raise SearchError(f"{location.uri}: not a vlptune search experiment ({META_FILE} is missing there)")
    log.info("downloaded %s from %s into %s", ", ".join(got), location.uri, location.local)


def local_view(exp: str | Path, mirror_dir: str | Path | None = None, tensorboard: bool = False) -> Path:
    """A directory to read an experiment from: the directory itself, or for a URI a fresh
    download of it (``<mirror root>/view/...``): everything but Ray Train's checkpoints
    (``train/``) and the trials' ``checkpoints/``; TensorBoard events only with ``tensorboard``
    (else each trial's ``recipe.yaml``)."""
    loc = experiment_location(exp, mirror_dir)
    if not loc.remote:
        return loc.local

    def keep(rel: str) -> bool:
        parts = rel.split("/")
        if parts[0] == TRAIN_DIR:
            return False
        if parts[0] == TB_DIR:
            if "checkpoints" in parts[1:]:
                return False
            return tensorboard or parts[-1] == TRIAL_RECIPE
        return True

    try:
        view = loc.download_view(keep)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors: network, credentials, missing bucket
        raise SearchError(f"{loc.uri}: cannot download the experiment: {' '.join(str(exc).split())}") from None
    if not (view / META_FILE).is_file():
        raise SearchError(f"{loc.uri}: not a vlptune search experiment ({META_FILE} is missing there)")
    log.info("downloaded %s into %s", loc.uri, view)
    return view


def _cluster_nodes() -> list[dict[str, Any]] | int:
    """``ray.nodes()`` of the cluster joined (1 when Ray is not initialised)."""
    import ray

    return ray.nodes() if ray.is_initialized() else 1


def check_experiment_storage(location: Location, shared: bool = False, nodes: list[dict[str, Any]] | int | None = None, mounts_file: str | Path | None = None) -> None:
    """Refuse (:class:`SearchError`) an experiment the nodes of the cluster cannot all reach.

    ``nodes``: ``ray.nodes()``'s list or a count; default: asked of the Ray
    this process joined. ``shared``: the user says every node mounts the
    directory (``--shared-storage``). See :func:`vlptune.cluster.storage.check_storage`.
    """
    from vlptune.cluster.storage import MOUNTS_FILE, StorageError, check_storage

    try:
        check_storage(location.uri or location.local, _cluster_nodes() if nodes is None else nodes, assume_shared=shared, mounts_file=mounts_file or MOUNTS_FILE)
    except StorageError as exc:
        local_path = location.uri is None or location.uri.startswith("file://")
        hint = "" if shared or not local_path else (
            "; if every node does mount this directory at the same path (a shared filesystem vlptune does not "
            "recognise), pass --shared-storage"
        )
        raise SearchError(f"{exc}{hint}") from None


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
            from vlptune.search.optuna_searcher import STORAGE_RELOCATIONS

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
        if loc.remote:
            try:
                existing = loc.remote_files()
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors: network, credentials, missing bucket
                raise SearchError(f"{loc.uri}: cannot list the storage: {' '.join(str(exc).split())}") from None
            if existing:
                raise SearchError(f"{loc.uri}: already holds {len(existing)} file(s); continue it with --resume {loc.uri}, or choose another --name")
            if exp_dir.exists() and any(exp_dir.iterdir()):
                raise SearchError(
                    f"{exp_dir}: the local mirror of {loc.uri} is not empty (left by an earlier search of that URI, "
                    "which left nothing at the URI); delete it, or choose another --name or --mirror-dir"
                )
        elif exp_dir.exists() and any(exp_dir.iterdir()):
            raise SearchError(f"{exp_dir}: already exists; continue it with --resume {exp_dir}, or choose another --name")
        space.base_raw = _absolute_paths(space.base_raw, Path.cwd())
        fresh = True
        meta = write_experiment_files(space, exp_dir, Path(space_file), address, location=loc.path)

    plan = TrialPlan(
        source=space,
        data_recipes=[space.base_recipe],
        tune_settings=lambda: _search_settings(space, meta),
        hparams=[p.path for p in space.params],
    )
    return run_experiment(
        plan, exp_dir, fresh=fresh, resume=resume, address=address, num_cpus=num_cpus, num_gpus=num_gpus,
        verbose=verbose, worker_log_level=worker_log_level, worker_fn=worker_fn, callbacks=callbacks,
        location=loc, shared_storage=shared_storage,
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
    """

    source: Any
    data_recipes: list[Recipe]
    tune_settings: Callable[[], dict[str, Any]]
    resolve: Callable[[dict[str, Any], dict[str, Any], str], dict[str, Any]] | None = None
    hparams: list[str] | None = None


def _search_settings(space: SearchSpace, meta: dict[str, Any]) -> dict[str, Any]:
    from vlptune.search.optuna_searcher import OptunaSearcher

    searcher = OptunaSearcher(space, storage_url=meta["storage_url"], study_name=meta["study_name"])
    searcher.study  # create the study (and fail early on a bad storage URL)
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
    from vlptune.search.console import LOG_FILE, ConsoleLog

    exp_dir = Path(exp_dir)
    console = ConsoleLog(exp_dir / LOG_FILE, quiet=verbose == 0)
    if console.quiet:
        print(f"log: {console.log_path} (Ray, Tune and worker output; --verbose shows it here)", flush=True)
    try:
        with console:
            return _run_logged(plan, exp_dir, console, fresh=fresh, resume=resume, address=address, num_cpus=num_cpus, num_gpus=num_gpus, verbose=verbose, worker_log_level=worker_log_level, worker_fn=worker_fn, callbacks=callbacks, location=location, shared_storage=shared_storage)
    except BaseException:
        if console.quiet:
            kept = _keep_log(console.log_path)
            if kept is not None:
                print(f"the experiment stopped on an error; Ray's and the workers' output: {kept}", file=sys.stderr, flush=True)
        raise


def kept_log_path(exp_dir: Path) -> Path:
    """Where the log of a fresh experiment that failed before Tune saved its state is kept: ``EXP_DIR.log``."""
    return exp_dir.with_name(exp_dir.name + ".log")


def _keep_log(log_path: Path) -> Path | None:
    """The log of a failed experiment, where it survives: moved next to the directory when the
    directory itself was removed (a fresh experiment that failed before Tune saved its state)."""
    for candidate in (log_path, kept_log_path(log_path.parent)):
        if candidate.is_file():
            return candidate
    return None


def _run_logged(plan: TrialPlan, exp_dir: Path, console, *, fresh: bool, resume: bool, address, num_cpus, num_gpus, verbose: int, worker_log_level: str, worker_fn, callbacks, location, shared_storage: bool):
    import ray

    loc = location or Location(local=Path(exp_dir).resolve())
    target, _ = cluster_address(address)
    local = None if (target or ray.is_initialized()) else _LocalSession()
    sync = None
    try:
        prepare_recipes_data(plan.data_recipes)
        connect(address, num_cpus=num_cpus, num_gpus=num_gpus, worker_log_level=worker_log_level, say=console.say)
        check_experiment_storage(loc, shared_storage)
        # The Tune driver (this process) reads some of these too.
        for key, value in RAY_ENV.items():
            os.environ.setdefault(key, value)
        if loc.remote:
            ACTIVE_MIRRORS[loc.uri] = loc.local
            sync = DriverSync(loc, DRIVER_FILES, OPTUNA_DB)
            callbacks = [*(callbacks or []), sync.callback()]
        if console.quiet:
            callbacks = [*(callbacks or []), _progress(plan.source, console)]
        grid = _fit(plan, exp_dir, resume, worker_fn, callbacks, verbose, loc)
        if sync is not None:
            from vlptune.cluster.storage import StorageError

            try:
                sync.upload(strict=True)
            except StorageError as exc:
                raise SearchError(str(exc)) from None
        return grid
    except BaseException:
        if fresh and not _tune_state_saved(loc):
            _remove_keeping_log(exp_dir, console.log_path if console.quiet else None)
            if sync is not None and sync.uploads:
                _delete_driver_uploads(loc)
        elif sync is not None:
            sync.upload()  # what the driver has, best effort (the error raised is the one that matters)
        raise
    finally:
        if loc.remote:
            ACTIVE_MIRRORS.pop(loc.uri, None)
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
    from vlptune.search.console import Progress, progress_callback

    total = getattr(source, "num_trials", None) or source.num_samples
    progress = Progress(total, source.max_fidelity, source.metric, source.mode, TIME_ATTR)
    return progress_callback(console, progress, STARTUP_KEY)


def _tune_state_saved(loc: Location) -> bool:
    """Has Tune saved the experiment's state (so it can be resumed)? Unknown counts as yes."""
    if not loc.remote:
        return any(loc.local.glob("experiment_state-*.json"))
    try:
        return any(name.startswith("experiment_state-") and "/" not in name for name in loc.remote_files())
    except Exception:  # noqa: BLE001 - cannot tell: keep everything
        return True


def _delete_driver_uploads(loc: Location) -> None:
    """Remove the driver files a fresh URI experiment uploaded before it failed (its name stays free)."""
    from vlptune.search.location import _fs_and_path

    try:
        fs, base = _fs_and_path(loc.uri)
        for name in (*DRIVER_FILES, OPTUNA_DB):
            try:
                fs.delete_file(f"{base}/{name}")
            except FileNotFoundError:
                pass
    except Exception as exc:  # noqa: BLE001 - leftovers only make the next try pick another name
        log.warning("could not remove the files uploaded to %s: %s", loc.uri, exc)


def _fit(plan: TrialPlan, exp_dir: Path, resume: bool, worker_fn: Callable | None, callbacks: list | None, verbose: int, location: Location | None = None):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from vlptune.search.retention import CheckpointRetention

    source = plan.source
    loc = location or Location(local=Path(exp_dir).resolve())
    trainable = tune.with_resources(
        make_trainable(exp_dir, source.base_raw, source.metric, source.failures.max_failures, worker_fn, plan.resolve, location=loc, hparams=plan.hparams, mode=source.mode),
        tune.PlacementGroupFactory([{"CPU": 0, "memory": DRIVER_MEMORY_BYTES}]),
    )
    # StartupTimer first: it adds to the result that the loggers then write.
    run_callbacks = [StartupTimer(), CSVLoggerCallback(), JsonLoggerCallback(), *(callbacks or []), CheckpointRetention(source.base_raw, source.metric, source.mode, plan.resolve)]
    if resume:
        if not tune.Tuner.can_restore(loc.path):
            raise SearchError(f"{loc.path}: no Tune experiment state to resume from (did the experiment start?)")
        tuner = tune.Tuner.restore(loc.path, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        settings = dict(plan.tune_settings())
        param_space = settings.pop("param_space", None)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=source.metric,
                mode=source.mode,
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
