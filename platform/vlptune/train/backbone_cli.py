"""``vlptune backbone pretrain RECIPE --out DIR``: the command of train/backbone_pretrain.py."""

from __future__ import annotations

import argparse
import logging

from vlptune.cliutil import add_override_arg
from vlptune.config import ConfigError, load_recipe
from vlptune.train.backbone_pretrain import pretrain_backbone


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
    pre.add_argument(
        "--steps", type=int, help="optimiser steps (default: the recipe's model.backbone.pretrain_steps; batch and lr: pretrain_batch_images, pretrain_lr)"
    )
    pre.add_argument("--run-dir", help="keep the training run (TensorBoard, checkpoint) here (default: a temporary directory, removed)")
    pre.add_argument("--quiet", action="store_true", help="only print the result")
    pre.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: expected a positive number of optimiser steps, got {args.steps}")
    recipe = load_recipe(args.recipe, args.override)
    steps = recipe.model.backbone.pretrain_steps if args.steps is None else args.steps
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(
        f"pretraining the ResNet-{recipe.model.backbone.depth} x{recipe.model.backbone.width_mult} of {recipe.name} for {steps} steps into {args.out}",
        flush=True,
    )
    from vlptune.train.loop import train_worker  # the loop imports torch: only when this runs

    provenance = pretrain_backbone(recipe, args.out, train_worker, steps, args.run_dir, quiet=args.quiet)
    m = provenance["metrics"]
    if "val/bcls_acc" in m:
        print(
            f"val label accuracy {m['val/bcls_acc']:.3f} (chance {m.get('val/bcls_chance', float('nan')):.3f}), F1 {m.get('val/bcls_f1', float('nan')):.3f} "
            f"(chance {m.get('val/bcls_f1_chance', float('nan')):.3f}); {provenance['seconds']:.0f} s",
        )
    print(f"wrote {args.out}; use it with -o model.backbone.init={args.out}", flush=True)
    return 0
