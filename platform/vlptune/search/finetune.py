"""Downstream finetuning as Ray Train runs, and the ``vlptune finetune`` command.

* :func:`finetune_loop_per_worker`: Ray Train's per-worker function of a
  finetuning: the pretraining recipe, a :class:`RayTrainReporter`, then
  :func:`vlptune.train.finetune.finetune_worker` (the one loop in finetune
  mode, DDP across the workers); its last report is the best evaluation;
* :func:`fit_finetune`: one finetuning as a (lean) ``TorchTrainer`` with the
  recipe's ``resources`` (workers, CPUs, GPUs); a trial that pretrains then
  finetunes calls it once per task (:func:`finetune_tasks`, several tasks
  at once as separate Ray Train runs when ``parallel``);
* :func:`finetune_trial`: what a search or study trial with downstream tasks
  does once its pretraining run has ended (:mod:`vlptune.search.trainable`
  calls it): its final checkpoint (:func:`final_checkpoint`) finetuned on each
  task, the downstream metrics merged into its last pretraining evaluation
  and written to its TensorBoard run (:func:`finish_with_downstream`);
* ``vlptune finetune CHECKPOINT_OR_RUN --task NAME``: in this process
  (:mod:`vlptune.tasks.finetune`), or with ``--ray`` as a Ray Train run on a
  local cluster (127.0.0.1) or ``--address``.

Ray is imported inside the functions (heavy dependency kept lazy).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlptune.cliutil import add_override_arg
from vlptune.cluster.session import ray_session
from vlptune.cluster.storage import is_uri
from vlptune.config import Recipe, recipe_to_dict
from vlptune.config.downstream import combined_metrics, config_class, main_metric_key
from vlptune.config.downstream import names as task_names
from vlptune.search.lean_train import lean_trainer_class, scaling_config
from vlptune.search.space import TIME_ATTR
from vlptune.search.trainable import RayTrainReporter, materialize_ray_checkpoint, plain, storage_fs

log = logging.getLogger(__name__)

FINETUNE_DIR = "finetune"  # under a trial's run directory: one run directory per task


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function of a finetuning (module docstring)."""
    import ray.train  # heavy dependency kept lazy

    from vlptune.train.finetune import finetune_worker  # torch: kept lazy (imported on the worker)

    out_dir = Path(config["out_dir"])
    materialize_ray_checkpoint(out_dir)
    reporter = RayTrainReporter(config["metric"])
    result = finetune_worker(Recipe.model_validate(config["recipe"]), config["task"], config.get("checkpoint"), reporter, out_dir, resume=True)
    best = {k: plain(v) for k, v in result.items() if isinstance(plain(v), (int, float, str, bool))}
    ray.train.report({**best, "final": True})  # every rank: the best evaluation, the run's result


