"""Run a search: Ray Tune trials, each a Ray Train run of the one training loop.

Layout of an experiment directory ``EXP_DIR`` (``--storage``/``--name``)::

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
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from vlptune.config import Recipe, recipe_to_dict, validate_recipe
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


def write_experiment_files(space: SearchSpace, exp_dir: Path, space_path: Path, address: str | None) -> dict[str, Any]:
    exp_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(space_path, exp_dir / SPACE_COPY)
    (exp_dir / BASE_COPY).write_text(yaml.safe_dump(space.base_raw, sort_keys=False))
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
        "study_name": exp_dir.name,
        "scheduler": space.scheduler.type,
        "searcher": space.searcher.type,
        "num_samples": space.num_samples,
        "address": address,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    (exp_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_meta(exp_dir: str | Path) -> dict[str, Any]:
    path = Path(exp_dir) / META_FILE
    if not path.is_file():
        raise SearchError(f"{exp_dir}: not a vlptune search experiment ({META_FILE} is missing)")
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


class RayTrainReporter:
    """The loop's Reporter on a Ray Train worker: ``ray.train.report`` with the checkpoint.

    ``metric``: the searched metric; a report that stops the run (it carries
    ``stop_reason``) before any evaluation gets it as NaN, so Tune and the
    searcher see a result, not a missing key. The first report carries the
    wall-clock times of the loop's start and of this report, from which
    :class:`StartupTimer` derives the trial's start-up cost.
    """

    def __init__(self, metric: str | None = None, loop_entry: float | None = None):
        self.metric = metric
        self.loop_entry = loop_entry
        self.last: dict[str, Any] = {}
        self.count = 0

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        payload = {k: _plain(v) for k, v in metrics.items()}
        if self.metric and self.metric not in payload and payload.get("stop_reason"):
            payload[self.metric] = float("nan")
        if self.count == 0 and self.loop_entry is not None:
            payload[LOOP_ENTRY_KEY] = self.loop_entry
            payload[FIRST_REPORT_KEY] = time.time()
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(payload, checkpoint=checkpoint)
        self.last = payload
        self.count += 1


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the recipe, a reporter, the loop."""
    loop_entry = time.time()
    recipe = Recipe.model_validate(config["recipe"])
    out_dir = Path(config["out_dir"])
    worker_fn = config.get("worker_fn") or _default_worker_fn()
    _materialize_ray_checkpoint(out_dir)
    reporter = RayTrainReporter(config.get("metric"), loop_entry)
    summary = worker_fn(recipe, reporter, str(out_dir), resume=True) or {}
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


PG_CLEANER_INTERVAL_S = 5.0  # Ray's default polls the state API every second, for the whole trial


def _lean_trainer_class(base: type) -> type:
    """``TorchTrainer`` with a lighter per-trial footprint (measured in docs/search.md):

    * no Ray Data callback: a trial feeds itself from Parquet shards, so the
      per-run DatasetManager actor (one more process per trial, importing Ray
      Data) is never used;
    * the placement-group cleaner checks on the controller every 5 s instead
      of every second (each check is a state-API round trip through the
      dashboard; the PG of a killed trial is freed at most 5 s later).

    Falls back to ``base`` if Ray's internal layout changes, or when
    ``VLPTUNE_LEAN_TRAINER=0`` (to compare with, or fall back to, Ray's defaults).
    """
    if os.environ.get("VLPTUNE_LEAN_TRAINER", "1") == "0":
        return base
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # pragma: no cover - a future Ray
        return base

    class LeanTorchTrainer(base):
        def _create_default_callbacks(self):
            callbacks = []
            for cb in super()._create_default_callbacks():
                if isinstance(cb, DatasetsCallback) and not self.datasets:
                    continue
                if type(cb) is PlacementGroupCleanerCallback:
                    cb = PlacementGroupCleanerCallback(check_interval_s=PG_CLEANER_INTERVAL_S)
                callbacks.append(cb)
            return callbacks

    LeanTorchTrainer.__name__ = LeanTorchTrainer.__qualname__ = base.__name__
    return LeanTorchTrainer


