"""MLM: predict masked WordPiece tokens from text and image (positive pairs only).

Masking itself (probability, 80/10/10) happens in the data pipeline
(``data.mlm_prob``); this objective owns the head (BERT transform + decoder tied
to the word embeddings) and the loss.

The fusion pass it uses (:func:`~vlptune.objectives.base.masked_view`, view
``"masked"``) holds the positive pairs only, with the masked text
(``mlm_ids``) and the clean image, as in SOHO's paper; with
``objectives.mvm.fusion_pass: shared`` the same pass also carries MVM's masked
grid cells (the SOHO release), and MVM reads its image states. The decoder's
weight is the model's word-embedding matrix itself (tied, not copied), so the
head adds only the transform and a per-token bias.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import MLMConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, PredictionTransform, StepContext, accuracy, majority_share, masked_view
from vlptune.objectives.registry import register

IGNORE_INDEX = -100  # mlm_labels value where there is nothing to predict (see docs/contracts.md)


@register("mlm")
class MLM(Objective):
    """Masked language modelling on positive pairs; metrics ``mlm_loss``, ``mlm_acc``."""

    needs = ("mlm_ids", "mlm_labels", "text_mask", "itm_labels", "pair_image")
    metric_names = ("mlm_loss", "mlm_acc", "mlm_chance")
    reads_masked_pass = True

    def __init__(self, cfg: MLMConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        embeddings = model.word_embeddings
        self.transform = PredictionTransform(model.hidden_size)
        self.bias = nn.Parameter(embeddings.weight.new_zeros(embeddings.num_embeddings))
        # Tied decoder: keep a reference without registering the embedding a second
        # time (it is already a parameter of the model), so state dicts hold it once.
        self._tied: tuple[nn.Embedding] = (embeddings,)

    @property
    def decoder_weight(self) -> Tensor:
        return self._tied[0].weight

    def logits(self, states: Tensor) -> Tensor:
        """Vocabulary logits for fused text states ``[..., H]``."""
        return F.linear(self.transform(states), self.decoder_weight, self.bias)

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        rows = ctx.positive_rows
        out = masked_view(batch, ctx)
        labels = batch["mlm_labels"][rows]
        picked = labels != IGNORE_INDEX
        states = out.text_states[picked]
        if states.shape[0] == 0:  # no token was masked in this batch: nothing to learn
            return ObjectiveOutput(self.zero_loss(out.text_states), {})
        targets = labels[picked]
        logits = self.logits(states).float()
        loss = F.cross_entropy(logits, targets)
        return ObjectiveOutput(loss, {"mlm_loss": loss.detach(), "mlm_acc": accuracy(logits, targets), "mlm_chance": majority_share(targets)})
