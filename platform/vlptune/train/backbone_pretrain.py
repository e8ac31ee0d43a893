"""Supervised pretraining of a recipe's ResNet, saved in the Hugging Face format (``vlptune backbone pretrain``, search/backbone.py).

The papers start their CNN from ImageNet weights; none can be downloaded here,
so this trains the recipe's own ResNet (same depth and width) on the labelled
images of its data (by default the synthetic world: multi-label
classification of the shapes, colours and sizes in each image; any converted
dataset whose shards carry object labels, e.g. Visual Genome, the same way).
It is not a second loop: the recipe is rewritten to the one objective
``backbone_cls`` (:mod:`vlptune.objectives.backbone_cls`), the VD off and one
fusion layer (built, never run), and trained by
:func:`vlptune.train.loop.train_worker` like any recipe (handed in by the
caller: the loop itself calls :func:`resolve_cached_backbone`). The CNN of the last
checkpoint is then written with ``save_pretrained`` (``config.json`` +
``model.safetensors``) into a temporary sibling of ``DIR`` and renamed into
place, with ``provenance.json`` (recipe, data, steps, seed, the validation
accuracy against its chance level). ``model.backbone.init: DIR`` loads it
through exactly the code that loads ``microsoft/resnet-18`` from a hub
(:func:`vlptune.model.backbone.from_pretrained_or_explain`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlptune.config import Recipe, recipe_to_dict, validate_recipe
from vlptune.config.recipe import CACHED_BACKBONE

log = logging.getLogger(__name__)
TrainFn = Callable[..., dict[str, Any]]  # train/loop.py:train_worker(recipe, reporter, out_dir, resume=...)

OBJECTIVE = "backbone_cls"
FUSION_LAYERS = 1  # the fusion Transformer is built but never run: the smallest one
PROVENANCE_FILE = "provenance.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CACHE_DIR = "backbones"  # under data.root
MANIFEST_KEY = "backbones"  # the data's manifest.json lists the cached backbones made from it, with their provenance
PRETRAIN_SEED = 0  # one cached backbone per architecture and data, whatever the run's seed (like one set of ImageNet weights)
REPORTED = ("val/bcls_acc", "val/bcls_chance", "val/bcls_f1", "val/bcls_f1_chance", "val/bcls_loss")


def pretrain_recipe(recipe: Recipe, steps: int | None = None) -> Recipe:
    """``recipe`` rewritten to train its CNN alone on image classification for ``steps`` optimiser steps
    (default ``model.backbone.pretrain_steps``), ``pretrain_batch_images`` images per step, AdamW at ``pretrain_lr``."""
    b = recipe.model.backbone
    spec: dict[str, Any] = recipe_to_dict(recipe)
    spec["name"] = f"{recipe.name}-backbone"
    spec["objectives"] = {OBJECTIVE: {"weight": 1.0}}
    spec["model"]["vd"]["size"] = 0
    spec["model"]["fusion"]["layers"] = FUSION_LAYERS
    spec["model"]["fusion"]["unimodal_layers"] = 0
    spec["model"]["backbone"]["freeze_for"] = 0
    if b.init == CACHED_BACKBONE:
        spec["model"]["backbone"]["init"] = "random"
    # Each image once per step with one caption: the objective reads only the images and their object labels.
    spec["data"].update(batch_images=b.pretrain_batch_images, itm_positives=1, itm_negatives=0)
    spec["optim"]["balance"] = "none"
    spec["optim"]["global_batch"] = 0
    # AdamW whatever the recipe's CNN optimiser (SOHO's SGD settings assume an ImageNet start), and the
    # classification head, the one trained parameter outside the CNN, with the CNN's settings: at
    # demo-light's fusion lr (1e-4) it barely moved and the label accuracy stalled at the prior (docs/training.md).
    spec["optim"]["backbone"].update(optimizer="adamw", lr=b.pretrain_lr)
    spec["optim"]["transformer"] = dict(spec["optim"]["backbone"])
    steps = b.pretrain_steps if steps is None else steps
    spec["train"].update(max_steps=steps, eval_every=steps, keep_when_done="last")
    return validate_recipe(spec, f"{recipe.name} rewritten for backbone pretraining")


def cache_path(recipe: Recipe) -> Path:
    """Where ``model.backbone.init: pretrained`` keeps the backbone of ``recipe``: under ``data.root``, named by what shapes it."""
    from vlptune.data.prepare import data_root  # torch-free, but data/ only when a path is asked for

    b = recipe.model.backbone
    shape = f"resnet{b.depth}-w{b.width_mult:g}-px{recipe.data.image_size}"
    how = f"steps{b.pretrain_steps}-b{b.pretrain_batch_images}-lr{b.pretrain_lr:g}-seed{PRETRAIN_SEED}"
    return data_root(recipe) / CACHE_DIR / f"{shape}-{how}"


def resolve_cached_backbone(recipe: Recipe, train: TrainFn, is_main: bool = True, barrier: Callable[[], Any] | None = None) -> Recipe:
    """``recipe`` with ``model.backbone.init: pretrained`` replaced by its cached directory, pretrained first if missing.

    Rank 0 (``is_main``) pretrains under a file lock (concurrent trials of a
    search train it once), the other ranks wait at ``barrier``. Any other
    ``init`` is returned unchanged. ``train``: the training loop's
    ``train_worker`` (passed in: the loop calls this, so this module does not
    import it).
    """
    if recipe.model.backbone.init != CACHED_BACKBONE:
        return recipe
    path = cache_path(recipe)
    if is_main and not is_pretrained_backbone(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not is_pretrained_backbone(path):
                    log.info("pretraining the backbone once into %s (model.backbone.init: pretrained)", path)
                    seeded = recipe.model_copy(update={"train": recipe.train.model_copy(update={"seed": PRETRAIN_SEED})})
                    provenance = pretrain_backbone(seeded, path, train)
                    record_in_manifest(recipe, path, provenance)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if barrier is not None:
        barrier()
    backbone = recipe.model.backbone.model_copy(update={"init": str(path)})
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"backbone": backbone})})


def record_in_manifest(recipe: Recipe, path: Path, provenance: dict[str, Any]) -> None:
    """Add the cached backbone's provenance to its data's manifest (``backbones.<directory name>``), the way the world records its generator."""
    from vlptune.data.prepare import data_root  # torch-free, but data/ only when a backbone was made
    from vlptune.data.shards import read_manifest, write_manifest  # data/ only when a backbone was made (as above)

    root = data_root(recipe)
    with open(path.parent / ".manifest.lock", "w") as lock:  # backbones of other architectures may be recorded at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = read_manifest(root)
            manifest.setdefault(MANIFEST_KEY, {})[path.name] = {"path": f"{CACHE_DIR}/{path.name}", **provenance}
            write_manifest(root, manifest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Writing model shards" bar off while the backbone is saved (one file; the console stays quiet)."""
    from transformers.utils import logging as hf_logging  # transformers: only when a backbone is saved

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def is_pretrained_backbone(path: str | Path) -> bool:
    """Whether ``path`` holds a finished ``save_pretrained`` backbone (weights, config and provenance)."""
    p = Path(path)
    return all((p / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE))


