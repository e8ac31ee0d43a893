"""OMVM: KD-VLP's object-guided masked vision modelling.

For each positive pair, with probability ``prob``, one object of its image is
chosen and every real grid cell its box overlaps is replaced by a learned
[MASK] vector (owned by this objective) before fusion. The fusion pass (view
``"omvm"``) sees those pairs with their clean text and the masked grid; the
final image states are averaged under the object's cells and two heads
distil the detector:

* **MRC** (masked region classification): cross-entropy over the object
  classes (``vocabularies.classes`` of the dataset) against the object's label;
* **MRFR** (masked region feature regression): L2 (mean squared error over
  the feature's dimensions) to the object's RoI feature (``obj_roi``). Objects
  without a RoI feature (``obj_has_roi`` False: real data without detector
  features) are left out of MRFR and counted in ``omvm_mrfr_skipped``.

The loss is ``mrc_weight * MRC + mrfr_weight * MRFR``.

Which object (``sampling``):

* ``guided`` (KD-VLP's knowledge-guided masking): object ``o`` of a pair is
  drawn with probability ``softmax_o(max_k alpha(k, o) / guide_temperature)``
  over the image's objects, where ``alpha(k, o)`` is the phrase-label
  similarity between the caption's noun phrase ``k`` and the object's label
  (``phrase_obj_sim``, computed at data preparation). Objects named by the
  caption are therefore masked most, so the text tells what to recover. A pair
  whose record has no similarity (or no phrase) falls back to uniform and is
  counted in ``omvm_unguided``.
* ``random`` (the paper's RandomMVM ablation row): uniform over the objects.

Candidates are the image's real objects that cover at least one real cell.
Random numbers come from the step's CPU generator, the same amount whatever
the outcome. A step with nothing to mask yields a zero loss and only
``omvm_skipped = 1``. ``omvm_mrc_chance`` is the accuracy of always answering
the most frequent masked class of the batch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import OMVMConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import (
    HEAD_INIT_STD,
    Objective,
    ObjectiveOutput,
    PredictionTransform,
    StepContext,
    accuracy,
    init_head_weights,
)
from vlptune.objectives.pooling import object_cells, pool_under_masks
from vlptune.objectives.registry import register

log = logging.getLogger(__name__)


def sampling_probabilities(
    candidates: Tensor,
    sim: Tensor | None,
    sim_valid: Tensor | None,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """P(object) [R,O] over ``candidates`` [R,O] (bool) and whether each row was guided [R] (bool).

    ``sim`` / ``sim_valid`` [R,K,O]: phrase-label similarity and its validity
    (None: random sampling). A row is guided when some valid (phrase, candidate)
    similarity exists; its score per object is the max over valid phrases,
    objects without a valid score get the lowest score of the row. Unguided
    rows are uniform over their candidates. Rows without candidates are all 0.
    """
    rows, objects = candidates.shape
    uniform = candidates.float()
    uniform = uniform / uniform.sum(1, keepdim=True).clamp_min(1.0)
    if sim is None or sim_valid is None:
        return uniform, torch.zeros(rows, dtype=torch.bool, device=candidates.device)
    valid = sim_valid & candidates[:, None, :]
    scores = sim.float().masked_fill(~valid, float("-inf")).amax(1)  # [R,O]
    scored = valid.any(1)
    guided = scored.any(1)
    floor = torch.where(scored, scores, torch.full_like(scores, float("inf"))).amin(1, keepdim=True)
    scores = torch.where(scored, scores, floor.expand_as(scores))  # unscored candidates: lowest score
    logits = (scores / temperature).masked_fill(~candidates, float("-inf"))
    logits = torch.where(guided[:, None], logits, torch.zeros_like(logits))
    guided_p = torch.softmax(logits, dim=1)
    probs = torch.where(guided[:, None], torch.nan_to_num(guided_p, nan=0.0), uniform)
    return probs, guided


def choose_objects(probs: Tensor, prob: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw one object per row from ``probs`` [R,O]: ``(selected [R] bool, chosen [R] int64)``.

    A row is selected with probability ``prob`` when it has a candidate
    (positive mass). Two uniform numbers per row come from the CPU
    ``generator`` whatever happens, so the stream stays aligned.
    """
    rows = probs.shape[0]
    drawn = (torch.rand(rows, generator=generator) < prob).to(probs.device)
    u = torch.rand(rows, 1, generator=generator).to(probs.device, probs.dtype)
    mass = probs.sum(1, keepdim=True)
    cdf = torch.cumsum(probs, dim=1) / mass.clamp_min(1e-12)
    chosen = (cdf <= u).sum(1).clamp_max(probs.shape[1] - 1)  # inverse CDF
    # never land on a zero-probability object (ties at the end of the cdf)
    fallback = probs.argmax(1)
    chosen = torch.where(probs.gather(1, chosen[:, None])[:, 0] > 0, chosen, fallback)
    selected = drawn & (mass[:, 0] > 0)
    return selected, chosen


