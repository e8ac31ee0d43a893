"""``vlptune backbone pretrain RECIPE --out DIR``, in this process or as a Ray Train run (``--ray``).

The pretraining itself is :func:`vlptune.train.backbone_pretrain.pretrain_backbone`
(the recipe rewritten to the ``backbone_cls`` objective, trained by the one
loop, the CNN saved with ``save_pretrained``). It takes the function that
trains: ``train_worker`` in this process, or :func:`ray_train_fn`, which
runs the same per-worker function as a search trial
(:func:`vlptune.search.trainable.train_loop_per_worker`) in a lean
``TorchTrainer`` with the recipe's ``resources`` (``workers`` DDP workers,
CPUs and GPUs each), and hands back the checkpoint Ray Train kept. Its run
directory must be on storage this process sees (a local cluster, or shared
storage on a cluster), as for ``vlptune finetune --ray``.

Lives in ``search/`` because it builds Ray Train runs; ``train/`` stays free of Ray.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from vlptune.cliutil import add_override_arg
from vlptune.cluster.session import ray_session
from vlptune.config import ConfigError, Recipe, load_recipe, recipe_to_dict
from vlptune.search.lean_train import lean_trainer_class, scaling_config
from vlptune.search.trainable import train_loop_per_worker
from vlptune.train.backbone_pretrain import TrainFn, pretrain_backbone

RAY_STORAGE = "ray"  # under the pretraining's run directory: Ray Train's run storage (its checkpoints)


def ray_train_fn(name: str) -> TrainFn:
    """A ``train`` for :func:`pretrain_backbone` that runs the recipe as a Ray Train run named ``name`` (module docstring).

    Returns the last report's metrics, with ``checkpoint``: the path of the checkpoint Ray Train kept
    (the loop's local copy is dropped once Ray has it).
    """

    def train(recipe: Recipe, reporter: Any, out_dir: str | Path, resume: bool = False) -> dict[str, Any]:
        import ray.train  # heavy dependency kept lazy
        from ray.train.torch import TorchTrainer  # ray: heavy, only when this runs

        run = Path(out_dir)
        trainer = lean_trainer_class(TorchTrainer)(
            train_loop_per_worker,
            train_loop_config={"recipe": recipe_to_dict(recipe), "out_dir": str(run)},
            scaling_config=scaling_config(recipe.resources),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=str(run / RAY_STORAGE),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),  # the latest: the last step's
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        fitted = trainer.fit()
        metrics = dict(fitted.metrics or {})
        if fitted.checkpoint is not None:
            metrics["checkpoint"] = fitted.checkpoint.path
        return metrics

    return train


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    backbone = subparsers.add_parser("backbone", help="pretrain a recipe's CNN (the offline stand-in for ImageNet weights)")
    sub = backbone.add_subparsers(dest="backbone_command", required=True)
    pre = sub.add_parser(
        "pretrain",
        help="classify the objects of the recipe's images with its ResNet and save it with save_pretrained",
        description="Train RECIPE's ResNet alone on multi-label classification of the objects in its images (the synthetic world: "
        "shapes, colours, sizes), on the one training loop, in this process or as a Ray Train run (--ray: resources.workers DDP "
        "workers), and write it in the Hugging Face format to --out; then set model.backbone.init: DIR.",
    )
    pre.add_argument("recipe", help="recipe YAML file whose ResNet (depth, width) and data to use, e.g. trials/demo-light.yaml")
    add_override_arg(pre)
    pre.add_argument("--out", required=True, help="directory to write (config.json, model.safetensors, provenance.json); replaced if it exists")
    pre.add_argument(
        "--steps", type=int, help="optimiser steps (default: the recipe's model.backbone.pretrain_steps; batch and lr: pretrain_batch_images, pretrain_lr)"
    )
    pre.add_argument("--run-dir", help="keep the training run (TensorBoard, checkpoint) here (default: a temporary directory, removed)")
    pre.add_argument("--ray", action="store_true", help="run as a Ray Train run (resources.workers DDP workers) on a local cluster or --address")
    pre.add_argument("--address", help="with --ray: the Ray cluster to join (default: RAY_ADDRESS, else a local cluster on 127.0.0.1)")
    pre.add_argument("--quiet", action="store_true", help="only print the result")
    pre.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: expected a positive number of optimiser steps, got {args.steps}")
    if args.address and not args.ray:
        raise ConfigError("--address: only with --ray (the pretraining runs in this process otherwise)")
    recipe = load_recipe(args.recipe, args.override)
    steps = recipe.model.backbone.pretrain_steps if args.steps is None else args.steps
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    where = f" with Ray Train ({recipe.resources.workers} worker(s))" if args.ray else ""
    print(
        f"pretraining the ResNet-{recipe.model.backbone.depth} x{recipe.model.backbone.width_mult} of {recipe.name} for {steps} steps{where} into {args.out}",
        flush=True,
    )
    if args.ray:
        with ray_session(args.address, num_cpus=None):
            provenance = pretrain_backbone(recipe, args.out, ray_train_fn(f"backbone-{Path(args.out).name}"), steps, args.run_dir, quiet=args.quiet)
    else:
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
