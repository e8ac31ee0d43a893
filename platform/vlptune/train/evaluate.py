"""Zero-shot image-text retrieval scored by the ITM head, and validation losses.

Retrieval (``evaluate_retrieval``), on the first ``eval.max_images`` images of
``data.val_split`` with ``eval.captions_per_image`` captions each:

1. every image goes through the backbone (and VD) once, in batches of
   ``data.batch_images``; its grid is kept;
2. every (image, caption) pair is scored by the ITM head on the fused [CLS]
   (the match log-odds), ``eval.pair_batch`` pairs per fusion pass;
3. text retrieval (TR: image -> its captions) and image retrieval (IR:
   caption -> its image) recall at 1, 5 and 10, their sum RSUM, and the same
   numbers for a random ranking (chance: IR R@K = K / #images, TR R@K = the
   probability that one of an image's c captions is among K random picks).

Ties count against the query (a caption tied with the ground truth is ranked
above it), so a model that scores everything alike gets chance, not 100%.

With ``eval.candidates = N > 0`` a cheap first pass ranks every pair and only
the top N per query (in each direction) are re-scored with the full grid. The
first pass is the same ITM head on each image reduced to ONE grid cell (the
mean of its real cells): the fusion then sees T+1 tokens instead of
T+gh*gw, which is much cheaper on the large grids of full recipes, and the
ranking comes from the trained ITM head. (Cosine between uni-modal embeddings
would be cheaper still, but no objective here aligns the two embedding spaces,
so that ranking would be close to random.) Candidates rank above
non-candidates; ``cand_recall_tr`` / ``cand_recall_ir`` report how often the
ground truth survived the first pass.

Validation losses (``evaluate_losses``): the objectives' losses and accuracies
on ``eval.loss_batches`` val batches, model in eval mode (no VD update, no
dropout), MVM's random choices from a fixed seed.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vlptune.config import Recipe
from vlptune.config.objectives import pair_scorer_names
from vlptune.data.collate import pad_images
from vlptune.data.dataset import load_retrieval_set
from vlptune.data.text import load_tokenizer, tokenize_texts
from vlptune.io import finite
from vlptune.model.visual_dictionary import perplexity
from vlptune.objectives.base import MetricMeter, Pretrainer, pair_scorer
from vlptune.train.optim import autocast

RECALL_AT = (1, 5, 10)
EVAL_SEED = 1234  # seed of the objectives' randomness during validation: the same draws at every evaluation


# --------------------------------------------------------------------------- metrics


def chance_recall(k: int, candidates: int, relevant: int) -> float:
    """Probability that at least one of ``relevant`` items is among ``k`` drawn at random from ``candidates``."""
    k = min(k, candidates)
    if relevant <= 0:
        return 0.0
    if candidates - relevant < k:
        return 1.0
    return 1.0 - math.comb(candidates - relevant, k) / math.comb(candidates, k)


def gt_ranks(tier: Tensor, score: Tensor, relevant: Tensor) -> Tensor:
    """Rank (0 = first) of the best relevant item per row, pessimistic on ties.

    ``tier`` and ``score`` [Q,C] order the items lexicographically (a higher
    tier first, then a higher score); ``relevant`` bool [Q,C] marks the ground
    truth. The rank is the number of non-relevant items ordered at or above the
    best relevant one. A non-finite score (NaN, an infinity: a diverged model)
    is the lowest score, tied with the others like it: a ground truth scored
    NaN ranks behind every finite candidate and every other NaN one, so a
    model that scores NaN everywhere gets recall 0, never 100.
    """
    neg_inf = torch.finfo(score.dtype).min
    score = torch.where(torch.isfinite(score), score, torch.full_like(score, neg_inf))
    best_tier = torch.where(relevant, tier, torch.full_like(tier, -1)).amax(dim=1, keepdim=True)
    in_best_tier = relevant & (tier == best_tier)
    best_score = torch.where(in_best_tier, score, torch.full_like(score, neg_inf)).amax(dim=1, keepdim=True)
    above = (tier > best_tier) | ((tier == best_tier) & (score >= best_score))
    return (above & ~relevant).sum(dim=1)


def recall_metrics(ranks_tr: Tensor, ranks_ir: Tensor, image_captions: list[int], num_texts: int) -> dict[str, float]:
    """R@1/5/10 for TR and IR, RSUM, and their chance levels (percent)."""
    out: dict[str, float] = {}
    num_images = ranks_tr.numel()
    for k in RECALL_AT:
        out[f"tr_r{k}"] = 100.0 * float((ranks_tr < k).float().mean())
        out[f"ir_r{k}"] = 100.0 * float((ranks_ir < k).float().mean())
        out[f"chance_tr_r{k}"] = 100.0 * sum(chance_recall(k, num_texts, c) for c in image_captions) / num_images
        out[f"chance_ir_r{k}"] = 100.0 * chance_recall(k, num_images, 1)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("tr", "ir") for k in RECALL_AT)
    out["chance_rsum"] = sum(out[f"chance_{d}_r{k}"] for d in ("tr", "ir") for k in RECALL_AT)
    return out


SCORE_KEY = re.compile(r"^(val/\w+_acc|retrieval/(rsum|(tr|ir)_r\d+))$")  # what a diverged model cannot be credited with


def diverged_as_worst(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with every score (:data:`SCORE_KEY`: accuracies, recalls, RSUM) NaN when the
    validation loss is non-finite: a diverged model reports no score, and NaN is the worst value to
    every ranking (:func:`vlptune.io.rank_value`, the searcher, the schedulers, ``vlptune results``).
    Chance levels and counts stay."""
    if "val/loss" not in metrics or finite(metrics["val/loss"]):
        return metrics
    return {k: math.nan if SCORE_KEY.match(k) else v for k, v in metrics.items()}