@register("omvm")
class OMVM(Objective):
    """Object-guided masked vision modelling; metrics ``omvm_*`` (see the module docstring)."""

    needs = (
        "text_ids",
        "text_mask",
        "itm_labels",
        "pair_image",
        "obj_masks",
        "obj_labels",
        "obj_roi",
        "obj_has_roi",
        "grid_mask",
        "phrase_spans",
        "phrase_obj_sim",
        "phrase_obj_valid",
    )
    metric_names = (
        "omvm_loss",
        "omvm_mrc_loss",
        "omvm_mrc_acc",
        "omvm_mrc_chance",
        "omvm_mrfr_loss",
        "omvm_mrfr_skipped",
        "omvm_unguided",
        "omvm_skipped",
    )

    def __init__(self, cfg: OMVMConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        cfg.check_recipe(recipe)
        info = self.require_info(info)
        self.num_classes, self.roi_dim = info.num_classes, info.roi_feature_dim
        self.sampling = cfg.sampling
        self.guide_temperature = float(cfg.guide_temperature)
        self.prob = float(cfg.prob)
        self.mrc_weight = float(cfg.mrc_weight)
        self.mrfr_weight = float(cfg.mrfr_weight)
        hidden = model.hidden_size
        self.mask_embedding = nn.Parameter(torch.randn(hidden) * HEAD_INIT_STD)
        self.mrc = nn.Sequential(PredictionTransform(hidden), nn.Linear(hidden, self.num_classes))
        self.mrfr = nn.Sequential(PredictionTransform(hidden), nn.Linear(hidden, self.roi_dim))
        init_head_weights(self.mrc)
        init_head_weights(self.mrfr)

    def _skipped(self, ref: Tensor) -> ObjectiveOutput:
        return ObjectiveOutput(self.zero_loss(ref), {"omvm_skipped": 1.0})

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        images = ctx.images
        rows = ctx.positive_rows
        image_of_pair = batch["pair_image"][rows]
        grid_mask = images.grid_mask[image_of_pair]
        cells, candidates = object_cells(batch["obj_masks"][image_of_pair], grid_mask, batch["obj_labels"][image_of_pair])
        if self.sampling == "guided":
            spans_ok = batch["phrase_spans"][rows][..., 0] >= 0  # [R,K]
            sim_valid = batch["phrase_obj_valid"][rows] & spans_ok[..., None]
            probs, guided = sampling_probabilities(candidates, batch["phrase_obj_sim"][rows], sim_valid, self.guide_temperature)
        else:
            probs, guided = sampling_probabilities(candidates, None, None, self.guide_temperature)
        selected, chosen = choose_objects(probs, self.prob, ctx.generator)
        picked = torch.nonzero(selected, as_tuple=True)[0]
        if picked.numel() == 0:
            return self._skipped(images.feats)
        pair_rows = rows[picked]
        obj = chosen[picked]
        img = image_of_pair[picked]
        mask = cells[picked, obj]  # [M, gh*gw]
        grid, gmask = ctx.pair_grid(pair_rows)
        grid_shape = grid.shape
        masked_grid = torch.where(mask.view(-1, 1, grid_shape[2], grid_shape[3]), self.mask_embedding.to(grid.dtype)[None, :, None, None], grid)
        out = ctx.view("omvm", lambda: ctx.fuse(batch["text_ids"][pair_rows], batch["text_mask"][pair_rows], masked_grid, gmask))
        pooled = pool_under_masks(out.image_states, mask[:, None, :])[:, 0]  # [M, D]

        labels = batch["obj_labels"][img, obj]
        logits = self.mrc(pooled).float()
        mrc = F.cross_entropy(logits, labels)
        chance = torch.bincount(labels, minlength=1).max().float() / labels.numel()
        metrics: dict[str, Any] = {
            "omvm_mrc_loss": mrc.detach(),
            "omvm_mrc_acc": accuracy(logits, labels),
            "omvm_mrc_chance": chance.detach(),
            "omvm_unguided": float((~guided[picked]).sum()) / picked.numel() if self.sampling == "guided" else 1.0,
            "omvm_skipped": 0.0,
        }
        loss = self.mrc_weight * mrc
        has_roi = batch["obj_has_roi"][img, obj]
        metrics["omvm_mrfr_skipped"] = float((~has_roi).sum())
        if self.mrfr_weight > 0 and bool(has_roi.any()):
            pred = self.mrfr(pooled[has_roi]).float()
            target = batch["obj_roi"][img[has_roi], obj[has_roi]].float()
            mrfr = F.mse_loss(pred, target)
            metrics["omvm_mrfr_loss"] = mrfr.detach()
            loss = loss + self.mrfr_weight * mrfr
        elif self.mrfr_weight > 0:
            log.debug("omvm: %d masked object(s) without a RoI feature, MRFR skipped this step", int((~has_roi).sum()))
        metrics["omvm_loss"] = loss.detach()
        return ObjectiveOutput(loss, metrics)
