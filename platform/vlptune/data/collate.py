"""SOHO batching: samples of :class:`~vlptune.data.dataset.ShardDataset` -> the training batch.

The batch is exactly the table "Training batch" of docs/contracts.md. Each
image appears once (the backbone runs once per image); it is paired with P
positive captions drawn from its own captions and N negative captions drawn
from the captions of the other images of the batch. A negative is never a
caption of the same image (same ``image_id``) and, while any other choice
exists, never a string identical to one of the image's own captions (the
synthetic world repeats sentences). When the batch cannot supply N such
captions (a one-image batch, say), the sample's ``distractors`` (captions of
other records, attached by the dataset) fill the gap.

MLM masking is applied to positive pairs only; negatives keep
``mlm_ids == text_ids`` and ``mlm_labels == -100``.

Determinism: every random choice (positives, negatives, masking) comes from
one seed derived from the samples' ``seed`` fields, which the dataset derives
from ``train.seed``, the epoch and the record's position; the same samples
give the same batch, in any worker process.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import numpy as np
import torch

from vlptune.config import DataConfig, Recipe
from vlptune.data.schema import DataError
from vlptune.data.text import MLMMasker, char_to_token_spans, encode
from vlptune.grid import grid_shape, grid_stride

SEG_IGNORE = 255  # segmentation class of cells outside the image (and of images without a map)
SEG_CLASSES = 256  # uint8 maps


def batch_seed(samples: Sequence[dict], salt: int = 0) -> int:
    seeds = [int(s.get("seed", 0)) & 0xFFFFFFFFFFFFFFFF for s in samples]
    words = [w for x in seeds for w in (x & 0xFFFFFFFF, x >> 32)]
    state = np.random.SeedSequence(words + [len(samples), salt & 0xFFFFFFFF]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def box_cells(box: Sequence[float], stride: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """Grid cells ``(r0, r1, c0, c1)`` (half-open) that a pixel box ``(x0,y0,x1,y1)`` overlaps.

    Limited to ``rows x cols`` (the image's own cells); a degenerate box still
    covers the cell it lies in.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    c0 = min(max(int(math.floor(x0 / stride)), 0), cols - 1)
    r0 = min(max(int(math.floor(y0 / stride)), 0), rows - 1)
    c1 = min(max(int(math.ceil(x1 / stride)), c0 + 1), cols)
    r1 = min(max(int(math.ceil(y1 / stride)), r0 + 1), rows)
    return r0, r1, c0, c1


def seg_to_grid(seg: np.ndarray | None, gh: int, gw: int, stride: int, height: int, width: int) -> torch.Tensor:
    """Majority class of each cell's real pixels, int64 [gh, gw]; 255 outside the image.

    Ties go to the smaller class id; ``seg=None`` gives 255 everywhere.
    """
    out = np.full((gh, gw), SEG_IGNORE, dtype=np.int64)
    if seg is not None:
        h, w = seg.shape
        if (h, w) != (height, width):
            raise DataError(f"segmentation map is {w}x{h}, its image {width}x{height}")
        ch, cw = grid_shape(h, w, stride)
        cell = (np.arange(h) // stride)[:, None] * cw + (np.arange(w) // stride)[None, :]
        flat = cell * SEG_CLASSES + seg.astype(np.int64)
        counts = np.bincount(flat.ravel(), minlength=ch * cw * SEG_CLASSES).reshape(ch * cw, SEG_CLASSES)
        out[:ch, :cw] = counts.argmax(axis=1).reshape(ch, cw)
    return torch.from_numpy(out)


class SOHOCollate:
    """``collate(samples) -> batch`` of docs/contracts.md (see the module docstring).

    ``manifest``: the dataset's manifest (vocabulary sizes for ``obj_attrs`` and
    ``obj_roi``); read from ``data.root`` when not given. ``train`` is recorded
    for callers; pairing and masking are the same (and seeded) in evaluation,
    so validation MLM/ITM losses exist and are comparable between evaluations.
    """

    def __init__(self, recipe: Recipe, tokenizer: Any, manifest: dict[str, Any], train: bool = True):
        data = recipe.data
        self.train = train
        self.P = data.itm_positives
        self.N = data.itm_negatives
        self.max_len = data.max_text_len
        self.stride = grid_stride(recipe.model.backbone.pool)
        self.sides = bucket_sides(data, self.stride)
        self.tokenizer = tokenizer
        self.masker = MLMMasker(tokenizer, data.mlm_prob)
        vocab = manifest["vocabularies"]
        self.num_attributes = len(vocab["attributes"])
        self.roi_dim = int(vocab["roi_feature_dim"])

    # -- pairs -------------------------------------------------------------

    def _positives(self, caps: Sequence[str], rng: random.Random) -> list[int]:
        if len(caps) >= self.P:
            return rng.sample(range(len(caps)), self.P)
        order = list(range(len(caps)))
        rng.shuffle(order)
        return order + [rng.randrange(len(caps)) for _ in range(self.P - len(caps))]

    def _negatives(self, b: int, samples: Sequence[dict], rng: random.Random) -> list[tuple[str, list]]:
        """N (caption, phrase spans) of other images for image ``b``."""
        if self.N == 0:
            return []
        me = samples[b]
        own_id, own_text = me["image_id"], set(me["captions"])
        in_batch: list[tuple[str, list]] = []
        pool: list[tuple[str, list]] = []
        loose: list[tuple[str, list]] = []
        for j, s in enumerate(samples):
            if s["image_id"] == own_id:
                continue
            for c, ph in zip(s["captions"], s["phrases"]):
                (in_batch if c not in own_text else loose).append((c, ph))
        for d in me.get("distractors", ()):
            if d["image_id"] == own_id:
                continue
            for c, ph in zip(d["captions"], d["phrases"]):
                (pool if c not in own_text else loose).append((c, ph))
        chosen: list[tuple[str, list]] = []
        for group in (in_batch, pool, loose):
            if len(chosen) == self.N:
                break
            take = min(self.N - len(chosen), len(group))
            chosen.extend(rng.sample(group, take))
        if not chosen:
            raise DataError(
                f"image {own_id}: no caption of another image to use as an ITM negative "
                "(the batch holds one image and the dataset found no other record); "
                "use more records or data.itm_negatives=0"
            )
        while len(chosen) < self.N:  # fewer distinct candidates than N: repeat
            chosen.append(chosen[rng.randrange(len(chosen))])
        return chosen

    # -- the batch ---------------------------------------------------------

    def __call__(self, samples: Sequence[dict]) -> dict:
        skipped = sum(len(s.get("skipped", ())) for s in samples)
        samples = [s for s in samples if not s.get("corrupt")]
        if not samples:
            raise DataError(f"every sample of this batch is corrupt ({skipped} records skipped); check the data with `vlptune data verify`")
        seed = batch_seed(samples)
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        B, P, N = len(samples), self.P, self.N

        # images and grid
        images, pixel_mask, grid_mask = pad_images([s["image"] for s in samples], self.stride, self.sides)
        H, W = images.shape[-2:]
        gh, gw = grid_shape(H, W, self.stride)

        # pairs: image by image, P positives then N negatives
        texts: list[str] = []
        spans: list[list] = []
        sims: list[np.ndarray | None] = []  # phrase-label similarity [K_c, O_b] of positive pairs
        pair_image: list[int] = []
        itm: list[int] = []
        for b, s in enumerate(samples):
            for ci in self._positives(s["captions"], rng):
                texts.append(s["captions"][ci])
                spans.append(s["phrases"][ci])
                sims.append(s["phrase_sim"][ci] if s.get("phrase_sim") is not None else None)
                pair_image.append(b)
                itm.append(1)
            for c, ph in self._negatives(b, samples, rng):
                texts.append(c)
                spans.append(ph)
                sims.append(None)
                pair_image.append(b)
                itm.append(0)
        enc = encode(self.tokenizer, texts, self.max_len)
        itm_labels = torch.tensor(itm, dtype=torch.int64)
        maskable = self.masker.maskable(enc.ids, enc.mask) & (itm_labels == 1)[:, None]
        mlm_ids, mlm_labels = self.masker.mask(enc.ids, maskable, gen)

        K = max(1, max(len(p) for p in spans))
        phrase_spans = torch.full((len(texts), K, 2), -1, dtype=torch.int64)
        special = enc.special.tolist()
        for r, p in enumerate(spans):
            if p:
                phrase_spans[r, : len(p)] = torch.tensor(char_to_token_spans(enc.offsets[r], special[r], p), dtype=torch.int64)

        # objects
        O = max(1, max(len(s["labels"]) for s in samples))
        A, R = self.num_attributes, self.roi_dim
        obj_masks = torch.zeros(B, O, gh, gw, dtype=torch.bool)
        obj_labels = torch.full((B, O), -1, dtype=torch.int64)
        obj_boxes = torch.zeros(B, O, 4, dtype=torch.float32)
        obj_attrs = torch.zeros(B, O, A, dtype=torch.float32)
        obj_roi = torch.zeros(B, O, R, dtype=torch.float32)
        obj_has_roi = torch.zeros(B, O, dtype=torch.bool)
        seg = torch.full((B, gh, gw), SEG_IGNORE, dtype=torch.int64)
        for b, s in enumerate(samples):
            h, w = s["image"].shape[-2:]
            ch, cw = grid_shape(h, w, self.stride)
            n = len(s["labels"])
            for k in range(n):
                box = s["boxes"][k]
                r0, r1, c0, c1 = box_cells(box, self.stride, ch, cw)
                obj_masks[b, k, r0:r1, c0:c1] = True
                x0, y0, x1, y1 = (float(v) for v in box)
                obj_boxes[b, k] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
                for a in s["attributes"][k]:
                    obj_attrs[b, k, a] = 1.0
            if n:
                obj_labels[b, :n] = torch.as_tensor(s["labels"], dtype=torch.int64)
                obj_roi[b, :n] = torch.as_tensor(s["roi"], dtype=torch.float32).reshape(n, R)
                obj_has_roi[b, :n] = torch.as_tensor(s["has_roi"], dtype=torch.bool)
            seg[b] = seg_to_grid(s["seg"], gh, gw, self.stride, h, w)

        # KD-VLP phrase-label similarity, positive pairs of records that carry it
        phrase_obj_sim = torch.zeros(len(texts), K, O, dtype=torch.float32)
        phrase_obj_valid = torch.zeros(len(texts), K, O, dtype=torch.bool)
        for r, m in enumerate(sims):
            if m is not None and m.size:
                k, o = m.shape
                phrase_obj_sim[r, :k, :o] = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
                phrase_obj_valid[r, :k, :o] = True

        return {
            "images": images,
            "pixel_mask": pixel_mask,
            "image_ids": [s["image_id"] for s in samples],
            "text_ids": enc.ids,
            "text_mask": enc.mask,
            "pair_image": torch.tensor(pair_image, dtype=torch.int64),
            "itm_labels": itm_labels,
            "mlm_ids": mlm_ids,
            "mlm_labels": mlm_labels,
            "grid_hw": torch.tensor([gh, gw], dtype=torch.int64),
            "grid_mask": grid_mask,
            "obj_masks": obj_masks,
            "obj_labels": obj_labels,
            "obj_boxes": obj_boxes,
            "obj_attrs": obj_attrs,
            "obj_roi": obj_roi,
            "obj_has_roi": obj_has_roi,
            "seg": seg,
            "phrase_spans": phrase_spans,
            "phrase_obj_sim": phrase_obj_sim,
            "phrase_obj_valid": phrase_obj_valid,
            "captions": texts,
            "skipped": skipped,
        }


def bucket_sides(data: DataConfig, stride: int) -> tuple[int, ...]:
    """The padded side lengths of ``data.shape_buckets`` (ascending; empty when 0).

    ``n`` lengths evenly spaced from ``image_size`` to the longest side the
    resize gives (``max_long_side``; ``image_size`` in square mode), each
    rounded up to a multiple of ``stride`` (duplicates dropped).
    """
    count = data.shape_buckets
    if count == 0:
        return ()
    low = data.image_size
    high = low if data.resize_mode == "square" else max(low, data.max_long_side)
    if count == 1:
        lengths: list[float] = [float(high)]
    else:
        lengths = [low + (high - low) * i / (count - 1) for i in range(count)]
    return tuple(sorted({math.ceil(length / stride) * stride for length in lengths}))


def padded_side(side: int, sides: Sequence[int]) -> int:
    """The smallest of ``sides`` that holds ``side``; ``side`` itself without buckets or when it exceeds every one."""
    return next((length for length in sides if length >= side), side)


def pad_images(tensors: Sequence[torch.Tensor], stride: int, sides: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad [3,h,w] tensors to the largest h and w (each raised to the next of ``sides``: :func:`bucket_sides`); pixel and grid masks."""
    H = padded_side(max(t.shape[1] for t in tensors), sides)
    W = padded_side(max(t.shape[2] for t in tensors), sides)
    gh, gw = grid_shape(H, W, stride)
    B = len(tensors)
    # torch.empty, then zeros on the padding only: zeroing a fresh batch-sized buffer first cost more
    # than the copy (page faults; bench/README.md, loader.py); every pixel is written once
    images = torch.empty(B, 3, H, W, dtype=torch.float32)
    pixel_mask = torch.zeros(B, H, W, dtype=torch.bool)
    grid_mask = torch.zeros(B, gh, gw, dtype=torch.bool)
    for b, t in enumerate(tensors):
        h, w = t.shape[1], t.shape[2]
        images[b, :, :h, :w] = t
        images[b, :, h:, :] = 0.0
        images[b, :, :h, w:] = 0.0
        pixel_mask[b, :h, :w] = True
        ch, cw = grid_shape(h, w, stride)
        grid_mask[b, :ch, :cw] = True
    return images, pixel_mask, grid_mask


BATCH_KEYS = (
    "images", "pixel_mask", "image_ids", "text_ids", "text_mask", "pair_image", "itm_labels",
    "mlm_ids", "mlm_labels", "grid_hw", "grid_mask", "obj_masks", "obj_labels", "obj_boxes",
    "obj_attrs", "obj_roi", "obj_has_roi", "seg", "phrase_spans", "phrase_obj_sim", "phrase_obj_valid",
    "captions", "skipped",
)
