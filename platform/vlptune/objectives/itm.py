"""ITM: binary image-text match on the fused sequence, SOHO batching.

Each image comes with ``data.itm_positives`` matching and ``data.itm_negatives``
non-matching captions; the head classifies every pair. The fusion pass (view
``"clean"``) sees the clean text (``text_ids``, not the MLM-masked ids) and the
clean image, so a masked token or a masked grid cell can never tell a pair
apart. The same head scores pairs for zero-shot retrieval
(:meth:`ITM.match_score`).

What the head reads (``pooling``), an ablation knob:

* ``cls``: the fused [CLS] state, as in SOHO (the default). A pretrained BERT's
  [CLS] barely moves when the image changes at first (measured on demo-light:
  replacing the grid by noise changes [CLS] by 0.5% of its norm), so ITM sits
  at chance until the encoder learns to route the image into [CLS];
* ``mean``: the mean of every real text and image state, which sees the image
  states directly (memorises a fixed batch in ~10 steps where ``cls`` needs ~60);
* ``product``: the element-wise product of the mean text state and the mean
  image state, a bilinear match feature a linear head can read (on demo-light,
  ITM alone left chance after ~400 steps with it, not with the other two).

Negatives (``negatives``): ``random`` keeps the collate's negatives (captions of
other images drawn at random, SOHO); ``hard`` and ``sampled`` replace each
image's negative captions by other images' in-batch captions chosen by MVPTR's
VSC similarities (the most similar, or drawn by softmax; see
:func:`vlptune.objectives.vsc.itm_negative_texts`), which needs the ``vsc``
objective. The pass then runs on its own view (``"itm_hard"`` /
``"itm_sampled"``), since its negatives differ from the clean pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import ITMConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, StepContext, accuracy, init_head_weights
from vlptune.objectives.registry import register
from vlptune.objectives.vsc import itm_negative_texts

ITM_CLASSES = 2  # 0: the caption does not describe the image, 1: it does


def clean_view(batch: dict[str, Any], ctx: StepContext) -> Any:
    """The fusion pass over every pair with clean text and clean image (shared by name ``"clean"``)."""
    return ctx.view("clean", lambda: ctx.fuse(batch["text_ids"], batch["text_mask"], *ctx.pair_grid(None)))


def product_state(fused: Any, text_mask: Tensor) -> Tensor:
    """Element-wise product of the mean real text state and the mean real image state of each pair: [Np,D]."""
    text_w = text_mask.to(fused.text_states.dtype).unsqueeze(-1)
    image_w = fused.image_mask.to(fused.image_states.dtype).unsqueeze(-1)
    text = (fused.text_states * text_w).sum(dim=1) / text_w.sum(dim=1).clamp_min(1.0)
    image = (fused.image_states * image_w).sum(dim=1) / image_w.sum(dim=1).clamp_min(1.0)
    return text * image


def mean_state(fused: Any, text_mask: Tensor) -> Tensor:
    """Mean of the real text and image states of each pair: [Np,D]."""
    states = torch.cat([fused.text_states, fused.image_states], dim=1)
    real = torch.cat([text_mask.bool(), fused.image_mask.bool()], dim=1).unsqueeze(-1).to(states.dtype)
    return (states * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)


@register("itm")
class ITM(Objective):
    """Image-text matching over all pairs; metrics ``itm_loss``, ``itm_acc``."""

    needs = ("text_ids", "text_mask", "itm_labels", "pair_image")
    metric_names = ("itm_loss", "itm_acc")

    def __init__(self, cfg: ITMConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.pooling = cfg.pooling
        self.negatives = cfg.negatives
        hidden = model.hidden_size
        # BERT's pooler (dense + tanh; the fusion model drops its own) then the classifier.
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, ITM_CLASSES))
        init_head_weights(self.head)

    def pair_logits(self, fused: Any, text_mask: Tensor) -> Tensor:
        """[Np,2] logits of a fusion output (``text_mask`` [Np,T] marks its real tokens)."""
        if self.pooling == "cls":
            pooled = fused.cls
        elif self.pooling == "mean":
            pooled = mean_state(fused, text_mask)
        else:
            pooled = product_state(fused, text_mask)
        return self.head(pooled)

    def match_score(self, fused: Any, text_mask: Tensor) -> Tensor:
        """Log-odds that each pair matches (higher = better match); used to rank retrieval candidates."""
        logits = self.pair_logits(fused, text_mask).float()
        return logits[:, 1] - logits[:, 0]

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        text_mask = batch["text_mask"]
        if self.negatives == "random":
            out = clean_view(batch, ctx)
        else:
            text_ids, text_mask, _ = itm_negative_texts(batch, ctx, self.negatives)
            out = ctx.view(f"itm_{self.negatives}", lambda: ctx.fuse(text_ids, text_mask, *ctx.pair_grid(None)))
        logits = self.pair_logits(out, text_mask).float()
        labels = batch["itm_labels"]
        loss = F.cross_entropy(logits, labels)
        return ObjectiveOutput(loss, {"itm_loss": loss.detach(), "itm_acc": accuracy(logits, labels)})