def make_trainable(exp_dir: Path, base_raw: dict[str, Any], metric: str, failures_max: int, worker_fn: Callable | None = None) -> Callable[[dict], None]:
    """The function Tune runs per trial: build a TorchTrainer for the trial's recipe and ``fit()`` it."""
    exp_dir = Path(exp_dir).resolve()

    def vlptune_trial(config: dict[str, Any]) -> None:
        import ray.train
        from ray import tune
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        raw = copy.deepcopy(base_raw)
        from vlptune.config import set_dotted

        for path, value in config.items():
            set_dotted(raw, path.split("."), value, f"trial {trial_id}")
        recipe = validate_recipe(raw, f"trial {trial_id}")
        from vlptune.search.space import check_objectives

        check_objectives(recipe)  # refuse an inconsistent sample before starting workers
        trial_dir = Path(ctx.get_trial_dir())
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / TRIAL_RECIPE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        res = recipe.resources
        per_worker = {"CPU": res.cpus_per_worker}
        if res.gpus_per_worker > 0:
            per_worker["GPU"] = res.gpus_per_worker
        trainer = _lean_trainer_class(TorchTrainer)(
            train_loop_per_worker,
            train_loop_config={
                "recipe": recipe_to_dict(recipe),
                "out_dir": str(exp_dir / TB_DIR / trial_id),
                "metric": metric,
                "worker_fn": worker_fn,
            },
            scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0, resources_per_worker=per_worker),
            run_config=ray.train.RunConfig(
                name=trial_id,
                storage_path=str(exp_dir / TRAIN_DIR),
                callbacks=[TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=failures_max),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray Train's own chatter; the loop's logs pass
            ),
        )
        trainer.fit()

    vlptune_trial.__name__ = vlptune_trial.__qualname__ = TRAINABLE_NAME
    return vlptune_trial


# ------------------------------------------------------------------ start-up cost


LOOP_ENTRY_KEY = "trial/loop_entry_ts"
FIRST_REPORT_KEY = "trial/first_report_ts"
STARTUP_KEY = "startup/to_loop_s"  # Tune starts the trial -> the loop runs on the workers (Ray's share)
FIRST_RESULT_KEY = "startup/to_first_report_s"  # Tune starts the trial -> its first evaluation reported


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


