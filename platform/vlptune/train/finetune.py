"""The finetune mode of the one training loop: a pretrained checkpoint, a downstream task, the same loop.

``finetune_worker(pretrain_recipe, task, checkpoint, reporter, out_dir)``
runs on one worker, in-process (``vlptune finetune``) or on every Ray Train
worker (DDP), exactly like ``train_worker``, which it calls with a
:class:`FinetunePlan`: the loop then

* builds the pretrained model plus the task's heads (:meth:`FinetunePlan.build`):
  ``VLPModel`` from the pretraining recipe, the weights of the checkpoint
  loaded into it (weights only: the CNN, the visual dictionary's codes, the
  fusion encoder; retrieval also takes the pretrained ITM head; no optimiser
  state, no data position), the heads freshly initialised from the task's seed;
* trains on the task's batches (:meth:`DownstreamTask.loader`) with the
  task's optimiser settings (:func:`finetune_recipe`: the papers' defaults of
  :mod:`vlptune.config.downstream`, no augmentation);
* evaluates the task (:class:`TaskEvaluation`: every key reported as
  ``downstream/<task>/<metric>``) every ``eval_every`` steps (default once
  per epoch), checkpoints at each evaluation, and stops early after
  ``patience`` evaluations without a better main metric;
* keeps the best checkpoint by the main metric when it ends; the returned
  metrics are the best evaluation's (what the papers report: the
  early-stopped model).

``checkpoint=None`` finetunes from random initialisation (the baseline that
shows what pretraining is worth). The run directory holds TensorBoard
events, the finetuning ``recipe.yaml``, ``finetune.json`` (task, source
checkpoint, the best evaluation, the run's result, the task's own state such
as the VQA answer vocabulary) and
``checkpoints/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from vlptune.config import Recipe
from vlptune.config.downstream import TaskConfig, metric_key, validate_task
from vlptune.data.dataset import ShardDataset
from vlptune.data.info import DatasetInfo
from vlptune.data.schema import RECORD_ID_FIELD
from vlptune.downstream import registry
from vlptune.downstream.base import DownstreamTask, RecordTask
from vlptune.downstream.captioning import CaptioningTask
from vlptune.downstream.retrieval import RetrievalTask
from vlptune.io import atomic_write_text, finite
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Pretrainer, StepContext, prepare_dataset
from vlptune.train import checkpoint as ckpt
from vlptune.train.evaluate import RetrievalInputs, evaluate_retrieval, to_device
from vlptune.train.loop import Dist, Evaluation, train_worker
from vlptune.train.optim import autocast
from vlptune.train.reporting import Reporter
from vlptune.train.tensorboard import HParamsPlan

log = logging.getLogger("vlptune.finetune")

FINETUNE_STATE = "finetune.json"  # in the finetune run directory
STOP_EARLY = "early_stop"
MODEL_PREFIX = "model."  # the VLPModel's keys in a Pretrainer's state dict
MAX_KEPT = 1000  # train.keep_checkpoints' bound


# --------------------------------------------------------------------------- the source checkpoint


def load_pretrained(pretrainer: Pretrainer, checkpoint: Path, model_keys: set[str] | None = None) -> list[str]:
    """Load a pretraining checkpoint's weights into the finetuning model; returns the head keys taken over too.

    Every ``model.*`` tensor of the pretraining recipe's model (``model_keys``,
    default all: a task head may add modules to the model, e.g. captioning's
    decoder) must be there with its shape (CheckpointError otherwise: another
    recipe's checkpoint); any other tensor is taken when the checkpoint has
    one of the same name and shape (retrieval's ITM head, a pretrained decoder).
    """
    state = json.loads((checkpoint / ckpt.STATE_FILE).read_text())
    tensors = load_file(str(checkpoint / ckpt.MODEL_FILE))
    for alias, source in state.get("aliases", {}).items():
        tensors[alias] = tensors[source]
    target = pretrainer.state_dict()
    wanted = {k: v for k, v in tensors.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    required = {MODEL_PREFIX + k for k in model_keys} if model_keys is not None else {k for k in target if k.startswith(MODEL_PREFIX)}
    missing = [k for k in target if k in required and k not in wanted]
    if missing:
        raise ckpt.CheckpointError(
            f"{checkpoint}: the checkpoint does not fit the pretraining recipe's model (missing or reshaped: {missing[:8]}); was it written by another recipe?"
        )
    pretrainer.load_state_dict(wanted, strict=False)
    return sorted(k for k in wanted if k not in required)


# --------------------------------------------------------------------------- the finetuning recipe


def train_size(task: DownstreamTask, recipe: Recipe) -> int:
    """Training records of the task (retrieval: images of the train split)."""
    if isinstance(task, RecordTask):
        return len(task.train_rows)
    return ShardDataset(recipe, task.cfg.train_split, train=False).total


def finetune_recipe(pretrain: Recipe, task: str, cfg: TaskConfig, steps_per_epoch: int) -> Recipe:
    """The loop's recipe for finetuning ``pretrain``'s model on ``task``: the task's budget, optimiser and evaluation, no augmentation."""
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = min(max_steps, cfg.eval_every or steps_per_epoch)
    milestones = cfg.decay_fractions()  # fractions of the run: with a fixed max_steps the decays scale with it
    evaluations = max_steps // eval_every + 1
    optim = pretrain.optim.model_copy(
        update={
            "transformer": pretrain.optim.transformer.model_copy(update={"lr": cfg.lr}),
            "backbone": pretrain.optim.backbone.model_copy(update={"lr": cfg.backbone_lr or pretrain.optim.backbone.lr}),
            "schedule": "step" if milestones else "cosine",
            "step_milestones": milestones or pretrain.optim.step_milestones,
            "step_gamma": cfg.gamma,
            "min_lr_ratio": cfg.min_lr_ratio,
            "warmup_steps": cfg.warmup_steps,
            "global_batch": 0,
        }
    )
    data = pretrain.data.model_copy(update={"hflip_prob": 0.0, "random_resized_crop": False, "batch_images": cfg.batch_size})
    train = pretrain.train.model_copy(
        update={
            "max_steps": max_steps,
            "eval_every": eval_every,
            "checkpoint_every": 0,
            "seed": cfg.seed,
            "keep_checkpoints": min(MAX_KEPT, cfg.patience + 1 if cfg.patience else evaluations),
            "keep_when_done": "best",
        }
    )
    ev = pretrain.eval.model_copy(update={"loss_batches": 0, "vd_picture_codes": 0})
    return pretrain.model_copy(update={"name": f"{pretrain.name}-{task}", "optim": optim, "data": data, "train": train, "eval": ev, "downstream": {task: cfg}})


# --------------------------------------------------------------------------- the loop's hook


class TaskEvaluation(Evaluation):
    """The loop's evaluation in finetune mode: the task's metrics, ``downstream/<task>/*``, equal on every rank."""

    def __init__(self, task: DownstreamTask, recipe: Recipe, workers: Dist, device: torch.device, precision: str):
        super().__init__(recipe, workers, device, precision)
        self.task = task

    def _evaluate(self, pretrainer: Pretrainer) -> tuple[dict[str, float], torch.Tensor | None]:
        if isinstance(self.task, RecordTask):
            metrics = self._records(self.task, pretrainer)
        else:
            metrics = {}
            if self.workers.is_main and isinstance(self.task, RetrievalTask):
                ranking = self.task.ranking_recipe()
                if self._retrieval is None:
                    self._retrieval = RetrievalInputs.load(ranking)
                metrics, _ = evaluate_retrieval(pretrainer, ranking, self._retrieval, self.device, self.precision)
            elif self.workers.is_main and isinstance(self.task, CaptioningTask):
                with autocast(self.precision, self.device):
                    metrics = self.task.evaluate(pretrainer, self.device)
            if self.workers.active:
                box = [metrics]
                dist.broadcast_object_list(box, src=0)
                metrics = box[0]
        return {metric_key(self.task.name, k): v for k, v in metrics.items()}, None

    @torch.no_grad()
    def _records(self, task: RecordTask, pretrainer: Pretrainer) -> dict[str, float]:
        head = pretrainer.objectives[task.name]
        field = RECORD_ID_FIELD[task.cfg.table]
        was_training = pretrainer.training
        pretrainer.eval()
        found: list[tuple[str, int]] = []
        try:
            for batch in task.eval_loader():
                ids = [str(r[field]) for r in batch["rows"]]
                batch = to_device(batch, self.device)
                with autocast(self.precision, self.device):
                    logits = head.logits(batch, StepContext(pretrainer.model, batch))
                found.extend(zip(ids, logits.float().argmax(-1).tolist()))
        finally:
            pretrainer.train(was_training)
        return task.score_found(found)


class FinetunePlan:
    """What ``train_worker(..., finetune=plan)`` does differently (module docstring); tracks the best evaluation."""

    def __init__(self, task: DownstreamTask, pretrained: Path | None):
        self.task = task
        self.cfg = task.cfg
        self.pretrained = pretrained
        self.metric = metric_key(task.name, self.cfg.main_metric)
        self.mode = self.cfg.mode
        self.best: dict[str, Any] = {}
        self.since_best = 0
        self.heads_loaded: list[str] = []

    @property
    def ranking(self) -> tuple[str, str]:
        """``(metric, mode)`` the run's checkpoints are ranked by."""
        return self.metric, self.mode

    def build(self, recipe: Recipe, info: DatasetInfo) -> Pretrainer:
        model = VLPModel(recipe)
        model_keys = set(model.state_dict())  # before the heads: what the pretraining checkpoint must hold
        torch.manual_seed(self.cfg.seed)  # the heads' initial weights: the task's seed
        pretrainer = Pretrainer(model, self.task.heads(model, info))
        if self.pretrained is not None:
            self.heads_loaded = load_pretrained(pretrainer, self.pretrained, model_keys)
            log.info("finetuning %s from %s (heads taken over: %s)", self.task.name, self.pretrained, ", ".join(self.heads_loaded) or "none")
        return pretrainer

    def loader(self, workers: Dist) -> Any:
        return self.task.loader(workers.rank, workers.world_size)

    def evaluation(self, recipe: Recipe, workers: Dist, device: torch.device, precision: str) -> TaskEvaluation:
        return TaskEvaluation(self.task, recipe, workers, device, precision)

    def better(self, value: float) -> bool:
        if not finite(value):
            return False  # NaN / inf: the worst value
        if not self.best:
            return True
        old = float(self.best[self.metric])
        return value > old if self.mode == "max" else value < old

    def stop(self, result: dict[str, Any]) -> str | None:
        """After an evaluation: a stop reason when ``patience`` evaluations in a row did not improve the main metric."""
        value = float(result.get(self.metric, float("nan")))
        if self.better(value):
            self.best = dict(result)
            self.since_best = 0
            return None
        self.since_best += 1
        if self.cfg.patience and self.since_best >= self.cfg.patience:
            best = self.best.get(self.metric, float("nan"))
            return f"{STOP_EARLY}: {self.metric} did not improve on {best:.4g} for {self.since_best} evaluations (downstream.{self.task.name}.patience={self.cfg.patience})"
        return None


# --------------------------------------------------------------------------- the worker function


def build_task(pretrain: Recipe, task: str) -> tuple[DownstreamTask, Recipe, TaskConfig]:
    """The task plug-in over the pretraining recipe's data, its config (the recipe's ``downstream.<task>`` or the defaults) and the loop's recipe."""
    cfg = validate_task(task, pretrain.downstream.get(task))
    impl = registry.get(task)
    root = prepare_dataset(pretrain).root
    probe = impl(cfg, pretrain.model_copy(update={"data": pretrain.data.model_copy(update={"batch_images": cfg.batch_size})}), root)
    workers = Dist.detect()
    steps_per_epoch = max(1, train_size(probe, probe.recipe) // (cfg.batch_size * workers.world_size))
    recipe = finetune_recipe(pretrain, task, cfg, steps_per_epoch)
    return impl(cfg, recipe, root), recipe, cfg


def finetune_worker(
    pretrain: Recipe | dict,
    task: str,
    checkpoint: str | os.PathLike | None,
    reporter: Reporter,
    out_dir: str | os.PathLike,
    resume: bool = True,
    hparams: HParamsPlan | None = None,
) -> dict[str, Any]:
    """Finetune ``checkpoint`` (None: random initialisation) on ``task`` on this worker; returns the best evaluation's metrics.

    ``pretrain`` is the pretraining recipe (its ``downstream.<task>`` section
    configures the task). The result also holds the loop's summary
    (``step``, ``stop_reason``, ...), ``checkpoint`` (the best one kept) and
    ``pretrained`` (the source checkpoint).
    """
    pretrain = pretrain if isinstance(pretrain, Recipe) else Recipe.model_validate(pretrain)
    workers = Dist.detect()
    if workers.is_main:
        built = build_task(pretrain, task)
    workers.barrier()  # rank 0 prepared the data first
    if not workers.is_main:
        built = build_task(pretrain, task)
    impl, recipe, cfg = built
    source = Path(checkpoint) if checkpoint is not None else None
    plan = FinetunePlan(impl, source)
    run_dir = Path(out_dir)
    result = train_worker(recipe, reporter, run_dir, resume=resume, hparams=hparams, finetune=plan)
    kept = None
    if workers.is_main:
        kept = ckpt.finish_checkpoints(run_dir, "best", plan.metric, plan.mode)
        state = {
            "task": task,
            "pretrained": str(source) if source else None,
            "metric": plan.metric,
            "best": plan.best,
            "heads_loaded": plan.heads_loaded,
            **impl.extra_state(),
        }
    final = {**result, **{k: v for k, v in plan.best.items() if k.startswith(metric_key(task, ""))}}
    final.update(
        {
            "checkpoint": str(kept) if kept is not None else result.get("checkpoint"),
            "pretrained": str(source) if source else None,
            "best_step": plan.best.get("step"),
        }
    )
    if workers.is_main:
        state["result"] = final  # what a Ray Train run's driver returns (search/finetune.py)
        atomic_write_text(run_dir / FINETUNE_STATE, json.dumps(state, indent=1, default=str) + "\n")
    return final