# --------------------------------------------------------------------------- encoding & scoring


@dataclass
class EncodedImages:
    feats: Tensor  # [N,D,GH,GW] on the device, zero-padded to the set's largest grid
    grid_mask: Tensor  # bool [N,GH,GW]
    codes: list[Tensor]  # per image, int64 [gh,gw] of its own grid (CPU); empty when the VD is off
    extent: Tensor  # int64 [N,2] real (rows, cols) of each image's grid


@torch.no_grad()
def encode_images(model: Any, images: list[Tensor], stride: int, batch: int, device: torch.device, precision: str) -> EncodedImages:
    """Run the backbone (and VD) once per image; pad every grid to the set's largest."""
    feats, masks, codes = [], [], []
    for s in range(0, len(images), batch):
        pixels, pixel_mask, _ = pad_images(images[s : s + batch], stride)
        with autocast(precision, device):
            out = model.encode_images(pixels.to(device), pixel_mask.to(device))
        for b in range(out.feats.shape[0]):
            valid = out.grid_mask[b]
            rows = int(valid.any(dim=1).sum())
            cols = int(valid.any(dim=0).sum())
            feats.append(out.feats[b, :, :rows, :cols].float())
            masks.append(valid[:rows, :cols])
            if out.codes is not None:
                codes.append(out.codes[b, :rows, :cols].cpu())
    gh = max(f.shape[1] for f in feats)
    gw = max(f.shape[2] for f in feats)
    n, d = len(feats), feats[0].shape[0]
    grid = torch.zeros(n, d, gh, gw, device=device)
    mask = torch.zeros(n, gh, gw, dtype=torch.bool, device=device)
    extent = torch.zeros(n, 2, dtype=torch.int64)
    for i, (f, m) in enumerate(zip(feats, masks)):
        grid[i, :, : f.shape[1], : f.shape[2]] = f
        mask[i, : m.shape[0], : m.shape[1]] = m
        extent[i] = torch.tensor([f.shape[1], f.shape[2]])
    return EncodedImages(grid, mask, codes, extent)


