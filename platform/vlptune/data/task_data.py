"""Readers of the downstream tables (``vqa``, ``nlvr2``, ``ve``) for finetuning: dataset, collate, loader.

A task record names its text (the question, statement or hypothesis) and its
image(s) by ``image_id`` in the ``image_text`` table of the same split (NLVR2:
two). :class:`TaskDataset` reads one split of a table and the encoded images
it refers to, then, like :class:`vlptune.data.dataset.ShardDataset`, gives
rank ``r`` of ``W`` its share of an epoch's order (:func:`rank_positions`:
shuffled and equal-sized for training, every record for evaluation) and
decodes images per sample. Finetuning uses no augmentation (the
semantic-visual-loss paper): images get the evaluation transform.

A record whose image is missing or does not decode is skipped (logged with
its id, counted in the batch's ``skipped``) and the next record of the rank's
share is taken in its place, as the pretraining dataset does.

Batches (:class:`TaskCollate`): ``images`` [Ni,3,H,W], ``pixel_mask``,
``text_ids`` / ``text_mask`` [N,T], ``pair_image`` [N,k] (the row of each of
the record's k images in ``images``), ``rows`` (the records) and whatever the
task's ``targets(rows)`` adds (labels, soft scores).

The ``retrieval`` table needs none of this: retrieval finetunes on the
pretraining batches (ITM) and ranks with :func:`load_retrieval_set`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from vlptune.config import Recipe
from vlptune.data.collate import pad_images
from vlptune.data.dataset import MAX_SUBSTITUTES, RECORD_ERRORS, rank_positions
from vlptune.data.prepare import ensure_data
from vlptune.data.schema import RECORD_ID_FIELD, TABLE_IMAGE_TEXT, TABLE_NLVR2, TABLE_VE, TABLE_VQA, DataError
from vlptune.data.shards import decode_image, list_shards, read_shard, read_table
from vlptune.data.text import load_tokenizer, tokenize_texts
from vlptune.data.transforms import ImageTransform
from vlptune.grid import grid_stride

log = logging.getLogger(__name__)

TEXT_FIELD = {TABLE_VQA: "question", TABLE_NLVR2: "statement", TABLE_VE: "hypothesis"}
IMAGE_FIELDS = {TABLE_VQA: ("image_id",), TABLE_NLVR2: ("image_id_left", "image_id_right"), TABLE_VE: ("image_id",)}
NO_BOXES = np.zeros((0, 4), dtype=np.float32)
MAX_SKIP_WARNINGS = 20  # per dataset; later skips are only counted


def read_task_rows(root: Path, table: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of ``table`` / ``split`` in stored order (the first ``limit``); DataError when there are none."""
    if table not in TEXT_FIELD:
        raise DataError(f"table {table!r} has no task reader; readers exist for {', '.join(TEXT_FIELD)}")
    rows = read_table(root, table, split).to_pylist()
    if not rows:
        raise DataError(f"{root}: table {table!r} has no records in split {split!r}")
    return rows[:limit] if limit is not None else rows


def read_split_images(root: Path, split: str, wanted: set[str]) -> dict[str, bytes]:
    """Encoded image bytes of the ``image_text`` records of ``split`` whose id is in ``wanted``."""
    out: dict[str, bytes] = {}
    for path in list_shards(root, TABLE_IMAGE_TEXT, split):
        shard = read_shard(path, TABLE_IMAGE_TEXT).select(["image_id", "image"])
        shard = shard.filter(pc.is_in(shard.column("image_id"), value_set=pa.array(sorted(wanted), type=shard.schema.field("image_id").type)))
        for rid, data in zip(shard.column("image_id").to_pylist(), shard.column("image").to_pylist()):
            out[str(rid)] = data
    return out


