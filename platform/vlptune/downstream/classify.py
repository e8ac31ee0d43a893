"""NLVR2 and SNLI-VE: classifiers on the pooled fused states of a record's (text, image) pairs.

* ``nlvr2``: the statement goes through the fusion encoder with each of its
  two images; the two pooled states, concatenated (left, right), feed a
  two-layer binary classifier (UNITER's "pair" setting, SOHO's). Metrics
  (percent): ``acc``; ``consistency``, the share of image-pair sets (the two
  images, in either order) whose every statement is right; ``chance_acc``,
  always answering the train split's majority label.
* ``snli_ve``: a three-way classifier (entailment, neutral, contradiction:
  ``vlptune.data.schema.VE_LABELS``) on the pooled state of (hypothesis,
  image). Metrics: ``acc``, the accuracy on each class (``acc_entailment``,
  ...), ``chance_acc`` (the train majority label).

Both train with cross-entropy.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlptune.config import Recipe
from vlptune.config.downstream import NLVR2Config, SNLIVEConfig, TaskConfig
from vlptune.data.info import DatasetInfo
from vlptune.data.schema import VE_LABELS
from vlptune.downstream.base import PERCENT, RecordTask, TaskHead, majority, mlp_head
from vlptune.downstream.registry import register
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import StepContext, accuracy

NLVR2_IMAGES = 2  # left and right
NLVR2_CLASSES = 2  # false, true


class ClassifierHead(TaskHead):
    """``classes`` outcomes from the concatenated pooled states of a record's ``images`` pairs; labels in ``batch["labels"]``."""

    classes: int = 2
    images: int = 1

    def __init__(self, cfg: TaskConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        width = model.hidden_size * self.images
        self.head = mlp_head(width, width, self.classes)

    def logits(self, batch: dict[str, Any], ctx: StepContext) -> Tensor:
        states = self.pair_states(batch, ctx)
        return self.head(states.reshape(states.shape[0], -1))

    def loss(self, logits: Tensor, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor | float]]:
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels)
        loss_name, acc_name = self.metric_names
        return loss, {loss_name: loss.detach(), acc_name: accuracy(logits, labels) * PERCENT}


class NLVR2Head(ClassifierHead):
    classes = NLVR2_CLASSES
    images = NLVR2_IMAGES
    metric_names = ("nlvr2_loss", "nlvr2_acc")


class VEHead(ClassifierHead):
    classes = len(VE_LABELS)
    metric_names = ("snli_ve_loss", "snli_ve_acc")


class LabelTask(RecordTask):
    """A record task whose label is one integer (``label(row)``)."""

    def __init__(self, cfg: TaskConfig, recipe: Recipe, root: Path):
        super().__init__(cfg, recipe, root)
        self.majority = majority([self.label(r) for r in self.train_rows])

    def label(self, row: dict[str, Any]) -> int:
        return int(row["label"])

    def targets(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        return {"labels": torch.tensor([self.label(r) for r in rows], dtype=torch.int64)}

    def score(self, rows: list[dict[str, Any]], predictions: list[int]) -> dict[str, float]:
        labels = [self.label(r) for r in rows]
        return {
            "acc": PERCENT * sum(p == y for p, y in zip(predictions, labels)) / len(rows),
            "chance_acc": PERCENT * sum(y == self.majority for y in labels) / len(rows),
            "records": float(len(rows)),
        }


@register("nlvr2")
class NLVR2Task(LabelTask):
    head_cls = NLVR2Head
    cfg: NLVR2Config

    def score(self, rows: list[dict[str, Any]], predictions: list[int]) -> dict[str, float]:
        out = super().score(rows, predictions)
        groups: dict[frozenset[str], list[bool]] = defaultdict(list)
        for r, p in zip(rows, predictions):
            groups[frozenset((r["image_id_left"], r["image_id_right"]))].append(p == self.label(r))
        out["consistency"] = PERCENT * sum(all(g) for g in groups.values()) / len(groups)
        return out


@register("snli_ve")
class VETask(LabelTask):
    head_cls = VEHead
    cfg: SNLIVEConfig

    def score(self, rows: list[dict[str, Any]], predictions: list[int]) -> dict[str, float]:
        out = super().score(rows, predictions)
        for k, name in enumerate(VE_LABELS):
            picked = [p == k for r, p in zip(rows, predictions) if self.label(r) == k]
            if picked:
                out[f"acc_{name}"] = PERCENT * sum(picked) / len(picked)
        return out
