"""``vlptune finetune CHECKPOINT_OR_RUN --task NAME [-o ...]`` in this process, and the table it ends with.

The pretraining recipe is the run's ``recipe.yaml``; ``-o`` overrides apply
to it (``-o downstream.vqa.max_steps=200``, ``-o data.root=...``), so a task
is configured exactly as in a trial's ``downstream:`` section. ``--random-init``
finetunes the same model from random weights (the baseline that shows what
pretraining is worth). The Ray Train run of the same command (DDP workers,
``--ray``) is :mod:`vlptune.search.finetune`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from vlptune.config import ConfigError, Recipe, load_recipe
from vlptune.config.downstream import config_class, metric_key
from vlptune.tasks.caption import RUN_RECIPE, resolve_checkpoint
from vlptune.train.finetune import STOP_EARLY, finetune_worker
from vlptune.train.loop import STOP_MAX_STEPS
from vlptune.train.reporting import LocalReporter

DEFAULT_RUNS_DIR = "runs"
EXIT_OK = 0
EXIT_STOPPED = 1  # stopped on non-finite losses
LOG_FILE = "finetune.log"


def load_source(path: str | Path, overrides: list[str] | None = None, recipe: str | Path | None = None) -> tuple[Path, Recipe]:
    """The checkpoint (a checkpoint or run directory) and its pretraining recipe, ``overrides`` applied.

    The recipe is ``recipe`` when given (a search trial's checkpoint in Ray's
    storage, ``EXP/train/TRIAL/checkpoint_*``, with ``EXP/tb/TRIAL/recipe.yaml``),
    else the run directory's ``recipe.yaml``.
    """
    checkpoint, run_dir = resolve_checkpoint(path)
    recipe_path = Path(recipe) if recipe is not None else run_dir / RUN_RECIPE
    if not recipe_path.is_file():
        raise ConfigError(f"{checkpoint}: the pretraining recipe {recipe_path} is missing (a run directory has it next to checkpoints/; else pass --recipe)")
    return checkpoint, load_recipe(recipe_path, overrides)


def default_out(name: str, task: str) -> Path:
    return Path(DEFAULT_RUNS_DIR) / f"{name}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_task_results(task: str, metrics: dict[str, Any]) -> str:
    """The task's metrics (best evaluation), the main one first next to its chance level."""
    cfg = config_class(task)
    main, chance = metric_key(task, cfg.main_metric), metric_key(task, cfg.chance_metric)
    lines = [
        f"{task}: {cfg.main_metric} = {metrics.get(main, float('nan')):.2f} (chance {metrics.get(chance, float('nan')):.2f}) at step {metrics.get('best_step')}"
    ]
    prefix = metric_key(task, "")
    rest = [(k[len(prefix) :], v) for k, v in metrics.items() if k.startswith(prefix) and k not in (main, chance)]
    lines += [f"  {name:<20} {value:>8.2f}" for name, value in rest if isinstance(value, float)]
    lines.append(f"stop reason: {metrics.get('stop_reason')}; best checkpoint {metrics.get('checkpoint')}; run dir {metrics.get('run_dir')}")
    return "\n".join(lines)


def finetune_in_process(
    checkpoint: str, task: str, overrides: list[str], out: str | None, random_init: bool, quiet: bool, recipe_path: str | None = None
) -> int:
    source, recipe = load_source(checkpoint, overrides, recipe_path)
    config_class(task)  # an unknown task: ConfigError naming the registered ones
    run_dir = Path(out) if out else default_out(recipe.name, task)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / LOG_FILE)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().addHandler(handler)
    print(
        f"finetuning {'random init' if random_init else source} on {task} into {run_dir} (log {run_dir / LOG_FILE}; tensorboard --logdir {run_dir})", flush=True
    )
    result = finetune_worker(recipe, task, None if random_init else source, LocalReporter(), run_dir)
    print(format_task_results(task, result), flush=True)
    return task_exit_code(result)


def task_exit_code(result: dict[str, Any]) -> int:
    """0 when the finetuning ran to its budget or stopped early on its metric; 1 when it stopped on non-finite losses."""
    stop = str(result.get("stop_reason"))
    return EXIT_OK if stop == STOP_MAX_STEPS or stop.startswith(STOP_EARLY) else EXIT_STOPPED
