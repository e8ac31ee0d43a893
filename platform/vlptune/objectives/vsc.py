"""MVPTR's visual-semantic contrastive loss (VSC) and the hard ITM negatives it provides.

Needs the two-stage encoder (``model.fusion.unimodal_layers`` > 0). Per step:

1. the in-batch set: every image of the batch that has a positive pair, once
   (images are deduplicated: the backbone ran once per image anyway), with
   ONE caption each, its first positive pair's caption;
2. the uni-modal stage only (:meth:`VLPModel.encode_unimodal`) encodes those
   captions ([CLS] state, MVPTR; or the mean token state with
   ``text_pooling: mean``) and images (mean of the real cells' states), each
   once;
3. linear projection heads map both to ``embed_dim``, L2-normalised; the
   similarity matrix ``S = img @ txt.T`` [B,B] is divided by a learnable
   temperature (initialised at ``temperature``, clamped to
   ``[min_temperature, max_temperature]`` before every use, as ALBEF does);
4. symmetric cross-entropy (image->text and text->image, averaged). Captions
   repeat in the synthetic world (and images may repeat in a padded
   evaluation batch): a column whose caption is the same token sequence as the
   row's own, or whose image is the same record, is a positive too, and the
   target of each row is uniform over its positives (without this, identical
   captions of two images would be pushed apart).

The projection heads and the temperature live on the model (``model.vsc``,
registered while the objectives are built, so in the optimiser's transformer
group and in checkpoints): the ITM objective's hard-negative mode reads the
same similarities through :func:`batch_similarity`, cached in the step
context's view ``"vsc"``, whichever of the two objectives runs first.

Hard negatives for ITM (:func:`hard_negative_pairs`, :func:`itm_negative_texts`):
each image's negative captions are taken among the other images' in-batch
captions by their VSC similarity: ``hard`` (the most similar), ``sampled``
(drawn without replacement from the softmax of the similarities, the
ALBEF/MVPTR scheme), or ``random`` (uniform); positives (the diagonal and
identical captions) are never chosen.

Metrics: ``vsc_loss``, ``vsc_acc`` (in-batch top-1 retrieval accuracy, mean of
the two directions; a positive counts), ``vsc_chance`` (the same for a random
ranking), ``vsc_temp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import ConfigError, Recipe
from vlptune.config.objectives import VSCConfig
from vlptune.data.info import DatasetInfo
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import NO_PREDICTION, Objective, ObjectiveOutput, StepContext, init_head_weights, predicted
from vlptune.objectives.registry import register

VSC_ATTR = "vsc"  # name of the VSC heads on the VLPModel
NegativeMode = Literal["random", "hard", "sampled"]


class VSCHeads(nn.Module):
    """Projection heads and the learnable temperature (attached to the model as ``model.vsc``)."""

    def __init__(self, hidden: int, cfg: VSCConfig):
        super().__init__()
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        self.image_proj = nn.Linear(hidden, cfg.embed_dim)
        init_head_weights(self)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temperature)))
        self.min_temperature = float(cfg.min_temperature)
        self.max_temperature = float(cfg.max_temperature)
        self.text_pooling = cfg.text_pooling

    def temperature(self) -> Tensor:
        with torch.no_grad():  # ALBEF: clamp the parameter itself, so it never drifts out of range
            self.temp.clamp_(self.min_temperature, self.max_temperature)
        return self.temp


@dataclass
class VSCBatch:
    """The in-batch contrastive set of one step."""

    images: Tensor  # int64 [B']: batch image index of each in-batch image
    text_rows: Tensor  # int64 [B']: pair row of each image's caption (its first positive)
    sim: Tensor  # [B',B'] cosine similarities image i vs caption j (with gradient)
    temperature: Tensor  # scalar, the clamped learnable temperature
    positives: Tensor  # bool [B',B']: caption j describes image i (diagonal, identical captions, same record)


def first_positive_rows(pair_image: Tensor, itm_labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(images, rows)``: each image with a positive pair, once, and the row of its first positive."""
    rows = torch.nonzero(itm_labels == 1, as_tuple=True)[0]
    if rows.numel() == 0:
        empty = rows.new_zeros(0)
        return empty, empty
    images = pair_image[rows]
    unique, inverse = torch.unique(images, return_inverse=True)
    first = torch.full((unique.numel(),), pair_image.numel(), dtype=torch.int64, device=rows.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return unique, first


def identical_rows(ids: Tensor, mask: Tensor) -> Tensor:
    """bool [N,N]: rows whose real tokens are the same sequence."""
    ids = ids.masked_fill(mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)


def heads_of(model: nn.Module) -> VSCHeads:
    heads = getattr(model, VSC_ATTR, None)
    if not isinstance(heads, VSCHeads):
        raise ConfigError("the VSC similarities need the vsc objective: give objectives.vsc a weight > 0")
    return heads


def batch_similarity(batch: dict[str, Any], ctx: StepContext) -> VSCBatch:
    """The step's VSC set and similarities (cached as view ``"vsc"``; shared by VSC and ITM's hard negatives)."""

    def build() -> VSCBatch:
        heads = heads_of(ctx.model)
        images, rows = first_positive_rows(batch["pair_image"], batch["itm_labels"])
        text_mask = batch["text_mask"][rows]
        length = max(1, int(text_mask.sum(1).max())) if rows.numel() else 1
        text_ids, text_mask = batch["text_ids"][rows, :length], text_mask[:, :length]
        feats = ctx.images
        uni = ctx.model.encode_unimodal(text_ids, text_mask, feats.feats[images], feats.grid_mask[images])
        text = uni.text_mean if heads.text_pooling == "mean" else uni.text_cls
        txt = F.normalize(heads.text_proj(text).float(), dim=-1)
        img = F.normalize(heads.image_proj(uni.image_emb).float(), dim=-1)
        positives = identical_rows(text_ids, text_mask)
        ids = batch.get("image_ids")
        if ids is not None:
            names = [ids[int(i)] for i in images.tolist()]
            same = torch.tensor([[a == b for b in names] for a in names], dtype=torch.bool, device=positives.device)
            positives = positives | same
        positives = positives | torch.eye(images.numel(), dtype=torch.bool, device=positives.device)
        return VSCBatch(images=images, text_rows=rows, sim=img @ txt.t(), temperature=heads.temperature(), positives=positives)

    return ctx.view("vsc", build)


def hard_negative_pairs(
    sim: Tensor,
    mode: NegativeMode,
    generator: torch.Generator | None = None,
    num: int = 1,
    exclude: Tensor | None = None,
) -> Tensor:
    """Negative columns for every row of a similarity matrix ``sim`` [B,C]: int64 [B,num], -1 where none is left.

    ``exclude`` bool [B,C] marks columns a row must not take (its positives);
    by default the diagonal. ``mode``: ``hard`` takes the ``num`` most similar
    allowed columns; ``sampled`` draws ``num`` without replacement with
    probabilities ``softmax(sim)`` over the allowed columns (pass similarities
    divided by the temperature); ``random`` draws uniformly among them. Random
    draws use the CPU ``generator``. A row with fewer than ``num`` allowed
    columns gets -1 in the remaining slots.
    """
    if sim.dim() != 2:
        raise ValueError(f"hard_negative_pairs: sim must be [B,C]; got {tuple(sim.shape)}")
    if mode not in ("hard", "sampled", "random"):
        raise ValueError(f"hard_negative_pairs: mode must be 'hard', 'sampled' or 'random'; got {mode!r}")
    if num < 1:
        raise ValueError(f"hard_negative_pairs: num must be >= 1; got {num}")
    b, c = sim.shape
    if exclude is None:
        exclude = torch.eye(b, c, dtype=torch.bool, device=sim.device)
    if tuple(exclude.shape) != (b, c):
        raise ValueError(f"hard_negative_pairs: exclude must be [{b},{c}] like sim; got {tuple(exclude.shape)}")
    scores = sim.detach().float().cpu()
    allowed = ~exclude.cpu()
    if mode == "hard":
        keys = scores
    else:
        # Gumbel-top-k: the order of log-weight + Gumbel noise is a draw without
        # replacement proportional to the weights (softmax(sim) or uniform)
        uniform = torch.rand(b, c, generator=generator).clamp(1e-12, 1.0 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))
        keys = scores + gumbel if mode == "sampled" else gumbel
    ranked = keys.masked_fill(~allowed, float("-inf")).argsort(dim=1, descending=True)
    if ranked.shape[1] < num:
        ranked = torch.cat([ranked, ranked.new_full((b, num - ranked.shape[1]), -1)], dim=1)
    slots = torch.arange(num)[None, :]
    out = torch.where(slots < allowed.sum(1)[:, None], ranked[:, :num], torch.full((b, num), -1, dtype=torch.int64))
    return out.to(sim.device)