class TaskDataset(Dataset):
    """One rank's share of an epoch of a downstream table's split (module docstring)."""

    def __init__(self, recipe: Recipe, table: str, split: str, rank: int = 0, world_size: int = 1, train: bool = True, seed: int = 0, limit: int | None = None):
        self.recipe = recipe
        self.table = table
        self.split = split
        self.rank, self.world_size, self.train, self.seed = rank, world_size, train, seed
        self.root = ensure_data(recipe)
        self.rows = read_task_rows(self.root, table, split, limit)
        wanted = {str(row[f]) for row in self.rows for f in IMAGE_FIELDS[table]}
        self.images = read_split_images(self.root, split, wanted)
        self.transform = ImageTransform(recipe.data, train=False)  # no augmentation while finetuning
        self.stride = grid_stride(recipe.model.backbone.pool)
        self.skipped_records: list[tuple[str, str]] = []
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = int(epoch)
        self.positions = rank_positions(len(self.rows), self.rank, self.world_size, self.seed, self.epoch, shuffle=self.train, drop_last=self.train)

    def __len__(self) -> int:
        return len(self.positions)

    def record_id(self, row: dict[str, Any]) -> str:
        return str(row.get(RECORD_ID_FIELD[self.table], "?"))

    def _decode(self, row: dict[str, Any]) -> list[torch.Tensor]:
        tensors = []
        for f in IMAGE_FIELDS[self.table]:
            image_id = str(row[f])
            data = self.images.get(image_id)
            if data is None:
                raise DataError(f"record {self.record_id(row)}: field {f!r} names image {image_id!r}, which is not in the {self.split!r} split of image_text")
            image = decode_image(data, image_id)
            t = self.transform(image, NO_BOXES, None, [row[TEXT_FIELD[self.table]]], np.random.default_rng(0))
            tensors.append(t.image)
        return tensors

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[tuple[str, str]] = []
        for k in range(MAX_SUBSTITUTES + 1):
            row = self.rows[int(self.positions[(index + k) % len(self.positions)])]
            try:
                return {"row": row, "images": self._decode(row), "skipped": skipped}
            except RECORD_ERRORS as exc:
                skipped.append((self.record_id(row), str(exc)))
                self.skipped_records.append(skipped[-1])
                if len(self.skipped_records) <= MAX_SKIP_WARNINGS:
                    log.warning("%s/%s: skipping corrupt record %s: %s", self.table, self.split, self.record_id(row), exc)
        return {"corrupt": True, "skipped": skipped}


class TaskCollate:
    """Task samples -> a batch (module docstring); ``targets(rows)`` adds the task's label tensors."""

    def __init__(self, recipe: Recipe, table: str, tokenizer: Any, targets: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]):
        self.table = table
        self.tokenizer = tokenizer
        self.max_len = recipe.data.max_text_len
        self.stride = grid_stride(recipe.model.backbone.pool)
        self.targets = targets

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        skipped = sum(len(s["skipped"]) for s in samples)
        good = [s for s in samples if not s.get("corrupt")]
        if not good:
            raise DataError(f"a {self.table!r} batch of {len(samples)} records holds no decodable record")
        rows = [s["row"] for s in good]
        per = len(good[0]["images"])
        images, pixel_mask, _ = pad_images([t for s in good for t in s["images"]], self.stride)
        text_ids, text_mask = tokenize_texts(self.tokenizer, [r[TEXT_FIELD[self.table]] for r in rows], self.max_len)
        pair_image = torch.arange(len(good) * per, dtype=torch.int64).view(len(good), per)
        return {
            "images": images,
            "pixel_mask": pixel_mask,
            "text_ids": text_ids,
            "text_mask": text_mask,
            "pair_image": pair_image,
            "rows": rows,
            "skipped": skipped,
            **self.targets(rows),
        }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # N workers x M threads would oversubscribe the CPUs


def build_task_loader(
    recipe: Recipe,
    table: str,
    split: str,
    batch_size: int,
    targets: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    seed: int = 0,
    limit: int | None = None,
) -> DataLoader:
    """The loader of ``table`` / ``split`` for one rank; training drops the last partial batch (equal steps on every rank)."""
    dataset = TaskDataset(recipe, table, split, rank, world_size, train, seed, limit)
    if recipe.data.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fast tokenizer's thread pool must not be live across fork()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # the dataset's order is already the epoch's shuffle
        drop_last=train and len(dataset) >= batch_size,
        num_workers=recipe.data.num_workers,
        collate_fn=TaskCollate(recipe, table, load_tokenizer(recipe.data.tokenizer), targets),
        worker_init_fn=_worker_init if recipe.data.num_workers > 0 else None,
    )
