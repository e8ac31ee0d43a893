"""A search trial: the Tune function trainable, and the Ray Train worker adapter around the training loop.

* :func:`make_trainable`: the function Tune runs per trial (its driver): it
  resolves the trial's recipe, then builds a Train V2 ``TorchTrainer`` (the
  lean one of :mod:`vlptune.search.lean_train`) around
  :func:`train_loop_per_worker` and calls ``fit()``;
* :func:`train_loop_per_worker`: Ray Train's per-worker function: the recipe,
  a :class:`RayTrainReporter`, the checkpoint Ray kept put where the loop
  resumes from (:func:`materialize_ray_checkpoint`), then
  :func:`vlptune.train.loop.train_worker`;
* a trial whose recipe has a ``downstream:`` section, or whose experiment's
  metric is a ``downstream/<task>/<metric>`` one, finetunes its final
  pretraining checkpoint on each task (:func:`vlptune.search.finetune.finetune_trial`,
  each a Ray Train run) once its pretraining run has ended, then reports its last pretraining
  evaluation and the downstream metrics together. The last pretraining
  report is held back from Tune until then (:func:`trial_report_callback`):
  a scheduler may stop a trial on any result it sees, the one at its last
  step included, so that report must be the trial's last. Every earlier
  result carries the downstream metrics as NaN (Tune wants the searched
  metric in each; NaN is the worst value everywhere: ``vlptune.io.rank_value``).
  A trial the scheduler prunes never reaches its last step, so it is never finetuned;
* :func:`StartupTimer`: the Tune callback adding a trial's start-up cost to
  its first result (keys ``startup/*``, :data:`STARTUP_KEY` and the others).

Ray, torch and the training loop are imported inside the functions that run
on Ray (heavy dependencies kept lazy): ``vlptune results`` imports this module
for the start-up keys.
"""

from __future__ import annotations

import copy
import fcntl
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from vlptune.cluster.storage import is_uri, open_uri
from vlptune.config import Recipe, recipe_to_dict, set_dotted, validate_recipe
from vlptune.config.downstream import chance_metric_key, combined_keys, main_metric_key
from vlptune.search.layout import TB_DIR, TRAIN_DIR, TRIAL_RECIPE
from vlptune.search.lean_train import lean_trainer_class, scaling_config
from vlptune.search.location import DirUploader, Location
from vlptune.search.space import TIME_ATTR, check_objectives, is_downstream, pruning_metric, trial_tasks

log = logging.getLogger(__name__)

TRAINABLE_NAME = "vlptune_trial"


# ------------------------------------------------------------------ inside a Ray Train worker


