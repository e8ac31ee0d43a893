"""MVPTR's weakly-supervised phrase grounding (WPG): phrase-to-region max similarity, hinge against another image.

For every positive pair (caption t of image I):

* phrases: the caption's noun phrases (``phrase_spans``), each the mean of its
  tokens' fused states (:func:`vlptune.objectives.pooling.pool_phrases`);
* regions: the image's objects, each the mean of the fused states of the grid
  cells under its box (``obj_masks`` with ``grid_mask``,
  :func:`vlptune.objectives.pooling.pool_under_masks`);
* score ``s(t, I)`` = mean over phrases of the max over regions of the cosine
  similarity (each phrase grounded to its best region, no box supervision);
* a negative image I' (another image of the batch, drawn uniformly with the
  step's objective generator) gives ``s(t, I')`` from a second fusion pass
  (t with I');
* loss = ``max(0, margin - s(t, I) + s(t, I'))``, averaged over the pairs that
  have at least one phrase and a region in both images.

States are the cross-modal (final) fused states. The positive pass is ITM's
``"clean"`` view (every pair, clean text and image) when ITM is active with
its random negatives, so it costs nothing extra; otherwise a pass over the
positives only (view ``"wpg_positive"``). The negative pass is the view
``"wpg_negative"`` over the positives with their negative images.

Metrics: ``wpg_loss``, ``wpg_acc`` (share of pairs with ``s(t,I) > s(t,I')``;
chance 0.5), ``wpg_skipped`` (1 on a step with nothing to ground: one image in
the batch, or no pair with a phrase and regions).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlptune.config import Recipe
from vlptune.config.objectives import WPGConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, StepContext
from vlptune.objectives.itm import clean_view
from vlptune.objectives.pooling import pool_phrases, pool_under_masks
from vlptune.objectives.registry import register


def grounding_score(phrases: Tensor, phrase_valid: Tensor, regions: Tensor, region_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over valid phrases of the max over valid regions of the cosine similarity.

    ``phrases`` [R,K,D], ``phrase_valid`` bool [R,K], ``regions`` [R,O,D],
    ``region_valid`` bool [R,O] -> ``(score [R], ok [R])``; ``ok`` is False
    (and the score 0) for rows without a valid phrase or region.
    """
    cos = torch.einsum("rkd,rod->rko", F.normalize(phrases.float(), dim=-1), F.normalize(regions.float(), dim=-1))
    cos = cos.masked_fill(~region_valid[:, None, :], float("-inf"))
    best = cos.max(dim=2).values  # [R,K]
    ok = phrase_valid.any(1) & region_valid.any(1)
    best = torch.where(phrase_valid & ok[:, None], best, torch.zeros_like(best))
    score = best.sum(1) / phrase_valid.sum(1).clamp_min(1)
    return torch.where(ok, score, torch.zeros_like(score)), ok


def region_states(image_states: Tensor, obj_masks: Tensor, obj_labels: Tensor, grid_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled states of each object's real cells: ``image_states`` [R,G,D], ``obj_masks`` [R,O,gh,gw] -> ([R,O,D], valid [R,O])."""
    cells = obj_masks.flatten(2) & grid_mask.flatten(1)[:, None, :]
    valid = (obj_labels >= 0) & cells.any(-1)
    return pool_under_masks(image_states, cells & valid[..., None]), valid


@register("wpg")
class WPG(Objective):
    """Phrase-region grounding hinge on positive pairs; metrics ``wpg_loss``, ``wpg_acc``, ``wpg_skipped``."""

    needs = ("text_ids", "text_mask", "itm_labels", "pair_image", "phrase_spans", "obj_masks", "obj_labels")
    metric_names = ("wpg_loss", "wpg_acc", "wpg_skipped")

    def __init__(self, cfg: WPGConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.margin = float(cfg.margin)
        itm = recipe.active_objectives().get("itm")
        # ITM's clean pass over every pair holds our positives when ITM keeps its random negatives
        self.share_clean = itm is not None and getattr(itm, "negatives", "random") == "random"

    def _skipped(self, ref: Tensor) -> ObjectiveOutput:
        return ObjectiveOutput(self.zero_loss(ref), {"wpg_skipped": 1.0})

    def negative_images(self, images: Tensor, num_images: int, generator: torch.Generator | None) -> Tensor:
        """For each row's image, another image index drawn uniformly among the other ``num_images - 1``."""
        draw = torch.randint(num_images - 1, (images.numel(),), generator=generator).to(images.device)
        return draw + (draw >= images).long()

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        feats = ctx.images
        num_images = feats.feats.shape[0]
        rows = ctx.positive_rows
        if num_images < 2 or rows.numel() == 0:
            return self._skipped(feats.feats)
        image = batch["pair_image"][rows]
        negative = self.negative_images(image, num_images, ctx.generator)
        spans = batch["phrase_spans"][rows]
        obj_masks, obj_labels, grid_mask = batch["obj_masks"], batch["obj_labels"], feats.grid_mask
        text_ids, text_mask = batch["text_ids"][rows], batch["text_mask"][rows]
        if self.share_clean:
            clean = clean_view(batch, ctx)
            pos_text, pos_image = clean.text_states[rows], clean.image_states[rows]
        else:
            pos = ctx.view("wpg_positive", lambda: ctx.fuse(text_ids, text_mask, feats.feats[image], grid_mask[image]))
            pos_text, pos_image = pos.text_states, pos.image_states
        neg_out = ctx.view("wpg_negative", lambda: ctx.fuse(text_ids, text_mask, feats.feats[negative], grid_mask[negative]))

        phrases, phrase_ok = pool_phrases(pos_text, spans)
        regions, region_ok = region_states(pos_image, obj_masks[image], obj_labels[image], grid_mask[image])
        s_pos, ok_pos = grounding_score(phrases, phrase_ok, regions, region_ok)
        neg_phrases, _ = pool_phrases(neg_out.text_states, spans)
        neg_regions, neg_region_ok = region_states(neg_out.image_states, obj_masks[negative], obj_labels[negative], grid_mask[negative])
        s_neg, ok_neg = grounding_score(neg_phrases, phrase_ok, neg_regions, neg_region_ok)
        ok = ok_pos & ok_neg
        if not bool(ok.any()):
            return self._skipped(feats.feats)
        loss = F.relu(self.margin - s_pos[ok] + s_neg[ok]).mean()
        acc = (s_pos[ok] > s_neg[ok]).float().mean()
        return ObjectiveOutput(loss, {"wpg_loss": loss.detach(), "wpg_acc": acc.detach(), "wpg_skipped": 0.0})


__all__ = ["WPG", "WPGConfig", "grounding_score", "region_states"]
