"""Pooling helpers shared by objectives: states averaged under object masks and over phrase spans.

``pool_under_masks`` averages grid states under each object's cells (KD-VLP's
object states, MVPTR's region states); ``pool_phrases`` averages token states
over each noun phrase's WordPiece span. Both are differentiable and padding
aware: an empty mask or a padded span pools to zeros and is reported invalid.
``object_cells`` and ``visual_states`` are the other shared pieces of the
dense visual objectives (OMVM, PRA, SSUL, SEGL, SPL).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlptune.objectives.itm import clean_view


def pool_under_masks(states: Tensor, masks: Tensor) -> Tensor:
    """Mean of ``states`` [N,L,D] over the True positions of each mask ``masks`` [N,O,L] (bool) -> [N,O,D].

    Rows whose mask is empty get zeros (no NaN). Use ``masks.any(-1)`` for the
    validity of each pooled vector.
    """
    if states.dim() != 3 or masks.dim() != 3:
        raise ValueError(f"pool_under_masks: states must be [N,L,D] and masks [N,O,L]; got {tuple(states.shape)} and {tuple(masks.shape)}")
    if masks.shape[0] != states.shape[0] or masks.shape[2] != states.shape[1]:
        raise ValueError(f"pool_under_masks: masks {tuple(masks.shape)} do not match states {tuple(states.shape)} (need [N,O,L] with N, L of states)")
    weights = masks.to(states.dtype)
    summed = torch.bmm(weights, states)  # [N,O,D]
    counts = weights.sum(-1, keepdim=True).clamp_min(1.0)
    return summed / counts


def span_masks(spans: Tensor, length: int) -> Tensor:
    """Token masks [N,K,T] (bool) of spans [N,K,2] ``[start, end)``; padded (-1) or empty spans give all-False rows."""
    if spans.dim() != 3 or spans.shape[-1] != 2:
        raise ValueError(f"span_masks: spans must be [N,K,2]; got {tuple(spans.shape)}")
    start = spans[..., 0].clamp_min(0)
    end = spans[..., 1].clamp(min=0, max=length)
    valid = (spans[..., 0] >= 0) & (spans[..., 1] > spans[..., 0])
    pos = torch.arange(length, device=spans.device)
    mask = (pos >= start[..., None]) & (pos < end[..., None])
    return mask & valid[..., None]


def pool_phrases(text_states: Tensor, spans: Tensor) -> tuple[Tensor, Tensor]:
    """Mean token state of each phrase: ``text_states`` [N,T,D], ``spans`` [N,K,2] (-1 padded) -> ([N,K,D], valid [N,K] bool).

    A phrase is valid when its span is not padding and covers at least one
    token inside ``T``; invalid phrases pool to zeros.
    """
    if text_states.dim() != 3:
        raise ValueError(f"pool_phrases: text_states must be [N,T,D]; got {tuple(text_states.shape)}")
    if spans.shape[0] != text_states.shape[0]:
        raise ValueError(f"pool_phrases: spans {tuple(spans.shape)} and text_states {tuple(text_states.shape)} differ in N")
    masks = span_masks(spans.to(text_states.device), text_states.shape[1])
    return pool_under_masks(text_states, masks), masks.any(-1)


def object_cells(obj_masks: Tensor, grid_mask: Tensor, obj_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Objects' cells restricted to real grid cells, flattened: ([R,O,gh*gw] bool, valid [R,O] bool).

    ``obj_masks`` [R,O,gh,gw], ``grid_mask`` [R,gh,gw], ``obj_labels`` [R,O]
    (already gathered per row). An object is valid when it is real (label >= 0)
    and covers at least one real cell.
    """
    cells = (obj_masks & grid_mask[:, None]).flatten(2)
    return cells, cells.any(-1) & (obj_labels >= 0)


def visual_states(batch: dict[str, Any], ctx: Any, source: str) -> tuple[Tensor, Tensor, Tensor]:
    """The "visual outputs" a dense visual head reads: ``(states [R,L,D], valid [R,L] bool, image [R] int64)``.

    ``source='fusion'``: the final image states of the shared clean fusion pass
    (view ``"clean"``, the one ITM uses), positive pairs only (R = positive
    pairs; each sees its image through its own caption). ``source='grid'``:
    the visual encoder's grid features before fusion (``ctx.images.feats``),
    one row per image (R = B), no text. L = gh*gw in row-major order.
    """
    if source == "fusion":
        rows = ctx.positive_rows
        out = clean_view(batch, ctx)
        return out.image_states[rows], out.image_mask[rows], batch["pair_image"][rows]
    if source == "grid":
        feats = ctx.images
        states = feats.feats.flatten(2).transpose(1, 2)
        return states, feats.grid_mask.flatten(1), torch.arange(states.shape[0], device=states.device)
    raise ValueError(f"visual_states: source must be 'fusion' or 'grid', got {source!r}")