def plain(value: Any) -> Any:
    """Metrics as plain Python values (tensors and numpy scalars become floats)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
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
        except Exception as exc:
            if final:
                raise RuntimeError(f"cannot upload the trial's run directory {self.uploader.local} to {self.uploader.uri}: {exc}") from exc
            log.warning("upload of %s to %s failed (retried at the next report): %s", self.uploader.local, self.uploader.uri, exc)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train  # heavy dependency kept lazy

        payload = {k: plain(v) for k, v in metrics.items()}
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
        import ray.train  # heavy dependency kept lazy

        if self._copy is None or self._copy[0] != checkpoint_dir or self._copy[1] is None:
            return False
        copy = self._copy[1]
        try:
            recorded = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=COMMIT_TIMEOUT_S)
        except Exception as exc:
            log.warning("cannot confirm that Ray Train recorded %s (the local copy stays): %s", copy.path, exc)
            return False
        return any(getattr(r.checkpoint, "path", None) == copy.path for r in recorded)


def materialize_ray_checkpoint(out_dir: Path) -> None:
    """Put the run's latest Ray checkpoint where the loop resumes from (``out_dir``), if newer.

    On one machine the loop finds its own checkpoints in ``out_dir``; on a
    cluster a restarted worker may land on a node that never saw them, so the
    checkpoint Ray kept in the run's storage is installed first, with the
    loop's own protocol (:func:`vlptune.train.checkpoint.install_checkpoint`:
    a temporary copy renamed onto its name, then the ``latest`` pointer).
    The workers of one node take turns (a lock file in ``out_dir``).
    """
    import ray.train  # heavy dependency kept lazy

    from vlptune.train import checkpoint as ck  # imports torch: kept lazy

    reported = ray.train.get_checkpoint()
    if reported is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".ray_checkpoint.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with reported.as_directory() as src:
                step = ck.checkpoint_step(src)
                if step is None:
                    return
                local = ck.latest_checkpoint(out_dir)
                if local is not None and (ck.checkpoint_step(local) or 0) >= step:
                    return
                final = ck.install_checkpoint(out_dir, src)
                log.info("restored checkpoint of step %d from Ray storage into %s", step, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_worker_fn() -> Callable[..., dict]:
    """The per-worker function of a real trial: :func:`vlptune.train.loop.train_worker`."""
    from vlptune.train.loop import train_worker  # torch, transformers: kept lazy (imported on the worker, timed as startup/import_loop_s)

    return train_worker


def hparams_kwargs(worker_fn: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """``hparams=`` for ``worker_fn`` when it takes it (train_worker does; a stand-in of the older signature does not)."""
    params = inspect.signature(worker_fn).parameters.values()
    if not any(p.name == "hparams" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {}
    from vlptune.train.tensorboard import HParamsPlan  # imports torch: kept lazy

    return {"hparams": HParamsPlan(config.get("hparams") or {}, config.get("metric"), tuple(config.get("later_metrics") or ()))}


def downstream_hparam_metrics(tasks: list[str]) -> list[str]:
    """The HParams columns of a trial that finetunes on ``tasks``: each task's main metric and chance level, then the combinations."""
    if not tasks:
        return []
    per_task = [key for task in tasks for key in (main_metric_key(task), chance_metric_key(task))]
    return [*per_task, *combined_keys()]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: the recipe, a reporter, the loop."""
    loop_entry = time.time()
    recipe = Recipe.model_validate(config["recipe"])
    out_dir = Path(config["out_dir"])
    import_start = time.perf_counter()
    worker_fn = config.get("worker_fn") or default_worker_fn()
    first_extra = {IMPORT_KEY: round(time.perf_counter() - import_start, 3)}
    if config.get("trial_fn_ts") is not None:
        first_extra[TRIAL_FN_KEY] = config["trial_fn_ts"]
    materialize_ray_checkpoint(out_dir)
    uploader = None
    if config.get("tb_uri"):
        import ray.train  # heavy dependency kept lazy

        if ray.train.get_context().get_world_rank() == 0:  # rank 0 writes the run directory
            from vlptune.train.checkpoint import CHECKPOINT_DIR  # imports torch: kept lazy

            # checkpoints/ stays local: Ray Train stores the reported ones in the experiment's train/
            uploader = DirUploader(out_dir, config["tb_uri"], exclude=(CHECKPOINT_DIR,))
    reporter = RayTrainReporter(config.get("metric"), loop_entry, uploader, first_extra)
    try:
        summary = worker_fn(recipe, reporter, str(out_dir), resume=True, **hparams_kwargs(worker_fn, config)) or {}
    except BaseException:
        reporter.upload()  # what the run wrote before it failed (upload errors are only logged here)
        raise
    reporter.upload(final=True)
    stop_reason = summary.get("stop_reason") if isinstance(summary, dict) else None
    if stop_reason and stop_reason != "max_steps" and reporter.last.get("stop_reason") != stop_reason:
        # Every rank returns the same summary, so every rank makes this last report.
        final = dict(reporter.last)
        final.update({k: plain(v) for k, v in summary.items() if isinstance(plain(v), (int, float, str, bool)) or v is None})
        final["stop_reason"] = str(stop_reason)
        if reporter.metric and reporter.metric not in final:
            final[reporter.metric] = float("nan")
        import ray.train  # heavy dependency kept lazy

        ray.train.report(final)


# ------------------------------------------------------------------ the trial driver (a Tune function trainable)


def apply_config(base_raw: dict[str, Any], config: dict[str, Any], source: str) -> dict[str, Any]:
    """A search trial's raw recipe: the base with every dotted path of Tune's config set."""
    raw = copy.deepcopy(base_raw)
    for path, value in config.items():
        set_dotted(raw, path.split("."), value, source)
    return raw


def storage_fs(train_storage: str) -> tuple[Any, str]:
    """The pyarrow filesystem and root path of a Ray Train storage (a directory or a URI)."""
    from pyarrow import fs as pafs  # pyarrow.fs: only when a trial starts

    fs, root = open_uri(train_storage) if is_uri(train_storage) else (pafs.LocalFileSystem(), train_storage)
    return fs, root.rstrip("/")


def complete_from_storage(train_storage: str, trial_id: str, max_steps: int) -> bool:
    """Report the stored final result of a trial that already reached ``max_steps`` (Tune relaunched
    it after the driver was killed) and say so; False when its run must go on (workers are started)."""
    from ray import tune  # ray: heavy, only when this runs

    from vlptune.search.run_storage import finished_result  # imports torch: only when a trial starts

    fs, root = storage_fs(train_storage)
    result = finished_result(fs, f"{root}/{trial_id}", max_steps)
    if result is None:
        return False
    log.info("trial %s: its checkpoint of step %d is stored: completed from its saved evaluation, no workers started", trial_id, max_steps)
    tune.report(result)
    return True


def passed_to_tune(report: dict[str, Any], required: list[str], hold_from_step: int | None) -> dict[str, Any] | None:
    """What Tune gets of a pretraining report (:func:`trial_report_callback`): None when it is held back
    (its step is ``hold_from_step`` or later and the loop did not stop itself), else the report with
    every metric of ``required`` it lacks as NaN."""
    reason, step = report.get("stop_reason"), report.get(TIME_ATTR)
    if hold_from_step is not None and isinstance(step, (int, float)) and step >= hold_from_step and reason in (None, "max_steps"):
        return None
    missing = {k: float("nan") for k in required if k not in report}
    return {**report, **missing} if missing else report


def trial_report_callback(required: list[str], hold_from_step: int | None):
    """Ray Train's ``TuneReportCallback`` for a trial: every metric of ``required`` a result lacks is
    added as NaN, and with ``hold_from_step`` the report of that step (the last pretraining one) is not
    passed to Tune: the trial function reports it after the finetuning (:func:`finish_with_downstream`).

    A report with a ``stop_reason`` other than ``max_steps`` (the loop stopped itself) always passes."""
    from ray.tune.integration.ray_train import TuneReportCallback  # ray: heavy, only when a trial runs

    class TrialReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            passed = passed_to_tune(metrics[0], required, hold_from_step)
            if passed is not None:
                super().after_report(run_context, [passed, *metrics[1:]], checkpoint)

    return TrialReportCallback()


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
    metrics: list[str] | None = None,
    finetune_parallel: bool = False,
    rank_by: tuple[str, str] | None = None,
    finetune: Callable[..., dict[str, Any] | None] | None = None,
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

    A trial whose recipe has a ``downstream:`` section, or whose ``metric``
    (or one of ``metrics``, a study's table) is ``downstream/<task>/...``,
    finetunes after pretraining (module docstring; ``finetune_parallel``: its
    tasks at once) with ``finetune`` (:func:`vlptune.search.finetune.finetune_trial`,
    which the runner passes: that module builds on this one). ``rank_by``: the (metric, mode) Ray Train ranks a trial's
    pretraining checkpoints by; default ``(metric, mode)``, or
    :func:`~vlptune.search.space.pruning_metric`'s when ``metric`` is a
    downstream one (the pretraining reports do not carry it).
    """
    exp_dir = Path(exp_dir).resolve()
    remote = location if location is not None and location.remote else None
    train_storage = remote.join(TRAIN_DIR) if remote else str(exp_dir / TRAIN_DIR)
    resolve = resolve or apply_config
    ranked = rank_by or (pruning_metric(metric, mode) if metric and mode else (metric, mode))

    def vlptune_trial(config: dict[str, Any]) -> None:
        trial_fn_ts = time.time()  # this process (Tune's trial actor) has started and imported Ray
        import ray.train  # heavy dependency kept lazy (this runs in Tune's trial actor)
        from ray import tune  # ray: heavy, only when this runs
        from ray.train.torch import TorchTrainer  # ray: heavy, only when this runs
        from ray.tune.integration.ray_train import TuneReportCallback  # ray: heavy, only when this runs

        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        raw = resolve(base_raw, dict(config), f"trial {trial_id}")
        recipe = validate_recipe(raw, f"trial {trial_id}")
        tasks = trial_tasks(recipe, [metric, *(metrics or [])])
        if tasks and set(tasks) != set(recipe.downstream):  # a task named only by the metric: its defaults
            raw = copy.deepcopy(raw)
            raw.setdefault("downstream", {}).update({t: {} for t in tasks if t not in recipe.downstream})
            recipe = validate_recipe(raw, f"trial {trial_id}")
        check_objectives(recipe)  # refuse an inconsistent sample before starting workers
        trial_dir = Path(ctx.get_trial_dir())
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / TRIAL_RECIPE).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        max_steps = recipe.train.max_steps

        trial_dir_tb = exp_dir / TB_DIR / trial_id

        def pretrained_then_finetuned() -> dict[str, Any] | None:
            if finetune is None:
                raise RuntimeError(f"trial {trial_id}: finetunes on {', '.join(tasks)}, but the trainable was built without a finetune function")
            return finetune(recipe, train_storage, trial_id, trial_dir_tb, finetune_parallel, failures_max)

        if tasks:
            final = pretrained_then_finetuned()  # a relaunched trial whose pretraining had ended
            if final is not None:
                log.info("trial %s: its checkpoint of step %d is stored: finetuned from it, no pretraining workers started", trial_id, max_steps)
                tune.report(final)
                return
        elif complete_from_storage(train_storage, trial_id, max_steps):
            return
        score = {"checkpoint_score_attribute": ranked[0], "checkpoint_score_order": ranked[1]} if ranked[0] and ranked[1] else {}
        required = [m for m in [metric, *(metrics or [])] if is_downstream(m)]
        from vlptune.train.tensorboard import hparam_values  # imports torch: kept lazy

        tree = recipe_to_dict(recipe)
        trainer = lean_trainer_class(TorchTrainer)(
            train_loop_per_worker,
            train_loop_config={
                "recipe": tree,
                "out_dir": str(trial_dir_tb),
                "metric": metric,
                "hparams": hparam_values(hparams if hparams is not None else list(config), tree, config),
                "later_metrics": downstream_hparam_metrics(tasks),
                "worker_fn": worker_fn,
                "tb_uri": remote.join(TB_DIR, trial_id) if remote else None,
                "trial_fn_ts": trial_fn_ts,
            },
            scaling_config=scaling_config(recipe.resources),
            run_config=ray.train.RunConfig(
                name=trial_id,
                storage_path=train_storage,
                callbacks=[trial_report_callback(required, max_steps if tasks else None) if tasks or required else TuneReportCallback()],
                failure_config=ray.train.FailureConfig(max_failures=failures_max),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.train.keep_checkpoints, **score),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray Train's own chatter; the loop's logs pass
            ),
        )
        fitted = trainer.fit()
        if tasks:  # the held-back last report, with the downstream metrics
            final = pretrained_then_finetuned()
            if final is not None:
                tune.report(final)
            elif int((fitted.metrics or {}).get(TIME_ATTR) or 0) >= max_steps:
                raise RuntimeError(f"trial {trial_id}: pretrained to step {max_steps}, but Ray Train holds no checkpoint of that step to finetune")

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
    from ray.tune import Callback  # heavy dependency kept lazy

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


def StartupTimer():
    return _startup_timer_class()()
