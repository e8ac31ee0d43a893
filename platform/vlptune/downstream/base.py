"""What every downstream task shares: the task plug-in, its head, its evaluation.

A task (registered by name, :mod:`vlptune.downstream.registry`) says which
heads the finetuned model trains (:meth:`DownstreamTask.heads`: objectives
in the loop's sense, so the :class:`~vlptune.objectives.base.Pretrainer` runs
them and the one training loop optimises them), which batches it trains on
(:meth:`DownstreamTask.loader`) and what it is scored on; the scoring runs
in :mod:`vlptune.train.finetune` (the train layer owns the evaluation
passes), every key reported as ``downstream/<task>/<key>``.

:class:`RecordTask` is the shape of VQA, NLVR2 and SNLI-VE: a head on the
pooled fused state of each (text, image) pair of a record, trained on the
task's table (:mod:`vlptune.data.task_data`) and scored over the evaluation
split's records (:meth:`RecordTask.score_found`: predictions gathered from
every rank, a record counted once).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from vlptune.config import Recipe
from vlptune.config.downstream import TaskConfig
from vlptune.data.info import DatasetInfo
from vlptune.data.schema import RECORD_ID_FIELD
from vlptune.data.task_data import build_task_loader, read_task_rows
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import BERT_LAYER_NORM_EPS, Objective, ObjectiveOutput, StepContext, init_head_weights
from vlptune.objectives.itm import mean_state, product_state

PERCENT = 100.0  # task metrics are reported in percent, like the papers' tables


def pooled_state(fused: Any, text_mask: Tensor, pooling: str) -> Tensor:
    """What a head reads from a fusion output: [CLS], the mean state or the product state ([Np,D])."""
    if pooling == "cls":
        return cast(Tensor, fused.cls)
    if pooling == "mean":
        return mean_state(fused, text_mask)
    return product_state(fused, text_mask)


def mlp_head(width: int, hidden: int, outputs: int) -> nn.Sequential:
    """The two-layer classifier of UNITER/SOHO heads: Linear, GELU, LayerNorm, Linear."""
    head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=BERT_LAYER_NORM_EPS), nn.Linear(hidden, outputs))
    init_head_weights(head)
    return head


class TaskHead(Objective):
    """A task's head and loss; the Pretrainer runs it like an objective (its metrics are named ``<task>_*``)."""

    needs = ("text_ids", "text_mask", "pair_image")

    def __init__(self, cfg: TaskConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cast(Any, cfg), model, recipe, info)  # Objective keeps cfg and its weight
        self.task_cfg = cfg
        self.pooling: str = getattr(cfg, "pooling", "cls")

    def pair_states(self, batch: dict[str, Any], ctx: StepContext) -> Tensor:
        """The pooled fused state of every (record, image) pair: [N, k, D] for ``pair_image`` [N, k]."""
        pair_image = batch["pair_image"]
        n, k = pair_image.shape
        text_ids = batch["text_ids"].repeat_interleave(k, dim=0)
        text_mask = batch["text_mask"].repeat_interleave(k, dim=0)
        rows = pair_image.reshape(-1)
        feats = ctx.images
        fused = ctx.fuse(text_ids, text_mask, feats.feats[rows], feats.grid_mask[rows])
        return pooled_state(fused, text_mask, self.pooling).view(n, k, -1)

    @abc.abstractmethod
    def logits(self, batch: dict[str, Any], ctx: StepContext) -> Tensor:
        """[N, C] scores of each record's C outcomes."""

    @abc.abstractmethod
    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The task loss of a batch and its training metrics."""

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        logits = self.logits(batch, ctx).float()
        loss, metrics = self.loss(logits, batch)
        return ObjectiveOutput(loss, metrics)


class DownstreamTask(abc.ABC):
    """A downstream task plug-in: heads, training batches, evaluation (module docstring)."""

    name: ClassVar[str] = "task"  # set by @register

    def __init__(self, cfg: TaskConfig, recipe: Recipe, root: Path):
        self.cfg = cfg
        self.recipe = recipe
        self.root = root

    @abc.abstractmethod
    def heads(self, model: VLPModel, info: DatasetInfo) -> dict[str, Objective]:
        """The modules trained on top of the pretrained model, by name (the Pretrainer's objectives)."""

    @abc.abstractmethod
    def loader(self, rank: int, world_size: int) -> DataLoader:
        """The training batches of one rank."""

    def extra_state(self) -> dict[str, Any]:
        """What the finetuned run must remember besides weights (the answer vocabulary), written next to its recipe."""
        return {}


def gather(items: list[Any]) -> list[Any]:
    """Every rank's ``items`` concatenated (the local list when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    boxes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, items)
    return [x for box in boxes for x in box]


def majority(values: Sequence[Any]) -> Any:
    """The most frequent value (the first one seen among ties)."""
    counts: dict[Any, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: counts[v])


class RecordTask(DownstreamTask):
    """VQA, NLVR2, SNLI-VE: one head over the records of a table (module docstring)."""

    head_cls: ClassVar[type[TaskHead]]

    def __init__(self, cfg: TaskConfig, recipe: Recipe, root: Path):
        super().__init__(cfg, recipe, root)
        self.train_rows = read_task_rows(root, cfg.table, cfg.train_split)
        self._eval_loader: DataLoader | None = None

    def heads(self, model: VLPModel, info: DatasetInfo) -> dict[str, Objective]:
        return {self.name: self.head_cls(self.cfg, model, self.recipe, info)}

    @abc.abstractmethod
    def targets(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """The label tensors of a batch's records."""

    @abc.abstractmethod
    def score(self, rows: list[dict[str, Any]], predictions: list[int]) -> dict[str, float]:
        """The task's metrics of ``predictions`` (the argmax outcome of each of ``rows``), chance levels included."""

    def loader(self, rank: int, world_size: int) -> DataLoader:
        cfg = self.cfg
        return build_task_loader(self.recipe, cfg.table, cfg.train_split, cfg.batch_size, self.targets, rank, world_size, train=True, seed=cfg.seed)

    def eval_loader(self) -> DataLoader:
        """The evaluation batches of this rank (the first ``eval_records`` records of ``eval_split``, every one seen), built once."""
        if self._eval_loader is None:
            cfg = self.cfg
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
            self._eval_loader = build_task_loader(
                self.recipe, cfg.table, cfg.eval_split, cfg.batch_size, self.targets, rank, world, train=False, seed=cfg.seed, limit=cfg.eval_records
            )
        return self._eval_loader

    def score_found(self, found: list[tuple[str, int]]) -> dict[str, float]:
        """:meth:`score` of ``(record id, prediction)`` pairs from every rank (padded shares repeat records: each counted once)."""
        key = RECORD_ID_FIELD[self.cfg.table]
        predicted = dict(gather(found))
        rows = [r for r in self.eval_loader().dataset.rows if str(r[key]) in predicted]
        return self.score(rows, [predicted[str(r[key])] for r in rows])
