"""SSUL: the semantic visual loss paper's masked-patch colour regression.

A fraction ``mask_ratio`` of the ``patch_size x patch_size`` pixel patches of
every image (patches that hold at least one real pixel; at least one per
image) is set to 0 in normalised pixel space (the dataset's mean colour) and
the model predicts each masked patch's **mean RGB** (normalised, over its
real pixels) from the visual outputs: a head (BERT transform + linear) on
each grid state; grid states map back to patches by the geometry of the grid
(stride ``s = 32 * model.backbone.pool``):

* ``patch_size`` divides ``s``: each cell predicts the ``(s/patch)^2``
  patches it covers (the head outputs ``3 * (s/patch)^2`` values per cell);
* ``s`` divides ``patch_size``: the states of the ``(patch/s)^2`` cells a
  patch covers are averaged (real cells only) and the head predicts 3 values.

Other combinations are refused (ConfigError naming both fields). The loss is
the L2 (mean squared error over masked patches and channels).

**A second image forward.** The masked pixels need their own backbone pass:
``encode_images`` runs again on the masked batch (view ``"ssul_images"``;
the visual dictionary quantises it in eval mode so the masked pixels never
move the dictionary's codes and the pass runs no collectives; BatchNorm
statistics do see it). With ``source='fusion'`` (default) the masked grid is
then fused with the clean caption of every positive pair (view ``"ssul"``)
and the head reads the final image states; with ``source='grid'`` the head
reads the masked grid features directly (one row per image, no fusion pass).
Cost per step, fusion source: one more backbone forward and backward over the
B images and one more fusion pass over the B*P positive pairs.

Metrics: ``ssul_loss``; ``ssul_baseline``, the MSE of predicting the batch's
mean colour of the masked patches (the chance level); ``ssul_r2 = 1 -
loss / baseline`` (above 0: better than chance).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlptune.config import Recipe
from vlptune.config.objectives import SSULConfig, patch_geometry
from vlptune.data.info import DatasetInfo
from vlptune.grid import grid_stride
from vlptune.model.vlp import VLPModel
from vlptune.objectives.base import Objective, ObjectiveOutput, PredictionTransform, StepContext, init_head_weights
from vlptune.objectives.registry import register

RGB = 3
MASK_VALUE = 0.0  # masked pixels, in normalised space: the dataset's mean colour


def patch_means(images: Tensor, pixel_mask: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """Mean colour of each patch over its real pixels: ``(means [B,ph,pw,3], valid [B,ph,pw] bool)``.

    ``ph = ceil(H / patch)``; a patch without real pixels is invalid (mean 0).
    """
    b, c, h, w = images.shape
    ph, pw = -(-h // patch), -(-w // patch)
    m = pixel_mask.to(images.dtype)[:, None]
    x = F.pad(images * m, (0, pw * patch - w, 0, ph * patch - h))
    m = F.pad(m, (0, pw * patch - w, 0, ph * patch - h))
    sums = x.view(b, c, ph, patch, pw, patch).sum((3, 5))
    counts = m.view(b, 1, ph, patch, pw, patch).sum((3, 5))
    means = sums / counts.clamp_min(1.0)
    return means.permute(0, 2, 3, 1), counts[:, 0] > 0


def choose_patches(valid: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """``round(ratio * valid patches)`` (at least 1) valid patches per image, uniformly: bool [B,ph,pw]."""
    flat = valid.flatten(1)
    scores = torch.rand(flat.shape, generator=generator).to(valid.device).masked_fill(~flat, 2.0)
    rank = scores.argsort(1).argsort(1)
    n = (flat.sum(1).float() * ratio).round().long().clamp_min(1)
    n = torch.minimum(n, flat.sum(1))
    return ((rank < n[:, None]) & flat).view_as(valid)


def mask_pixels(images: Tensor, patches: Tensor, patch: int, value: float = MASK_VALUE) -> Tensor:
    """``images`` [B,3,H,W] with the pixels of the True patches of ``patches`` [B,ph,pw] set to ``value``."""
    h, w = images.shape[-2:]
    pixels = patches.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, :h, :w]
    return images.masked_fill(pixels[:, None], value)


def encode_masked(model: nn.Module, images: Tensor, pixel_mask: Tensor) -> Any:
    """``model.encode_images`` with the visual dictionary (if any) in eval mode: no code updates, no collectives."""
    vd = getattr(model, "vd", None)
    was_training = vd.training if vd is not None else False
    if vd is not None:
        vd.train(False)
    try:
        return model.encode_images(images, pixel_mask)
    finally:
        if vd is not None:
            vd.train(was_training)


def cells_to_patches(values: Tensor, gh: int, gw: int, sub: int) -> Tensor:
    """Per-cell predictions [R, gh*gw, 3*sub*sub] -> per-patch [R, gh*sub, gw*sub, 3] (row-major sub-patches)."""
    r = values.shape[0]
    v = values.view(r, gh, gw, sub, sub, RGB).permute(0, 1, 3, 2, 4, 5)
    return v.reshape(r, gh * sub, gw * sub, RGB)


def pool_cells(states: Tensor, valid: Tensor, gh: int, gw: int, group: int) -> Tensor:
    """Mean of real cells' states over ``group x group`` blocks: [R, gh*gw, D] -> [R, ceil(gh/g), ceil(gw/g), D]."""
    r, _, d = states.shape
    x = (states * valid[..., None].to(states.dtype)).transpose(1, 2).reshape(r, d, gh, gw)
    m = valid.to(states.dtype).view(r, 1, gh, gw)
    sums = F.avg_pool2d(x, group, ceil_mode=True)
    counts = F.avg_pool2d(m, group, ceil_mode=True)
    return (sums / counts.clamp_min(1e-12)).permute(0, 2, 3, 1)