def itm_negative_texts(batch: dict[str, Any], ctx: StepContext, mode: NegativeMode) -> tuple[Tensor, Tensor, int]:
    """ITM's text side with each image's negative captions chosen by the VSC similarities.

    Returns ``(text_ids, text_mask, replaced)``: the batch's ``text_ids``/
    ``text_mask`` where every negative pair of an image in the VSC set now
    holds another image's in-batch caption (``mode``, see
    :func:`hard_negative_pairs`); a negative that cannot be replaced (no
    allowed caption left) keeps the collate's random caption. Positive pairs
    are untouched.
    """
    vsc = batch_similarity(batch, ctx)
    text_ids, text_mask = batch["text_ids"].clone(), batch["text_mask"].clone()
    labels, pair_image = batch["itm_labels"], batch["pair_image"]
    if vsc.images.numel() < 2:
        return text_ids, text_mask, 0
    negatives = labels == 0
    counts = torch.bincount(pair_image[negatives], minlength=int(pair_image.max()) + 1)
    num = int(counts.max()) if counts.numel() else 0
    if num == 0:
        return text_ids, text_mask, 0
    picks = hard_negative_pairs(vsc.sim.detach() / vsc.temperature.detach(), mode, ctx.generator, num=num, exclude=vsc.positives)
    slot_of_image = torch.full((counts.numel(),), -1, dtype=torch.int64, device=pair_image.device)
    slot_of_image[vsc.images] = torch.arange(vsc.images.numel(), device=pair_image.device)
    replaced = 0
    neg_rows = torch.nonzero(negatives, as_tuple=True)[0]
    rank = torch.zeros_like(counts)
    for row in neg_rows.tolist():  # at most B * itm_negatives rows
        image = int(pair_image[row])
        k = int(rank[image])
        rank[image] += 1
        slot = int(slot_of_image[image])
        if slot < 0:
            continue
        column = int(picks[slot, k])
        if column < 0:
            continue
        source = int(vsc.text_rows[column])
        text_ids[row] = batch["text_ids"][source]
        text_mask[row] = batch["text_mask"][source]
        replaced += 1
    return text_ids, text_mask, replaced


