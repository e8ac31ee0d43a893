"""MVM: mask every grid cell mapped to one visual-dictionary index, predict that index.

SOHO's masked visual modelling. For each positive pair, with probability
``prob``, one VD index is drawn uniformly among the indices present in the
pair's image (valid cells only); every valid cell quantised to that index, and
no other cell, is replaced by a learned [MASK] vector owned by this objective.
The fusion pass (view ``"mvm"``) sees those pairs with their clean text and
the masked grid, and a head (BERT transform + linear over the k codes)
predicts the index at each masked cell. Because all cells of the index are
masked, the answer cannot be copied from a neighbouring cell.

Which pass (``fusion_pass``):

* ``separate`` (SOHO's paper): the text is left clean (the conditional
  masking of UNITER: one modality corrupted at a time), so MVM and MLM use
  separate passes over the positives: three fusion passes per step with ITM's;
* ``shared`` (the SOHO release): the masked cells go into MLM's pass over the
  positives (:func:`~vlptune.objectives.base.masked_view`: masked text and
  masked grid in one sequence) and MVM reads that pass's image states: two
  passes per step. The pairs, codes and cells drawn are the same as in
  ``separate`` (same draws from the step's generator); what changes is that
  MLM sees the masked cells and MVM the masked text. With MLM off the pass is
  MVM's own, as in ``separate``.

A recipe that gives MVM a weight with the VD switched off (``model.vd.size=0``)
is refused before the model is built. A step with nothing to mask (no pair
drawn, or no codes) yields a zero loss and only ``mvm_skipped = 1`` (its loss
and accuracy are left out of the averages rather than counted as zeros).

Chance level. ``mvm_chance`` is the accuracy on this batch of always
answering the code that was masked most often in training so far (a moving
average of the training targets' histogram, ``prior_counts``, momentum
``PRIOR_MOMENTUM``): the best answer that does not look at the image, i.e. what
a model that learnt only the prior over codes scores. It is read before the
batch updates the histogram, and never updated in evaluation.
``mvm_majority`` is the share of the batch's most frequent masked code (what
``mvm_chance`` was before): it knows each batch's answers, so with the few
masked cells of a batch (about 15 on demo-light) it is far above anything a
predictor can reach (docs/training.md, "Why MVM read below chance").

In evaluation (``model.eval()``) every positive pair is masked
(``EVAL_PROB``) instead of ``prob`` of them, so the validation accuracy rests
on twice as many cells at the demo's ``prob`` 0.5; the draws come from the
evaluation's fixed seed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import MVMConfig
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
    majority_share,
    masked_view,
)
from vlptune.objectives.registry import register

PRIOR_MOMENTUM = 0.99  # moving average of the masked-code histogram behind mvm_chance (about the last 100 steps)
EVAL_PROB = 1.0  # share of positive pairs masked in evaluation


def choose_masks(
    codes: Tensor,
    valid: Tensor,
    prob: float,
    num_codes: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick the pairs and the VD index to mask.

    ``codes`` int64 [R,gh,gw] (VD index per cell), ``valid`` bool [R,gh,gw].
    Returns ``selected`` bool [R] (pair drawn with ``prob`` and has a valid
    cell), ``chosen`` int64 [R] (the masked index; meaningless where not
    selected) and ``mask`` bool [R,gh,gw]: True exactly on the valid cells of
    selected pairs whose code is the chosen one. Random numbers come from the
    CPU ``generator``, and the same amount is drawn whatever the outcome, so the
    stream stays aligned across runs and resumes.
    """
    rows = codes.shape[0]
    drawn = (torch.rand(rows, generator=generator) < prob).to(codes.device)
    scores = torch.rand(rows, num_codes, generator=generator).to(codes.device)
    present = torch.zeros(rows, num_codes + 1, dtype=torch.bool, device=codes.device)
    cell_codes = torch.where(valid, codes, torch.full_like(codes, num_codes)).flatten(1)  # invalid -> overflow slot
    present.scatter_(1, cell_codes, True)
    present = present[:, :num_codes]
    chosen = scores.masked_fill(~present, -1.0).argmax(dim=1)  # uniform over the indices present
    selected = drawn & present.any(dim=1)
    mask = valid & (codes == chosen[:, None, None]) & selected[:, None, None]
    return selected, chosen, mask


