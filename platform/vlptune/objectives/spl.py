"""SPL: the semantic visual loss paper's set prediction of object labels.

A small Transformer decoder (``layers`` layers, ``queries`` learned queries;
the paper tries 36 and 100) attends to the visual outputs; each query's
state goes through a linear classifier over the dataset's object classes
(``vocabularies.classes``) plus "no object". Per row, the queries are matched
one-to-one to the image's object labels (``obj_labels``) by the Hungarian
algorithm (:func:`vlptune.objectives.matching.batched_hungarian_match`, cost
= minus the predicted probability of the label); matched queries learn their
label, the others "no object", by a cross-entropy whose "no object" class is
down-weighted by ``no_object_weight`` (DETR's 0.1), averaged with those
weights. With more objects than queries, the unmatched objects are left out.

``source='fusion'`` (default) decodes from the final image states of the
shared clean fusion pass (view ``"clean"``, the one ITM uses) on positive
pairs; ``source='grid'`` from the grid features before fusion, one row per
image. Padded cells are masked out of the decoder's cross-attention.

Metrics: ``spl_loss``; ``spl_acc``, the share of matched queries whose argmax
is their label; ``spl_chance``, the share of the batch's most frequent label
among the matched targets (always answering it); ``spl_noobj_acc``, the
share of unmatched queries that answer "no object".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlptune.config import ConfigError, Recipe
from vlptune.config.objectives import SPLConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import HEAD_INIT_STD, Objective, ObjectiveOutput, StepContext, init_head_weights, predicted
from vlptune.objectives.matching import batched_hungarian_match
from vlptune.objectives.pooling import visual_states
from vlptune.objectives.registry import register

HEAD_DIM = 64  # default attention head width: heads = hidden // 64


def match_targets(probs: torch.Tensor, labels: torch.Tensor, no_object: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian targets per query: ``probs`` [R,Q,C+1], ``labels`` [R,O] (-1 padded) -> (targets [R,Q], matched [R,Q] bool).

    Cost of giving object ``t`` to query ``q`` = ``-probs[q, label_t]``.
    Unmatched queries get ``no_object``.
    """
    r, q, _ = probs.shape
    real = labels >= 0
    counts = real.sum(1)
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real labels first, in order
    packed = labels.gather(1, order).clamp_min(0)  # [R,O]
    cost = -probs.detach().gather(2, packed[:, None, :].expand(r, q, packed.shape[1]))  # [R,Q,O]
    targets = torch.full((r, q), no_object, dtype=torch.int64)
    matched = torch.zeros(r, q, dtype=torch.bool)
    packed_cpu = packed.cpu()
    for i, (rows, cols) in enumerate(batched_hungarian_match(cost, counts)):
        targets[i, rows] = packed_cpu[i, cols]
        matched[i, rows] = True
    return targets.to(probs.device), matched.to(probs.device)


@register("spl")
class SPL(Objective):
    """Object-label set prediction; metrics ``spl_loss``, ``spl_acc``, ``spl_chance``, ``spl_noobj_acc``."""

    needs = ("obj_labels", "text_ids", "text_mask", "itm_labels", "pair_image")
    metric_names = ("spl_loss", "spl_acc", "spl_chance", "spl_noobj_acc")

    @staticmethod
    def _heads(cfg: SPLConfig, hidden: int) -> int:
        heads = cfg.heads or max(1, hidden // HEAD_DIM)
        if hidden % heads:
            raise ConfigError(f"objectives.spl.heads={heads} does not divide the hidden size {hidden}; pick a divisor (0 = hidden / {HEAD_DIM})")
        return heads

    def __init__(self, cfg: SPLConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.num_classes = self.require_info(info).num_classes
        self.no_object = self.num_classes
        self.source = cfg.source
        hidden = model.hidden_size
        layer = nn.TransformerDecoderLayer(
            hidden,
            self._heads(cfg, hidden),
            dim_feedforward=4 * hidden,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.layers, norm=nn.LayerNorm(hidden))
        self.queries = nn.Parameter(torch.randn(cfg.queries, hidden) * HEAD_INIT_STD)
        self.classifier = nn.Linear(hidden, self.num_classes + 1)
        init_head_weights(self.decoder)
        init_head_weights(self.classifier)
        weight = torch.ones(self.num_classes + 1)
        weight[self.no_object] = float(cfg.no_object_weight)
        self.register_buffer("class_weight", weight, persistent=False)

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        states, valid, img = visual_states(batch, ctx, self.source)
        labels = batch["obj_labels"][img]
        if bool((labels >= self.num_classes).any()):
            raise ValueError(f"spl: batch key 'obj_labels' holds class {int(labels.max())}, but the dataset manifest lists {self.num_classes} classes")
        queries = self.queries.to(states.dtype)[None].expand(states.shape[0], -1, -1)
        hidden = self.decoder(queries, states, memory_key_padding_mask=~valid)
        logits = self.classifier(hidden).float()  # [R,Q,C+1]
        targets, matched = match_targets(logits.softmax(-1), labels, self.no_object)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), weight=self.class_weight)
        pred = predicted(logits)
        metrics: dict[str, Any] = {"spl_loss": loss.detach()}
        if bool(matched.any()):
            wanted = targets[matched]
            metrics["spl_acc"] = (pred[matched] == wanted).float().mean().detach()
            metrics["spl_chance"] = (wanted.bincount(minlength=1).max().float() / wanted.numel()).detach()
        if bool((~matched).any()):
            metrics["spl_noobj_acc"] = (pred[~matched] == self.no_object).float().mean().detach()
        return ObjectiveOutput(loss, metrics)
