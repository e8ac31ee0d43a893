"""``vlptune backbone pretrain RECIPE --out DIR``: supervised pretraining of a recipe's ResNet, saved in the Hugging Face format.

The papers start their CNN from ImageNet weights; none can be downloaded here,
so this trains the recipe's own ResNet (same depth and width) on the labelled
images of its data (by default the synthetic world: multi-label
classification of the shapes, colours and sizes in each image; any converted
dataset whose shards carry object labels, e.g. Visual Genome, the same way).
It is not a second loop: the recipe is rewritten to the one objective
``backbone_cls`` (:mod:`vlptune.objectives.backbone_cls`), the VD off and one
fusion layer (built, never run), and trained by
:func:`vlptune.train.loop.train_worker` like any recipe. The CNN of the last
checkpoint is then written with ``save_pretrained`` (``config.json`` +
``model.safetensors``) into a temporary sibling of ``DIR`` and renamed into
place, with ``provenance.json`` (recipe, data, steps, seed, the validation
accuracy against its chance level). ``model.backbone.init: DIR`` loads it
through exactly the code that loads ``microsoft/resnet-18`` from a hub
(:func:`vlptune.model.backbone.from_pretrained_or_explain`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from vlptune.cliutil import add_override_arg
from vlptune.config import ConfigError, Recipe, load_recipe, recipe_to_dict, validate_recipe

log = logging.getLogger(__name__)

OBJECTIVE = "backbone_cls"
DEFAULT_STEPS = 300  # demo-light: the validation label accuracy is flat by then (docs/training.md, "A pretrained demo backbone")
FUSION_LAYERS = 1  # the fusion Transformer is built but never run: the smallest one
PROVENANCE_FILE = "provenance.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REPORTED = ("val/bcls_acc", "val/bcls_chance", "val/bcls_f1", "val/bcls_f1_chance", "val/bcls_loss")


def pretrain_recipe(recipe: Recipe, steps: int) -> Recipe:
    """``recipe`` rewritten to train its CNN alone on image classification for ``steps`` optimiser steps."""
    spec: dict[str, Any] = recipe_to_dict(recipe)
    spec["name"] = f"{recipe.name}-backbone"
    spec["objectives"] = {OBJECTIVE: {"weight": 1.0}}
    spec["model"]["vd"]["size"] = 0
    spec["model"]["fusion"]["layers"] = FUSION_LAYERS
    spec["model"]["fusion"]["unimodal_layers"] = 0
    spec["model"]["backbone"]["freeze_for"] = 0
    spec["optim"]["balance"] = "none"
    spec["train"].update(max_steps=steps, eval_every=steps, keep_when_done="last")
    return validate_recipe(spec, f"{recipe.name} rewritten for backbone pretraining")


def is_pretrained_backbone(path: str | Path) -> bool:
    """Whether ``path`` holds a finished ``save_pretrained`` backbone (weights, config and provenance)."""
    p = Path(path)
    return all((p / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE))


def pretrain_backbone(recipe: Recipe, out: str | Path, steps: int = DEFAULT_STEPS, run_dir: str | Path | None = None, quiet: bool = True) -> dict[str, Any]:
    """Pretrain ``recipe``'s CNN and write it to ``out`` (atomically); returns the provenance written beside it.

    ``run_dir`` keeps the training run (TensorBoard events, checkpoint); by
    default a temporary directory next to ``out`` that is removed afterwards.
    """
    import torch  # torch, the loop and the model: only when a backbone is trained

    from vlptune.data.info import DatasetInfo  # imports torch: only when a backbone is trained
    from vlptune.data.prepare import data_root  # imports torch: only when a backbone is trained
    from vlptune.objectives.base import build_pretrainer  # imports torch: only when a backbone is trained
    from vlptune.train.checkpoint import latest_checkpoint, load_checkpoint  # imports torch: only when a backbone is trained
    from vlptune.train.loop import STOP_MAX_STEPS, train_worker  # imports torch: only when a backbone is trained
    from vlptune.train.reporting import LocalReporter  # imports torch: only when a backbone is trained

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    precipe = pretrain_recipe(recipe, steps)
    keep_run = run_dir is not None
    run = Path(run_dir) if run_dir is not None else target.parent / f".{target.name}.run-{os.getpid()}"
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    start = time.time()
    try:
        result = train_worker(precipe, LocalReporter(quiet=quiet), run, resume=False)
        if result.get("stop_reason") != STOP_MAX_STEPS:
            raise RuntimeError(f"backbone pretraining stopped early ({result.get('stop_reason')}) at step {result.get('step')}; run dir {run}")
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise RuntimeError(f"backbone pretraining left no checkpoint in {run}")
        pretrainer = build_pretrainer(precipe, DatasetInfo.read(data_root(precipe)))
        load_checkpoint(checkpoint, pretrainer, restore_rng_state=False)
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad():
            pretrainer.model.backbone.resnet.save_pretrained(str(tmp), safe_serialization=True)
        provenance = {
            "created_by": "vlptune backbone pretrain",
            "recipe": recipe.name,
            "objective": OBJECTIVE,
            "labels": getattr(precipe.objectives[OBJECTIVE], "labels", None),
            "data_root": str(precipe.data.root),
            "synth": recipe_to_dict(precipe)["data"]["synth"] if precipe.data.synthesize else None,
            "depth": precipe.model.backbone.depth,
            "width_mult": precipe.model.backbone.width_mult,
            "image_size": precipe.data.image_size,
            "steps": steps,
            "seed": precipe.train.seed,
            "seconds": round(time.time() - start, 1),
            "metrics": {key: float(result[key]) for key in REPORTED if key in result},
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return provenance
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not keep_run:
            shutil.rmtree(run, ignore_errors=True)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    backbone = subparsers.add_parser("backbone", help="pretrain a recipe's CNN (the offline stand-in for ImageNet weights)")
    sub = backbone.add_subparsers(dest="backbone_command", required=True)
    pre = sub.add_parser(
        "pretrain",
        help="classify the objects of the recipe's images with its ResNet and save it with save_pretrained",
        description="Train RECIPE's ResNet alone on multi-label classification of the objects in its images (the synthetic world: "
        "shapes, colours, sizes), on the one training loop, and write it in the Hugging Face format to --out; "
        "then set model.backbone.init: DIR.",
    )
    pre.add_argument("recipe", help="recipe YAML file whose ResNet (depth, width) and data to use, e.g. trials/demo-light.yaml")
    add_override_arg(pre)
    pre.add_argument("--out", required=True, help="directory to write (config.json, model.safetensors, provenance.json); replaced if it exists")
    pre.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimiser steps (default {DEFAULT_STEPS})")
    pre.add_argument("--run-dir", help="keep the training run (TensorBoard, checkpoint) here (default: a temporary directory, removed)")
    pre.add_argument("--quiet", action="store_true", help="only print the result")
    pre.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ConfigError(f"--steps: expected a positive number of optimiser steps, got {args.steps}")
    recipe = load_recipe(args.recipe, args.override)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(
        f"pretraining the ResNet-{recipe.model.backbone.depth} x{recipe.model.backbone.width_mult} of {recipe.name} for {args.steps} steps into {args.out}",
        flush=True,
    )
    provenance = pretrain_backbone(recipe, args.out, args.steps, args.run_dir, quiet=args.quiet)
    m = provenance["metrics"]
    if "val/bcls_acc" in m:
        print(
            f"val label accuracy {m['val/bcls_acc']:.3f} (chance {m.get('val/bcls_chance', float('nan')):.3f}), F1 {m.get('val/bcls_f1', float('nan')):.3f} "
            f"(chance {m.get('val/bcls_f1_chance', float('nan')):.3f}); {provenance['seconds']:.0f} s",
            file=sys.stdout,
        )
    print(f"wrote {args.out}; use it with -o model.backbone.init={args.out}", flush=True)
    return 0