def fit_finetune(recipe: Recipe, task: str, checkpoint: str | None, out_dir: Path, storage: str, name: str, failures_max: int = 0) -> dict[str, Any]:
    """Finetune ``checkpoint`` on ``task`` as a Ray Train run (``recipe.resources`` workers); the best evaluation's metrics.

    The result is rank 0's, read from ``out_dir/finetune.json`` (Ray's
    ``Result.metrics`` is a checkpointed report, not the run's summary), so
    ``out_dir`` must be on storage the driver sees (shared storage on a cluster).
    """
    import ray.train  # heavy dependency kept lazy
    from ray.train.torch import TorchTrainer  # ray: heavy, only when this runs

    trainer = lean_trainer_class(TorchTrainer)(
        finetune_loop_per_worker,
        train_loop_config={"recipe": recipe_to_dict(recipe), "task": task, "checkpoint": checkpoint, "out_dir": str(out_dir), "metric": main_metric_key(task)},
        scaling_config=scaling_config(recipe.resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=failures_max),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=main_metric_key(task), checkpoint_score_order=config_class(task).mode
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    from vlptune.train.finetune import FINETUNE_STATE  # imports torch: kept out of the CLI's start-up

    metrics = dict(result.metrics or {})  # Ray's: a checkpointed report, not necessarily the last
    state = out_dir / FINETUNE_STATE  # rank 0's summary (the run directory must be reachable here: shared storage on a cluster)
    if state.is_file():
        metrics.update(json.loads(state.read_text()).get("result", {}))
    if result.checkpoint is not None:  # the one Ray Train kept: the best by the main metric (the workers' local copies are dropped)
        metrics["checkpoint"] = result.checkpoint.path
    return metrics


def finetune_tasks(
    recipe: Recipe,
    checkpoint: str,
    trial_dir: Path,
    storage: str,
    trial_id: str,
    parallel: bool,
    failures_max: int = 0,
    fit: Callable[..., dict[str, Any]] = fit_finetune,
) -> dict[str, Any]:
    """Finetune ``checkpoint`` on every task of ``recipe.downstream`` (separate Ray Train runs, at once when ``parallel``).

    Returns every task's ``downstream/<task>/*`` metrics, merged (with
    ``train.keep_when_done: none`` the finetuned checkpoints are then removed); a task whose
    run failed gets its main metric as NaN (the worst value) and its error
    under ``downstream/<task>/error``.
    """
    tasks = list(recipe.downstream)

    def one(task: str) -> dict[str, Any]:
        try:
            metrics = fit(recipe, task, checkpoint, trial_dir / FINETUNE_DIR / task, storage, f"{trial_id}-{task}", failures_max)
        except Exception as exc:  # one task's failure must not lose the others' results
            return {main_metric_key(task): math.nan, f"downstream/{task}/error": f"{type(exc).__name__}: {exc}"}
        kept = metrics.get("checkpoint")
        if recipe.train.keep_when_done == "none" and isinstance(kept, str) and not is_uri(kept) and Path(kept).is_dir():
            from vlptune.train.checkpoint import remove_checkpoint  # imports torch: `vlptune results` imports this module without it

            remove_checkpoint(kept)  # train.keep_when_done: none holds for the trial's finetunings too: their metrics are read
        return {k: v for k, v in metrics.items() if k.startswith(f"downstream/{task}/")}

    if parallel and len(tasks) > 1:
        with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
            parts = list(pool.map(one, tasks))
    else:
        parts = [one(task) for task in tasks]
    return {k: v for part in parts for k, v in part.items()}


# --------------------------------------------------------------------------- a search trial that finetunes


FINETUNE_SOURCE_DIR = "pretrained"  # under EXP/tb/<trial>/finetune/: a URI experiment's final checkpoint, downloaded


def final_checkpoint(train_storage: str, trial_id: str, max_steps: int, trial_dir: Path) -> tuple[dict[str, Any], str] | None:
    """The last pretraining evaluation of a trial that reached ``max_steps`` (as Tune gets it) and the
    local path of the checkpoint saved with it (downloaded into ``trial_dir`` from a URI storage);
    None when Ray Train holds no checkpoint of that step (the trial stopped before)."""
    from vlptune.search.run_storage import finished_result, run_storage_checkpoints  # imports torch: only when a trial starts

    fs, root = storage_fs(train_storage)
    run_path = f"{root}/{trial_id}"
    result = finished_result(fs, run_path, max_steps)
    paths, entries = run_storage_checkpoints(fs, run_path)
    final = [e for e in entries if e.step >= max_steps]
    if result is None or not final:
        return None
    name = max(final, key=lambda e: (e.step, e.name)).name
    (path,) = [p for p in paths if p.rstrip("/").rsplit("/", 1)[-1] == name]
    result.pop("trial/completed_from_checkpoint", None)
    if not is_uri(train_storage):
        return result, path
    from pyarrow import fs as pafs  # pyarrow.fs: only for URI storage

    local = trial_dir / FINETUNE_DIR / FINETUNE_SOURCE_DIR / name
    if not local.is_dir():
        tmp = local.with_name(local.name + ".tmp")
        pafs.copy_files(path, str(tmp), source_filesystem=fs)
        tmp.rename(local)
    return result, str(local)


def finish_with_downstream(
    result: dict[str, Any],
    recipe: Recipe,
    checkpoint: str,
    trial_dir: Path,
    train_storage: str,
    trial_id: str,
    parallel: bool,
    failures_max: int,
    fit: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``result`` (the trial's last pretraining evaluation) with the metrics of finetuning ``checkpoint``
    on each task of ``recipe.downstream`` (:func:`vlptune.search.finetune.finetune_tasks`) and their
    named combinations (:func:`vlptune.config.downstream.combined_metrics`); the downstream metrics are written to the trial's TensorBoard run at its last step too. ``fit``: one
    task's finetuning (default :func:`vlptune.search.finetune.fit_finetune`, a Ray Train run)."""
    start = time.perf_counter()
    tasks = list(recipe.downstream)
    log.info("trial %s: pretrained to step %s; finetuning %s on %s", trial_id, result.get(TIME_ATTR), checkpoint, ", ".join(tasks))
    downstream = finetune_tasks(recipe, checkpoint, trial_dir, train_storage, trial_id, parallel, failures_max, fit or fit_finetune)
    downstream.update(combined_metrics(downstream, tasks))
    final = {**result, **downstream, FINETUNE_TIME_KEY: round(time.perf_counter() - start, 3)}
    _write_scalars(trial_dir, {k: v for k, v in downstream.items() if isinstance(v, (int, float))}, int(result.get(TIME_ATTR) or 0))
    return final


FINETUNE_TIME_KEY = "trial/finetune_s"  # seconds the trial spent finetuning after pretraining


def _write_scalars(run_dir: Path, scalars: dict[str, float], step: int) -> None:
    """The downstream metrics in the trial's own TensorBoard run (so its HParams row shows them)."""
    from torch.utils.tensorboard import SummaryWriter  # torch: only when a trial finetunes

    writer = SummaryWriter(str(run_dir), filename_suffix=".downstream")
    try:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
    finally:
        writer.close()


def finetune_trial(
    recipe: Recipe, train_storage: str, trial_id: str, trial_dir: Path, parallel: bool, failures_max: int, fit: Callable[..., dict[str, Any]] | None = None
) -> dict[str, Any] | None:
    """A trial's last result once its pretraining has ended: its final checkpoint (:func:`final_checkpoint`)
    finetuned on every task of ``recipe.downstream`` (:func:`finish_with_downstream`); None when the
    trial did not reach ``train.max_steps`` (it is not finetuned)."""
    found = final_checkpoint(train_storage, trial_id, recipe.train.max_steps, trial_dir)
    if found is None:
        return None
    result, checkpoint = found
    return finish_with_downstream(result, recipe, checkpoint, trial_dir, train_storage, trial_id, parallel, failures_max, fit)


# --------------------------------------------------------------------------- the command


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    finetune = subparsers.add_parser(
        "finetune",
        help="finetune a pretraining checkpoint on a downstream task (vqa, nlvr2, snli_ve, retrieval, captioning) and print its metric against chance",
        description="Load CHECKPOINT_OR_RUN (a checkpoint directory, or a run directory: its latest checkpoint; the pretraining recipe "
        "is the run's recipe.yaml), add the task's head and finetune with the one training loop: the task's optimiser defaults "
        "(downstream.<task>.* of the recipe; -o to change them), no augmentation, early stopping on the evaluation metric, the best "
        "checkpoint kept. In this process, or as a Ray Train run with resources.workers DDP workers (--ray).",
    )
    finetune.add_argument("checkpoint", help="checkpoint directory (RUN/checkpoints/step_N) or run directory")
    finetune.add_argument("--task", required=True, choices=task_names(), help="the downstream task")
    add_override_arg(finetune)
    finetune.add_argument("--recipe", help="the pretraining recipe (default: the run directory's recipe.yaml; a search trial's is EXP/tb/TRIAL/recipe.yaml)")
    finetune.add_argument("--out", help="run directory (default: runs/<recipe name>-<task>-<timestamp>)")
    finetune.add_argument("--random-init", action="store_true", help="finetune the same model from random weights (the baseline of pretraining)")
    finetune.add_argument("--ray", action="store_true", help="run as a Ray Train run (resources.workers DDP workers) on a local cluster or --address")
    finetune.add_argument("--address", help="with --ray: the Ray cluster to join (default: RAY_ADDRESS, else a local cluster on 127.0.0.1)")
    finetune.add_argument("--quiet", action="store_true", help="only the evaluation reports and the final table")
    finetune.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from vlptune.tasks.finetune import default_out, finetune_in_process, format_task_results, load_source, task_exit_code  # torch: only when this runs

    if not args.ray:
        return finetune_in_process(args.checkpoint, args.task, args.override, args.out, args.random_init, args.quiet, args.recipe)
    source, recipe = load_source(args.checkpoint, args.override, args.recipe)
    out = (Path(args.out) if args.out else default_out(recipe.name, args.task)).resolve()
    with ray_session(args.address, num_cpus=None):
        print(
            f"finetuning {'random init' if args.random_init else source} on {args.task} with Ray Train ({recipe.resources.workers} worker(s)) into {out}",
            flush=True,
        )
        result = fit_finetune(recipe, args.task, None if args.random_init else str(source.resolve()), out, str(out / "ray"), out.name)
    print(format_task_results(args.task, result), flush=True)
    return task_exit_code(result)