def release_masks(codes: Tensor, valid: Tensor, position: int, drawn: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The release's choice (``SimpleVDforPreGate``): one grid ``position`` (row-major) for every row.

    Each row drawn (``drawn`` bool [R]) whose cell at ``position`` is real
    masks every real cell carrying the index found there; a row whose cell
    there is padding masks nothing. Returns ``(selected, chosen, mask)`` like
    :func:`choose_masks`.
    """
    flat_codes, flat_valid = codes.flatten(1), valid.flatten(1)
    chosen = flat_codes[:, position].clamp_min(0)
    selected = drawn.to(codes.device) & flat_valid[:, position]
    mask = valid & (codes == chosen[:, None, None]) & selected[:, None, None]
    return selected, chosen, mask


def choose_release_masks(codes: Tensor, valid: Tensor, prob: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`release_masks` with the position drawn uniformly over the batch's grid and each row drawn with ``prob``."""
    cells = codes.shape[1] * codes.shape[2]
    position = int(torch.randint(cells, (1,), generator=generator))
    drawn = torch.rand(codes.shape[0], generator=generator) < prob
    return release_masks(codes, valid, position, drawn)


@register("mvm")
class MVM(Objective):
    """Masked visual modelling on positive pairs; metrics ``mvm_loss``, ``mvm_acc``, ``mvm_chance``, ``mvm_majority``, ``mvm_skipped``."""

    needs = ("text_ids", "text_mask", "itm_labels", "pair_image")
    metric_names = ("mvm_loss", "mvm_acc", "mvm_chance", "mvm_majority", "mvm_skipped")

    def __init__(self, cfg: MVMConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        cfg.check_recipe(recipe)
        self.num_codes = int(recipe.model.vd.size)
        self.prob = float(cfg.prob)
        hidden = model.hidden_size
        self.mask_embedding = nn.Parameter(torch.randn(hidden) * HEAD_INIT_STD)
        self.release_masking = cfg.masking == "release"
        self.cosine = cfg.head == "cosine"
        self.vd = [model.vd]  # a list: the cosine head reads the codes; the VD stays the model's sub-module only
        if not self.cosine:
            self.transform = PredictionTransform(hidden)
            self.decoder = nn.Linear(hidden, self.num_codes)
            init_head_weights(self.decoder)
        self.register_buffer("prior_counts", torch.zeros(self.num_codes))
        self.joins_masked_pass = cfg.fusion_pass == "shared"

    def logits(self, states: Tensor) -> Tensor:
        if self.cosine:  # the release: cosine between the output and every code, no temperature
            vd = self.vd[0]
            assert vd is not None  # check_recipe refuses MVM without a VD
            return F.normalize(states.float(), dim=-1) @ F.normalize(vd.codes.float(), dim=-1).t()
        return self.decoder(self.transform(states))

    def _skipped(self, ref: Tensor) -> ObjectiveOutput:
        return ObjectiveOutput(self.zero_loss(ref), {"mvm_skipped": 1.0})

    def masks(self, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        """``(selected, chosen, mask)`` of :func:`choose_masks` over the positive pairs (``ctx.positive_rows``), drawn once per step.

        Needs the VD's codes (``check_recipe`` refuses MVM without a VD).
        """

        def draw() -> tuple[Tensor, Tensor, Tensor]:
            images = ctx.images
            assert images.codes is not None  # callers check the VD is on
            image_of_pair = ctx.batch["pair_image"][ctx.positive_rows]
            prob = self.prob if self.training else EVAL_PROB
            codes, valid = images.codes[image_of_pair], images.grid_mask[image_of_pair]
            if self.release_masking:
                return choose_release_masks(codes, valid, prob, ctx.generator)
            return choose_masks(codes, valid, prob, self.num_codes, ctx.generator)

        return ctx.view("mvm_masks", draw)

    def masked(self, grid: Tensor, mask: Tensor) -> Tensor:
        """``grid`` [R,D,gh,gw] with the cells of ``mask`` [R,gh,gw] replaced by the learned [MASK] vector."""
        return torch.where(mask[:, None], self.mask_embedding.to(grid.dtype)[None, :, None, None], grid)

    def mask_positive_grid(self, batch: dict[str, Any], ctx: StepContext, grid: Tensor) -> Tensor:
        if ctx.images.codes is None:  # the VD is off: nothing masked
            return grid
        return self.masked(grid, self.masks(ctx)[2])

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        images = ctx.images
        if images.codes is None:  # the VD is off: nothing to predict
            return self._skipped(images.feats)
        rows = ctx.positive_rows
        selected, chosen, mask = self.masks(ctx)
        picked = torch.nonzero(selected, as_tuple=True)[0]
        if picked.numel() == 0:
            return self._skipped(images.feats)
        mask = mask[picked]
        if ctx.grid_masker is self:  # one pass with MLM over every positive (fusion_pass: shared)
            image_states = masked_view(batch, ctx).image_states[picked]
        else:
            pair_rows = rows[picked]
            grid, grid_mask = ctx.pair_grid(pair_rows)
            masked_grid = self.masked(grid, mask)
            out = ctx.view("mvm", lambda: ctx.fuse(batch["text_ids"][pair_rows], batch["text_mask"][pair_rows], masked_grid, grid_mask))
            image_states = out.image_states
        cells = mask.flatten(1)  # row-major (gh, gw), the order of image_states
        states = image_states[cells]
        targets = chosen[picked][:, None].expand_as(cells)[cells]
        logits = self.logits(states).float()
        loss = F.cross_entropy(logits, targets)
        chance = (targets == self.prior_counts.argmax()).float().mean()
        if self.training:
            self.prior_counts.mul_(PRIOR_MOMENTUM).add_(torch.bincount(targets, minlength=self.num_codes).to(self.prior_counts.dtype))
        metrics = {"mvm_loss": loss.detach(), "mvm_acc": accuracy(logits, targets), "mvm_chance": chance, "mvm_majority": majority_share(targets)}
        return ObjectiveOutput(loss, {**metrics, "mvm_skipped": 0.0})
