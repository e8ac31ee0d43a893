"""PRA: KD-VLP's phrase-region alignment.

On the positive pairs of the shared clean fusion pass (view ``"clean"``, the
one ITM uses; built here over every pair when ITM is off):

* each noun phrase's state is the mean of the final text states over its
  WordPiece span (``phrase_spans``); each object's state is the mean of the
  final image states under its cells (``obj_masks`` on real cells);
* the prediction is ``softmax_o(cos(phrase k, object o) / sim_temperature)``
  over the image's objects, the target ``softmax_o(alpha(k, o) /
  label_temperature)`` where ``alpha`` is the phrase-label similarity in the
  linguistic space (``phrase_obj_sim``, computed at data preparation);
* the loss is ``KL(target || prediction)`` per phrase, averaged over the
  phrases that have a valid span, similarities and at least two objects (with
  one object both distributions are 1: nothing to align).

No parameters of its own: it shapes the encoder's states. Metrics:
``pra_loss``; ``pra_acc``, the share of phrases whose most similar object
(cosine) is the target's most likely object; ``pra_chance``, the mean of
``1 / objects`` over those phrases (a random choice); ``pra_skipped`` = 1 on
a step without any usable phrase (zero loss).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlptune.config import Recipe
from vlptune.config.objectives import PRAConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, StepContext, predicted
from vlptune.objectives.itm import clean_view
from vlptune.objectives.pooling import object_cells, pool_phrases, pool_under_masks
from vlptune.objectives.registry import register


def alignment_loss(
    phrase_states: Tensor,
    object_states: Tensor,
    alpha: Tensor,
    valid: Tensor,
    sim_temperature: float,
    label_temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-phrase KL(target || prediction) over objects.

    ``phrase_states`` [R,K,D], ``object_states`` [R,O,D], ``alpha`` [R,K,O],
    ``valid`` bool [R,K,O] (pairs of a real phrase and a real object with a
    similarity). Returns ``(kl [R,K], used [R,K] bool, hit [R,K] bool, objects
    [R,K])`` where ``used`` marks phrases with at least two valid objects and
    ``hit`` whether the prediction's argmax is the target's.
    """
    cos = F.normalize(phrase_states.float(), dim=-1) @ F.normalize(object_states.float(), dim=-1).transpose(1, 2)  # [R,K,O]
    objects = valid.sum(-1)
    used = objects >= 2
    neg = torch.finfo(torch.float32).min
    logp = torch.log_softmax((cos / sim_temperature).masked_fill(~valid, neg), dim=-1)
    logt = torch.log_softmax((alpha.float() / label_temperature).masked_fill(~valid, neg), dim=-1)
    target = logt.exp() * valid
    kl = (target * (logt - logp)).masked_fill(~valid, 0.0).sum(-1)
    hit = predicted(cos.masked_fill(~valid, neg)) == alpha.float().masked_fill(~valid, neg).argmax(-1)
    return kl, used, hit, objects


@register("pra")
class PRA(Objective):
    """Phrase-region alignment; metrics ``pra_loss``, ``pra_acc``, ``pra_chance``, ``pra_skipped``."""

    needs = ("text_ids", "text_mask", "itm_labels", "pair_image", "obj_masks", "obj_labels", "grid_mask", "phrase_spans", "phrase_obj_sim", "phrase_obj_valid")
    metric_names = ("pra_loss", "pra_acc", "pra_chance", "pra_skipped")

    def __init__(self, cfg: PRAConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.sim_temperature = float(cfg.sim_temperature)
        self.label_temperature = float(cfg.label_temperature)

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        out = clean_view(batch, ctx)
        rows = ctx.positive_rows
        img = batch["pair_image"][rows]
        phrases, phrase_ok = pool_phrases(out.text_states[rows], batch["phrase_spans"][rows])
        cells, object_ok = object_cells(batch["obj_masks"][img], ctx.images.grid_mask[img], batch["obj_labels"][img])
        objects = pool_under_masks(out.image_states[rows], cells)
        valid = batch["phrase_obj_valid"][rows] & phrase_ok[:, :, None] & object_ok[:, None, :]
        kl, used, hit, count = alignment_loss(phrases, objects, batch["phrase_obj_sim"][rows], valid, self.sim_temperature, self.label_temperature)
        n = int(used.sum())
        if n == 0:
            return ObjectiveOutput(self.zero_loss(out.cls), {"pra_skipped": 1.0})
        loss = kl[used].mean()
        return ObjectiveOutput(
            loss,
            {
                "pra_loss": loss.detach(),
                "pra_acc": hit[used].float().mean().detach(),
                "pra_chance": (1.0 / count[used].float()).mean().detach(),
                "pra_skipped": 0.0,
            },
        )