LOCAL_ENV_KEYS = (*RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT")


def _set_local_env() -> None:
    """Environment for a local cluster: inherited by every Ray process it starts."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    # Bind the local cluster to the loopback interface: with clustering disabled Ray
    # uses 127.0.0.1 as the node address (GCS, raylet, object manager, dashboard).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
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


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None, worker_log_level: str = "WARNING") -> None:
    """Join ``address`` or start a local in-process cluster on 127.0.0.1 (with its dashboard).

    ``worker_log_level``: Python logging level on every worker of the job (the
    loop's per-step INFO lines of many trials would drown Tune's status table;
    TensorBoard has them all). Ray keeps every worker's full log in its
    session directory either way.
    """
    import ray

    if ray.is_initialized():
        return
    logging_config = ray.LoggingConfig(log_level=worker_log_level.upper())
    if address:
        ray.init(address=address, runtime_env={"env_vars": dict(RAY_ENV)}, log_to_driver=True, logging_config=logging_config)
        return
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
    recipe = space.base_recipe
    if not recipe.data.synthesize or (Path(recipe.data.root) / "manifest.json").is_file():
        return
    from vlptune.data.dataset import ensure_data

    log.info("preparing data in %s", recipe.data.root)
    ensure_data(recipe)


# ------------------------------------------------------------------ the search


def default_exp_dir(space: SearchSpace, storage: str | Path | None, name: str | None) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path(storage or DEFAULT_STORAGE) / (name or f"{space.name}-{stamp}")).resolve()


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
    verbose: int = 1,
    worker_log_level: str = "WARNING",
    worker_fn: Callable | None = None,
    callbacks: list | None = None,
):
    """Start (or, with ``resume``, continue) a search; returns Tune's ``ResultGrid``.

    ``worker_fn``: the per-worker function, ``train_worker``'s signature
    (tests pass a stand-in); default :func:`vlptune.train.loop.train_worker`.
    """
    fresh = False
    if resume:
        if exp_dir is None:
            raise SearchError("--resume needs the experiment directory")
        exp_dir = Path(exp_dir).resolve()
        if overrides:
            raise SearchError(f"{exp_dir}: a resumed experiment keeps its settings; -o is not accepted with --resume")
        meta = read_meta(exp_dir)
        space = load_experiment_space(exp_dir)
        if space_file is not None and Path(space_file).resolve() != Path(meta["space_file"]):
            log.warning("resuming %s with its saved space (from %s), not %s", exp_dir, meta["space_file"], space_file)
    else:
        if space_file is None:
            raise SearchError("a search needs a search-space file")
        space = load_space(space_file, overrides)
        exp_dir = Path(exp_dir).resolve() if exp_dir else default_exp_dir(space, storage, name)
        if exp_dir.exists() and any(exp_dir.iterdir()):
            raise SearchError(f"{exp_dir}: already exists; continue it with --resume {exp_dir}, or choose another --name")
        space.base_raw = _absolute_paths(space.base_raw, Path.cwd())
        fresh = True
        meta = write_experiment_files(space, exp_dir, Path(space_file), address)

    import ray

    local = None if (address or ray.is_initialized()) else _LocalSession()
    try:
        prepare_data(space)
        connect(address, num_cpus=num_cpus, num_gpus=num_gpus, worker_log_level=worker_log_level)
        # The Tune driver (this process) reads some of these too.
        for key, value in RAY_ENV.items():
            os.environ.setdefault(key, value)
        return _fit(space, exp_dir, meta, resume, worker_fn, callbacks, verbose)
    except BaseException:
        # A search that failed before Tune saved any state leaves no half experiment
        # behind (its name stays free for the next try).
        if fresh and not any(exp_dir.glob("experiment_state-*.json")):
            shutil.rmtree(exp_dir, ignore_errors=True)
        raise
    finally:
        if local is not None:
            local.close()  # the local cluster this call started ends with it


def _fit(space: SearchSpace, exp_dir: Path, meta: dict[str, Any], resume: bool, worker_fn: Callable | None, callbacks: list | None, verbose: int):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from vlptune.search.optuna_searcher import OptunaSearcher

    trainable = tune.with_resources(
        make_trainable(exp_dir, space.base_raw, space.metric, space.failures.max_failures, worker_fn),
        tune.PlacementGroupFactory([{"CPU": 0, "memory": DRIVER_MEMORY_BYTES}]),
    )
    # StartupTimer first: it adds to the result that the loggers then write.
    run_callbacks = [StartupTimer(), CSVLoggerCallback(), JsonLoggerCallback(), *(callbacks or [])]
    if resume:
        if not tune.Tuner.can_restore(str(exp_dir)):
            raise SearchError(f"{exp_dir}: no Tune experiment state to resume from (did the search start?)")
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        searcher = OptunaSearcher(space, storage_url=meta["storage_url"], study_name=meta["study_name"])
        searcher.study  # create the study (and fail early on a bad storage URL)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                search_alg=searcher,
                scheduler=make_scheduler(space),
                num_samples=space.num_samples,
                max_concurrent_trials=concurrency(space),
            ),
            run_config=tune.RunConfig(
                name=exp_dir.name,
                storage_path=str(exp_dir.parent),
                failure_config=tune.FailureConfig(max_failures=space.failures.trial_max_failures),
                callbacks=run_callbacks,
                verbose=verbose,
            ),
        )
    return tuner.fit()