@register("ssul")
class SSUL(Objective):
    """Masked-patch mean-colour regression; metrics ``ssul_loss``, ``ssul_baseline``, ``ssul_r2``."""

    needs = ("images", "pixel_mask", "text_ids", "text_mask", "itm_labels", "pair_image")
    metric_names = ("ssul_loss", "ssul_baseline", "ssul_r2")

    def __init__(self, cfg: SSULConfig, model: VLPModel, recipe: Recipe, info: DatasetInfo | None = None):
        super().__init__(cfg, model, recipe, info)
        self.stride = grid_stride(recipe.model.backbone.pool)
        self.patch = int(cfg.patch_size)
        self.sub, self.group = patch_geometry(self.patch, self.stride)
        self.ratio = float(cfg.mask_ratio)
        self.source = cfg.source
        hidden = model.hidden_size
        self.head = nn.Sequential(PredictionTransform(hidden), nn.Linear(hidden, RGB * self.sub * self.sub))
        init_head_weights(self.head)

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> ObjectiveOutput:
        _ = ctx.images  # the clean pass first: it initialises the VD that the masked pass only reads
        images, pixel_mask = batch["images"], batch["pixel_mask"]
        targets, patch_ok = patch_means(images, pixel_mask, self.patch)
        masked = choose_patches(patch_ok, self.ratio, ctx.generator)
        feats = ctx.view("ssul_images", lambda: encode_masked(ctx.model, mask_pixels(images, masked, self.patch), pixel_mask))
        gh, gw = feats.feats.shape[-2:]
        if self.source == "fusion":
            rows = ctx.positive_rows
            img = batch["pair_image"][rows]
            out = ctx.view("ssul", lambda: ctx.fuse(batch["text_ids"][rows], batch["text_mask"][rows], feats.feats[img], feats.grid_mask[img]))
            states, valid = out.image_states, out.image_mask
        else:
            img = torch.arange(images.shape[0], device=images.device)
            states, valid = feats.feats.flatten(2).transpose(1, 2), feats.grid_mask.flatten(1)
        if self.group == 1:
            pred = cells_to_patches(self.head(states), gh, gw, self.sub)
        else:
            pred = self.head(pool_cells(states, valid, gh, gw, self.group))
        ph, pw = targets.shape[1:3]
        pred = pred[:, :ph, :pw].float()
        sel = masked[img]
        got, want = pred[sel], targets[img][sel].float()
        loss = F.mse_loss(got, want)
        baseline = ((want - want.mean(0, keepdim=True)) ** 2).mean()
        r2 = 1.0 - loss.detach() / baseline.clamp_min(1e-12)
        return ObjectiveOutput(loss, {"ssul_loss": loss.detach(), "ssul_baseline": baseline.detach(), "ssul_r2": r2})
