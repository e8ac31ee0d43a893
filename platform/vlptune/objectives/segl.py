"""SEGL: the semantic visual loss paper's per-cell segmentation loss.

A 1x1 convolution (a linear layer per grid cell) maps the visual outputs to
the dataset's segmentation classes (``vocabularies.segmentation_classes``;
the synthetic world: background + one per shape) and a cross-entropy is taken
against ``seg``, the majority class of each cell's pixels (255 = ignored:
cells outside the image, images without a map).

``source='fusion'`` (default) reads the final image states of the shared
clean fusion pass (view ``"clean"``, the one ITM uses) on positive pairs;
``source='grid'`` reads the grid features before fusion, one row per image.

Metrics: ``segl_loss``, ``segl_acc`` (cell accuracy over labelled cells),
``segl_chance`` (share of the batch's most frequent class among those cells:
the accuracy of always answering it); ``segl_class_acc``, the mean over the
classes present in the batch of each class's recall (background dominates
small grids, this one does not reward answering "background"), and
``segl_class_chance = 1 / classes present`` (what any constant answer gets);
``segl_skipped`` (1 on a step without any labelled cell: zero loss).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from vlptune.config import Recipe
from vlptune.config.objectives import SEGLConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, StepContext, accuracy, init_head_weights, predicted
from vlptune.objectives.pooling import visual_states
from vlptune.objectives.registry import register

SEG_IGNORE = 255  # the collate's class of unlabelled cells


@register("segl")
class SEGL(Objective):
    """Segmentation of the grid; metrics ``segl_loss``, ``segl_acc``, ``segl_chance``, ``segl_skipped``."""

    needs = ("seg", "text_ids", "text_mask", "itm_labels", "pair_image")
    metric_names = ("segl_loss", "segl_acc", "segl_chance", "segl_class_acc", "segl_class_chance", "segl_skipped")

    def __init__(self, cfg: SEGLConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.num_classes = self.require_info(info).num_segmentation_classes
        self.source = cfg.source
        self.head = nn.Linear(model.hidden_size, self.num_classes)
        init_head_weights(self.head)

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        states, valid, img = visual_states(batch, ctx, self.source)
        targets = batch["seg"][img].flatten(1)  # [R, gh*gw], row-major like the states
        labelled = valid & (targets != SEG_IGNORE)
        if not bool(labelled.any()):
            return ObjectiveOutput(self.zero_loss(states), {"segl_skipped": 1.0})
        wanted = targets[labelled]
        bad = wanted >= self.num_classes
        if bool(bad.any()):
            raise ValueError(
                f"segl: batch key 'seg' holds class {int(wanted[bad].max())}, but the dataset manifest lists "
                f"{self.num_classes} segmentation_classes (255 is the only other value allowed)"
            )
        logits = self.head(states[labelled]).float()
        loss = F.cross_entropy(logits, wanted)
        counts = wanted.bincount(minlength=self.num_classes)
        chance = counts.max().float() / wanted.numel()
        hits = wanted[predicted(logits) == wanted].bincount(minlength=self.num_classes)
        present = counts > 0
        class_acc = (hits[present].float() / counts[present].float()).mean()
        return ObjectiveOutput(
            loss,
            {
                "segl_loss": loss.detach(),
                "segl_acc": accuracy(logits, wanted),
                "segl_chance": chance.detach(),
                "segl_class_acc": class_acc.detach(),
                "segl_class_chance": 1.0 / float(present.sum()),
                "segl_skipped": 0.0,
            },
        )