def pretrain_backbone(
    recipe: Recipe, out: str | Path, train: TrainFn, steps: int | None = None, run_dir: str | Path | None = None, quiet: bool = True
) -> dict[str, Any]:
    """Pretrain ``recipe``'s CNN with ``train`` (the loop's ``train_worker``, or a Ray Train run:
    :func:`vlptune.search.backbone.ray_train_fn`) and write it to ``out`` (atomically); returns its provenance.

    ``run_dir`` keeps the training run (TensorBoard events, checkpoint); by
    default a temporary directory next to ``out`` that is removed afterwards.
    """
    import torch  # torch, the loop and the model: only when a backbone is trained

    from vlptune.data.info import DatasetInfo  # imports torch: only when a backbone is trained
    from vlptune.data.prepare import data_root  # imports torch: only when a backbone is trained
    from vlptune.objectives.base import build_pretrainer  # imports torch: only when a backbone is trained
    from vlptune.train.checkpoint import latest_checkpoint, load_checkpoint  # imports torch: only when a backbone is trained
    from vlptune.train.reporting import LocalReporter  # imports torch: only when a backbone is trained

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    precipe = pretrain_recipe(recipe, steps)
    steps = precipe.train.max_steps
    keep_run = run_dir is not None
    run = Path(run_dir) if run_dir is not None else target.parent / f".{target.name}.run-{os.getpid()}"
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    start = time.time()
    try:
        result = train(precipe, LocalReporter(quiet=quiet), run, resume=False)
        if result.get("step") != steps:
            raise RuntimeError(f"backbone pretraining stopped early ({result.get('stop_reason')}) at step {result.get('step')}; run dir {run}")
        checkpoint = result.get("checkpoint") or latest_checkpoint(run)  # a Ray Train run's is the copy Ray kept
        if checkpoint is None:
            raise RuntimeError(f"backbone pretraining left no checkpoint in {run}")
        pretrainer = build_pretrainer(precipe, DatasetInfo.read(data_root(precipe)))
        load_checkpoint(checkpoint, pretrainer, restore_rng_state=False)
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad(), _no_progress_bars():
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
            "batch_images": precipe.data.batch_images,
            "lr": precipe.optim.backbone.lr,
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