def pooled(enc: EncodedImages) -> EncodedImages:
    """Each image reduced to one cell: the mean of its real cells (the cheap first pass's input)."""
    weight = enc.grid_mask.unsqueeze(1).float()
    mean = (enc.feats * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1.0)
    n = mean.shape[0]
    ones = torch.ones(n, 1, 1, dtype=torch.bool, device=mean.device)
    return EncodedImages(mean[:, :, None, None], ones, [], torch.ones(n, 2, dtype=torch.int64))


@torch.no_grad()
def score_pairs(
    model: Any,
    itm: Any,
    enc: EncodedImages,
    text_ids: Tensor,
    text_mask: Tensor,
    image_index: Tensor,
    text_index: Tensor,
    pair_batch: int,
    device: torch.device,
    precision: str,
) -> Tensor:
    """ITM match log-odds of the pairs (image_index[p], text_index[p]), ``pair_batch`` pairs per pass."""
    scores = torch.empty(image_index.numel())
    lengths = text_mask.sum(dim=1)
    for s in range(0, image_index.numel(), pair_batch):
        ii = image_index[s : s + pair_batch]
        tt = text_index[s : s + pair_batch]
        t_len = int(lengths[tt].max())  # trim padding shared by the whole pass
        rows, cols = (int(v) for v in enc.extent[ii].amax(dim=0))
        ii_dev = ii.to(device)
        grid = enc.feats[ii_dev, :, :rows, :cols]
        grid_mask = enc.grid_mask[ii_dev, :rows, :cols]
        ids, mask = text_ids[tt, :t_len].to(device), text_mask[tt, :t_len].to(device)
        with autocast(precision, device):
            out = model.fuse(ids, mask, grid, grid_mask)
            scores[s : s + ii.numel()] = itm.match_score(out, mask).float().cpu()
    return scores


def all_pairs(num_images: int, num_texts: int) -> tuple[Tensor, Tensor]:
    image_index = torch.arange(num_images).repeat_interleave(num_texts)
    text_index = torch.arange(num_texts).repeat(num_images)
    return image_index, text_index


def code_usage(codes: list[Tensor], size: int) -> dict[str, float]:
    """VD usage over the evaluation images: distinct codes, their share of the dictionary, perplexity."""
    if not codes or size <= 0:
        return {}
    flat = torch.cat([c.flatten() for c in codes])
    flat = flat[flat >= 0]
    if flat.numel() == 0:
        return {}
    counts = torch.bincount(flat, minlength=size)
    used = int((counts > 0).sum())
    return {"vd_codes_used": float(used), "vd_code_share": used / size, "vd_perplexity": perplexity(counts)}


# --------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalInputs:
    """The evaluation images and tokenised captions, prepared once per run."""

    images: list[Tensor]  # normalised [3,h,w], CPU
    text_ids: Tensor  # int64 [M,T]
    text_mask: Tensor  # int64 [M,T]
    caption_image: Tensor  # int64 [M]
    image_captions: list[list[int]]
    stride: int

    @classmethod
    def load(cls, recipe: Recipe, tokenizer: Any = None) -> RetrievalInputs:
        rset = load_retrieval_set(recipe)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe.data.tokenizer)
        ids, mask = tokenize_texts(tokenizer, rset.captions, recipe.data.max_text_len)
        stride = int(rset.images[0]["stride"])
        return cls([im["image"] for im in rset.images], ids, mask, rset.caption_image, rset.image_captions, stride)


