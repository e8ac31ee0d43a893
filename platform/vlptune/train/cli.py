"""``vlptune train RECIPE [-o k=v ...] [--out DIR] [--resume]``: one training run, in-process, no Ray.

Runs :func:`vlptune.train.loop.train_worker` on this machine, logs to
TensorBoard in the run directory (default ``runs/<recipe name>-<timestamp>``)
and ends by printing the zero-shot retrieval metrics next to their chance
levels.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlptune.config import Recipe
    from vlptune.train.tensorboard import HParamsPlan

from vlptune.cliutil import add_override_arg
from vlptune.config import load_recipe, parse_override, recipe_to_dict
from vlptune.train.reporting import LocalReporter

DEFAULT_RUNS_DIR = "runs"
EXIT_OK = 0
EXIT_STOPPED = 1  # the run stopped early (non-finite losses)
EXIT_BAD_DATA = 2  # the run stopped on its data (more corrupt records than data.max_skip_fraction), like a bad-input error


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a recipe in this process (no Ray) and print zero-shot retrieval against chance",
        description="Train RECIPE with the per-worker training loop on this machine; TensorBoard events, "
        "checkpoints and the resolved recipe go to the run directory.",
    )
    train.add_argument("recipe", help="recipe YAML file, e.g. trials/demo-light.yaml")
    add_override_arg(train)
    train.add_argument("--out", help=f"run directory (default: {DEFAULT_RUNS_DIR}/<recipe name>-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (a new run otherwise)")
    train.add_argument("--quiet", action="store_true", help="only print the evaluation reports and the final table")
    train.set_defaults(func=run_train)


def default_run_dir(name: str) -> Path:
    return Path(DEFAULT_RUNS_DIR) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def format_results(metrics: dict[str, Any]) -> str:
    """The final table: each retrieval recall next to its chance level, and the validation accuracies."""
    lines = []
    rows = [(f"{d.upper()} R@{k}", f"retrieval/{d}_r{k}", f"retrieval/chance_{d}_r{k}") for d in ("tr", "ir") for k in (1, 5, 10)]
    rows.append(("RSUM", "retrieval/rsum", "retrieval/chance_rsum"))
    if "retrieval/rsum" in metrics:
        images, texts = int(metrics.get("retrieval/images", 0)), int(metrics.get("retrieval/texts", 0))
        lines.append(f"zero-shot retrieval on {images} images / {texts} captions (ITM head):")
        lines.append(f"  {'metric':<8} {'model':>8} {'chance':>8}")
        for label, key, chance in rows:
            lines.append(f"  {label:<8} {metrics[key]:>8.2f} {metrics[chance]:>8.2f}")
    for key in ("val/itm_acc", "val/mlm_acc", "val/mvm_acc", "val/mvm_chance"):
        if key in metrics:
            lines.append(f"{key} = {metrics[key]:.4f}")
    if "skipped_records" in metrics:
        lines.append(f"corrupt training records skipped: {metrics['skipped_records']} (data.max_skip_fraction={metrics.get('max_skip_fraction', '-')})")
    lines.append(f"stop reason: {metrics.get('stop_reason')}; step {metrics.get('step')}; run dir {metrics.get('run_dir')}")
    return "\n".join(lines)


def overridden_hparams(recipe: Recipe, overrides: list[str]) -> HParamsPlan:
    """The run's HParams plan: the paths set with ``-o`` (the recipe's values), listed before the fixed ones."""
    from vlptune.train.tensorboard import HParamsPlan, hparam_values  # tensorboard imports torch: only when this runs

    paths = dict.fromkeys(".".join(parse_override(text)[0]) for text in overrides)
    return HParamsPlan(hparam_values(paths, recipe_to_dict(recipe)))


def run_train(args: argparse.Namespace) -> int:
    from vlptune.data.shard_checks import SKIP_STOP_PREFIX  # shard_checks imports pyarrow: only when this runs
    from vlptune.train.loop import STOP_MAX_STEPS, train_worker  # loop imports torch: only when this runs

    recipe = load_recipe(args.recipe, args.override)
    out = Path(args.out) if args.out else default_run_dir(recipe.name)
    if not args.resume and out.exists() and any(out.iterdir()):
        print(f"error: {out} already holds a run; pass --resume to continue it or choose another --out", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(f"training {recipe.name} into {out} (tensorboard --logdir {out})", flush=True)
    result = train_worker(recipe, LocalReporter(), out, resume=args.resume, hparams=overridden_hparams(recipe, args.override))
    print(format_results({**result, "max_skip_fraction": recipe.data.max_skip_fraction}), flush=True)
    if result["stop_reason"] == STOP_MAX_STEPS:
        return EXIT_OK
    return EXIT_BAD_DATA if str(result["stop_reason"]).startswith(SKIP_STOP_PREFIX) else EXIT_STOPPED
