"""Backbone classification: supervised pretraining of the CNN on labelled images (``vlptune backbone pretrain``).

The stand-in for ImageNet pretraining where no weights can be downloaded. The
CNN's last feature map (before the projection, the VD and the Transformer) is
averaged over the cells that cover real pixels (the ResNet's global average
pool, padding left out) and a linear layer predicts, per image, which of the
dataset's object ``classes`` are present and, with ``labels:
classes_and_attributes``, which ``attributes`` (synthetic world: 8 shapes,
then 8 colours and 2 sizes): a multi-label binary cross-entropy, the targets
read from the batch's objects (``obj_labels``, ``obj_attrs``), so any
converted dataset with object labels (Visual Genome) trains through the same
code. Only the CNN and this head learn: nothing else reads the features.

Metrics: ``bcls_loss``; ``bcls_acc``, the share of (image, label) decisions
right at logit 0; ``bcls_chance``, the same for the answer that ignores the
image: each label predicted present when it was present in more than half
of the training images so far (a moving average of the targets, momentum
``PRIOR_MOMENTUM``, read before the batch updates it and frozen in
evaluation, like MVM's); ``bcls_f1`` (micro F1 of the positives, which the
mostly-absent labels cannot inflate) and ``bcls_f1_chance``, the F1 of
predicting every label present (the best constant answer for F1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import BackboneClsConfig
from vlptune.data.info import DatasetInfo
from vlptune.grid import grid_stride
from vlptune.model.backbone import grid_mask_from_pixels
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, StepContext, init_head_weights
from vlptune.objectives.registry import register

PRIOR_MOMENTUM = 0.99  # moving average of the label frequencies behind bcls_chance
CNN_VIEW = "cnn"  # StepContext cache name of the CNN's feature map
PRESENT = 0.5  # a prior above this predicts "present"


def image_targets(obj_labels: Tensor, obj_attrs: Tensor, num_classes: int, with_attributes: bool) -> Tensor:
    """Multi-hot targets [B, classes (+ attributes)]: a class or attribute is on when any object of the image has it.

    ``obj_labels`` int64 [B,O] (-1 on padded objects), ``obj_attrs`` float [B,O,A] (zero rows on padded objects).
    """
    b = obj_labels.shape[0]
    classes = torch.zeros(b, num_classes + 1, dtype=torch.float32, device=obj_labels.device)
    slot = torch.where(obj_labels >= 0, obj_labels, torch.full_like(obj_labels, num_classes))  # padding -> overflow slot
    classes.scatter_(1, slot, 1.0)
    classes = classes[:, :num_classes]
    if not with_attributes:
        return classes
    attrs = obj_attrs.amax(dim=1) if obj_attrs.shape[1] else obj_attrs.new_zeros(b, obj_attrs.shape[2])
    return torch.cat([classes, attrs.float()], dim=1)


def micro_f1(predicted: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Micro F1 of the positive decisions (bool ``predicted``, float 0/1 ``targets``, same shape); ``valid``: decisions that can be right."""
    hits = predicted & (targets > 0)
    tp = (hits if valid is None else hits & valid).sum().float()
    denom = predicted.sum().float() + (targets > 0).sum().float()
    return (2 * tp / denom.clamp_min(1.0)).detach()


@register("backbone_cls")
class BackboneClassification(Objective):
    """Multi-label image classification from the pooled CNN features; metrics ``bcls_loss``, ``bcls_acc``, ``bcls_chance``, ``bcls_f1``, ``bcls_f1_chance``."""

    needs = ("images", "pixel_mask", "obj_labels", "obj_attrs")
    metric_names = ("bcls_loss", "bcls_acc", "bcls_chance", "bcls_f1", "bcls_f1_chance")

    def __init__(self, cfg: BackboneClsConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        known = self.require_info(info)
        self.num_classes = known.num_classes
        self.with_attributes = cfg.labels == "classes_and_attributes"
        outputs = self.num_classes + (known.num_attributes if self.with_attributes else 0)
        if outputs == 0:
            raise ValueError("objectives.backbone_cls: the dataset's manifest lists no object classes or attributes to classify")
        self.stride = grid_stride(1)  # the CNN's own stride, before the projection's pooling
        self.head = nn.Linear(model.backbone.out_channels, outputs)
        init_head_weights(self.head)
        self.register_buffer("prior", torch.zeros(outputs))

    def pooled_features(self, batch: dict[str, Any], ctx: StepContext) -> Tensor:
        """[B, C]: the CNN's last feature map averaged over the cells that cover real pixels."""
        cnn = ctx.view(CNN_VIEW, lambda: ctx.model.backbone(batch["images"]))
        mask = grid_mask_from_pixels(batch["pixel_mask"], self.stride).to(cnn.dtype).unsqueeze(1)
        return (cnn * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp_min(1.0)

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        logits = self.head(self.pooled_features(batch, ctx)).float()
        targets = image_targets(batch["obj_labels"], batch["obj_attrs"], self.num_classes, self.with_attributes)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        predicted = logits > 0
        finite = torch.isfinite(logits)  # a non-finite logit's decision is never right (the rule of objectives.base.predicted)
        prior_answer = (self.prior > PRESENT).unsqueeze(0).expand_as(targets)
        chance = (prior_answer == (targets > 0)).float().mean()
        if self.training:
            with torch.no_grad():
                self.prior.mul_(PRIOR_MOMENTUM).add_(targets.mean(dim=0), alpha=1.0 - PRIOR_MOMENTUM)
        metrics = {
            "bcls_loss": loss.detach(),
            "bcls_acc": ((predicted == (targets > 0)) & finite).float().mean().detach(),
            "bcls_chance": chance.detach(),
            "bcls_f1": micro_f1(predicted, targets, finite),
            "bcls_f1_chance": micro_f1(torch.ones_like(predicted), targets),
        }
        return ObjectiveOutput(loss, metrics)