@register("vsc")
class VSC(Objective):
    """In-batch image-text contrastive loss on the uni-modal stage; metrics ``vsc_loss``, ``vsc_acc``, ``vsc_chance``, ``vsc_temp``."""

    needs = ("text_ids", "text_mask", "itm_labels", "pair_image")
    metric_names = ("vsc_loss", "vsc_acc", "vsc_chance", "vsc_temp")

    def __init__(self, cfg: VSCConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        cfg.check_recipe(recipe)
        if getattr(model, VSC_ATTR, None) is not None:
            raise ValueError(f"model.{VSC_ATTR} already exists: build one VSC objective per model")
        heads = VSCHeads(model.hidden_size, cfg)
        ref = next(model.parameters(), None)
        if ref is not None:
            heads.to(ref.device)
        model.add_module(VSC_ATTR, heads)
        self._heads = (heads,)  # registered on the model, not twice

    @property
    def heads(self) -> VSCHeads:
        return self._heads[0]

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        vsc = batch_similarity(batch, ctx)
        n = vsc.images.numel()
        if n < 2:  # no contrast in a batch of one image
            return ObjectiveOutput(self.zero_loss(ctx.images.feats), {"vsc_temp": self.heads.temp.detach()})
        logits = vsc.sim / vsc.temperature
        target = vsc.positives.float()
        i2t = -(F.log_softmax(logits, dim=1) * (target / target.sum(1, keepdim=True))).sum(1).mean()
        t2i = -(F.log_softmax(logits.t(), dim=1) * (target.t() / target.t().sum(1, keepdim=True))).sum(1).mean()
        loss = (i2t + t2i) / 2
        with torch.no_grad():
            pick_i2t, pick_t2i = predicted(logits, 1), predicted(logits.t(), 1)
            hit_i2t = (vsc.positives.gather(1, pick_i2t.clamp(min=0)[:, None])[:, 0] & (pick_i2t != NO_PREDICTION)).float().mean()
            hit_t2i = (vsc.positives.t().gather(1, pick_t2i.clamp(min=0)[:, None])[:, 0] & (pick_t2i != NO_PREDICTION)).float().mean()
            chance = target.mean()
        return ObjectiveOutput(
            loss,
            {"vsc_loss": loss.detach(), "vsc_acc": (hit_i2t + hit_t2i) / 2, "vsc_chance": chance, "vsc_temp": vsc.temperature.detach()},
        )


__all__ = ["VSC", "VSCBatch", "VSCConfig", "VSCHeads", "batch_similarity", "hard_negative_pairs", "itm_negative_texts"]