@torch.no_grad()
def evaluate_retrieval(
    pretrainer: Pretrainer,
    recipe: Recipe,
    inputs: RetrievalInputs,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[dict[str, float], EncodedImages]:
    """Zero-shot TR/IR recall of ``pretrainer`` (which must have an objective that scores pairs, ITM).

    Returns ``(metrics, encoded images)``; metrics are percentages (keys
    ``tr_r1 ... ir_r10``, ``rsum``, ``chance_*``, plus ``images``, ``texts``,
    ``pairs_scored``, ``seconds``; with candidates, ``cand_recall_tr/ir``; with
    the VD on, ``vd_codes_used``, ``vd_code_share`` and ``vd_perplexity`` over
    the evaluation images' cells).
    """
    itm = pair_scorer(pretrainer)
    if itm is None:
        raise ValueError(
            f"zero-shot retrieval is scored by an objective that scores image-text pairs ({', '.join(pair_scorer_names())}): give one a weight > 0"
        )
    start = time.perf_counter()
    model = pretrainer.model
    was_training = pretrainer.training
    pretrainer.eval()
    try:
        enc = encode_images(model, inputs.images, inputs.stride, recipe.data.batch_images, device, precision)
        n, m = len(inputs.images), inputs.text_ids.shape[0]
        relevant = torch.zeros(n, m, dtype=torch.bool)
        relevant[inputs.caption_image, torch.arange(m)] = True
        pair_batch = recipe.eval.pair_batch
        n_cand = recipe.eval.candidates
        metrics: dict[str, float] = {}
        if n_cand == 0 or n_cand >= max(n, m):
            ii, tt = all_pairs(n, m)
            full = score_pairs(model, itm, enc, inputs.text_ids, inputs.text_mask, ii, tt, pair_batch, device, precision).view(n, m)
            tier = torch.zeros(n, m, dtype=torch.int64)
            ranks_tr = gt_ranks(tier, full, relevant)
            ranks_ir = gt_ranks(tier.t(), full.t(), relevant.t())
            scored = n * m
        else:
            ii, tt = all_pairs(n, m)
            cheap = score_pairs(model, itm, pooled(enc), inputs.text_ids, inputs.text_mask, ii, tt, pair_batch, device, precision).view(n, m)
            cand_tr = torch.zeros(n, m, dtype=torch.bool)
            cand_tr.scatter_(1, cheap.topk(min(n_cand, m), dim=1).indices, True)
            cand_ir = torch.zeros(n, m, dtype=torch.bool)
            cand_ir.scatter_(0, cheap.topk(min(n_cand, n), dim=0).indices, True)
            union = cand_tr | cand_ir
            ui, ut = torch.nonzero(union, as_tuple=True)
            full = cheap.clone()
            full[ui, ut] = score_pairs(model, itm, enc, inputs.text_ids, inputs.text_mask, ui, ut, pair_batch, device, precision)
            ranks_tr = gt_ranks(cand_tr.long(), torch.where(cand_tr, full, cheap), relevant)
            ranks_ir = gt_ranks(cand_ir.long().t(), torch.where(cand_ir, full, cheap).t(), relevant.t())
            metrics["cand_recall_tr"] = 100.0 * float((cand_tr & relevant).any(dim=1).float().mean())
            metrics["cand_recall_ir"] = 100.0 * float((cand_ir & relevant).any(dim=0).float().mean())
            scored = n * m + int(union.sum())
        metrics.update(recall_metrics(ranks_tr, ranks_ir, [len(c) for c in inputs.image_captions], m))
        metrics.update(code_usage(enc.codes, getattr(model.vd, "size", 0)))
        metrics.update({"images": float(n), "texts": float(m), "pairs_scored": float(scored), "seconds": time.perf_counter() - start})
        return metrics, enc
    finally:
        pretrainer.train(was_training)


# --------------------------------------------------------------------------- validation losses


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_losses(
    pretrainer: Pretrainer,
    loader: Any,
    max_batches: int,
    device: torch.device,
    precision: str = "fp32",
    seed: int = EVAL_SEED,
) -> dict[str, float]:
    """Mean of every objective metric (and ``loss``) over the first ``max_batches`` batches of ``loader``.

    Under torch.distributed every rank evaluates its own share and the means
    are averaged over ranks (each rank must hold the same objectives).
    """
    if max_batches <= 0:
        return {}
    was_training = pretrainer.training
    pretrainer.eval()
    generator = torch.Generator().manual_seed(seed)
    meter = MetricMeter(pretrainer.metric_names)
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            with autocast(precision, device):
                _, metrics = pretrainer(to_device(batch, device), generator)
            meter.add({k: v for k, v in metrics.items() if not k.startswith("vd_")})
    finally:
        pretrainer.train(was_training)
    meter.all_reduce()
    return meter.means()
