"""What an ended trial keeps: ``train.keep_when_done`` / ``train.keep_when_stopped``, applied by the driver.

A trial's checkpoints live in Ray Train's run storage,
``EXP/train/<trial_id>/checkpoint_*`` (the worker drops the loop's own copy
in ``EXP/tb/<trial_id>/checkpoints`` once Ray has recorded it: see
:meth:`vlptune.search.trainable.RayTrainReporter.persisted`). While the trial
runs, Ray keeps ``train.keep_checkpoints`` of them (the best by the metric
and the latest). Once the trial has ended it never runs again (Tune resumes
only unfinished trials: ``resume_errored=False, restart_errored=False``), so
its checkpoints matter only for later use, and the trial's recipe says which
stay:

* reached ``train.max_steps`` (completed, or stopped by the scheduler at its
  last rung): ``train.keep_when_done``;
* ended before (stopped by the scheduler, stopped on non-finite losses, or
  failed past its retries): ``train.keep_when_stopped``.

The scheduler's stop kills the trial's workers, so the driver does it:
:class:`CheckpointRetention`, a Tune callback, on ``on_trial_complete`` and
``on_trial_error``, and once more at ``on_experiment_end`` for the trials it
saw end (a stopped trial's worker may still write a checkpoint while it is
being killed). Trials that did not end are never touched: when the driver is
interrupted, Tune marks its running trials terminated in memory only (and a
resume continues them), so nothing is decided from a trial's status.

Ray's own record of an ended run (``checkpoint_manager_snapshot.json``) still
lists the copies removed here; the run is never restored from it. The loop's
local directory is pruned too when the experiment is on this machine's
filesystem (a URI experiment's run directories are on the workers' nodes,
where nothing outlives a report).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from vlptune.config import Recipe, validate_recipe
from vlptune.search.layout import TB_DIR, TRAIN_DIR
from vlptune.search.run_storage import run_storage_checkpoints
from vlptune.search.space import TIME_ATTR
from vlptune.search.trainable import apply_config
from vlptune.train import checkpoint as ckpt

log = logging.getLogger(__name__)


def ending_policy(recipe: Recipe, last_result: dict[str, Any], failed: bool) -> str:
    """The policy of a trial that ended with ``last_result`` (``failed``: past its retries)."""
    reached = not failed and int(last_result.get(TIME_ATTR) or 0) >= recipe.train.max_steps
    return recipe.train.keep_when_done if reached else recipe.train.keep_when_stopped


def prune_run_storage(fs: Any, run_path: str, policy: str, metric: str | None, mode: str | None) -> list[str]:
    """Apply ``policy`` (:func:`vlptune.train.checkpoint.kept_when_ended`) to the checkpoints Ray
    Train holds under ``run_path`` on the pyarrow filesystem ``fs``; returns the paths removed.

    A directory without a readable ``state.json`` (an upload cut short) is never kept.
    """
    paths, entries = run_storage_checkpoints(fs, run_path)
    kept = ckpt.kept_when_ended(entries, policy, metric, mode)
    removed = []
    for path in paths:
        if path.rstrip("/").rsplit("/", 1)[-1] not in kept:
            fs.delete_dir(path)
            removed.append(path)
    return removed


class CheckpointRetention(Callback):
    """Prunes an ended trial's checkpoints to its recipe's policy (see the module docstring).

    ``base_raw``, ``resolve``: how a trial's recipe is made from its Tune
    config (as :func:`vlptune.search.trainable.make_trainable` makes it; default
    :func:`~vlptune.search.trainable.apply_config`); ``metric``, ``mode``: what
    ``best`` ranks by. Paths come from each trial's own storage context, so a
    resumed experiment that moved, or lives at a URI, is pruned where it is.
    """

    def __init__(
        self,
        base_raw: dict[str, Any],
        metric: str | None,
        mode: str | None,
        resolve: Callable[[dict[str, Any], dict[str, Any], str], dict[str, Any]] | None = None,
    ):
        self.base_raw = base_raw
        self.metric = metric
        self.mode = mode
        self.resolve = resolve
        self.ended: dict[str, str] = {}  # trial id -> its policy, for the trials seen ending

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, failed=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            policy = self.ended.get(trial.trial_id)
            if policy is not None:
                self.apply(trial, policy)

    def _end(self, trial: Any, failed: bool) -> None:
        source = f"trial {trial.trial_id}"
        try:
            recipe = validate_recipe((self.resolve or apply_config)(self.base_raw, dict(trial.config), source), source)
        except Exception as exc:
            log.debug("%s: no recipe, its checkpoints are left as they are: %s", source, exc)
            return
        policy = ending_policy(recipe, trial.last_result or {}, failed)
        self.ended[trial.trial_id] = policy
        self.apply(trial, policy)

    def apply(self, trial: Any, policy: str) -> None:
        """Prune ``trial``'s checkpoints (Ray's copies, and the loop's directory when local) to ``policy``."""
        from pyarrow import fs as pafs  # pyarrow.fs: only for URI storage

        fs = trial.storage.storage_filesystem
        exp = trial.storage.experiment_fs_path
        try:
            removed = prune_run_storage(fs, f"{exp}/{TRAIN_DIR}/{trial.trial_id}", policy, self.metric, self.mode)
            if isinstance(fs, pafs.LocalFileSystem):
                ckpt.finish_checkpoints(Path(exp) / TB_DIR / trial.trial_id, policy, self.metric, self.mode)
        except Exception as exc:
            log.warning("trial %s: could not prune its checkpoints to %r: %s", trial.trial_id, policy, exc)
            return
        if removed:
            log.info("trial %s: %d checkpoint(s) removed (train.keep_when_*: %s)", trial.trial_id, len(removed), policy)
