"""The training dataset over the ``image_text`` shards, its loader, and eval helpers.

Sharding (DDP): every epoch the split's records are put in one order that all
ranks compute alike (a permutation seeded by ``train.seed + epoch`` when
training, the stored order otherwise); rank ``r`` of ``W`` takes positions
``r, r+W, r+2W, ...``. Training drops the last ``n mod W`` records of the
permuted order (different ones every epoch) so ranks never overlap;
evaluation instead pads with records from the start so every record is seen.
Either way every rank gets exactly the same number of samples, so DDP ranks
run the same number of steps and never wait on each other.

Each rank reads only its own rows from the shards (one shard at a time) and
keeps them encoded; images and maps are decoded, transformed and normalised
per sample in ``__getitem__``, i.e. inside DataLoader workers.

Corrupt records (undecodable image or map, empty captions, labels outside
the manifest's vocabularies, malformed boxes...) never stop a run: the sample
is replaced by the next record of the rank's slice (up to
:data:`MAX_SUBSTITUTES` tries, so batch sizes stay constant), and the skip
is logged with the record id and reason and reported in the sample's
``skipped`` list; the collate sums them into the batch's ``skipped`` and
:class:`SOHOLoader` turns that into the running count of the loader (this
also works across worker processes). Only a split where everything is
corrupt stops with a :class:`DataError`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from vlptune.config import DataConfig, Recipe
from vlptune.data.collate import SOHOCollate, pad_images
from vlptune.data.mixture import VOCABULARY_KEYS, MixtureDataset, check_vocabularies
from vlptune.data.schema import TABLE_IMAGE_TEXT, DataError
from vlptune.data.shard_checks import read_checked_shard, shard_entries, verify_hint
from vlptune.data.gpu_decode import check_gpu_decoding, decode_image_tensor
from vlptune.data.shards import decode_image_draft, decode_segmentation, list_shards, read_manifest
from vlptune.data.prepare import ensure_data
from vlptune.data.text import load_tokenizer
from vlptune.data.transforms import ImageTransform
from vlptune.grid import grid_stride
from vlptune.data.schema import schema_for

log = logging.getLogger(__name__)

TABLE = TABLE_IMAGE_TEXT
MAX_SUBSTITUTES = 8  # records tried in place of a corrupt one before the sample is dropped
MAX_SKIP_WARNINGS = 20  # per process; later skips are only counted
DISTRACTOR_TRIES = 4  # random draws per wanted distractor (records of another image)
# Errors that mean "this record is bad", as opposed to a bug: caught per record.
RECORD_ERRORS = (DataError, ValueError, TypeError, KeyError, IndexError, OSError)


# ------------------------------------------------------------------ data root


# ------------------------------------------------------------------ sharding


def rank_positions(n: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool, drop_last: bool) -> np.ndarray:
    """Global record indices of ``rank`` for this epoch (see the module docstring).

    Every rank gets ``n // W`` (``drop_last``) or ``ceil(n / W)`` indices;
    ``drop_last`` falls back to padding when ``n < W``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) + int(epoch))
        order = torch.randperm(n, generator=g).numpy().astype(np.int64)
    else:
        order = np.arange(n, dtype=np.int64)
    if drop_last and n >= world_size:
        order = order[: (n // world_size) * world_size]
    else:
        total = math.ceil(n / world_size) * world_size
        order = np.resize(order, total)  # repeats from the start
    return order[rank::world_size]


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and platforms)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts] + [len(parts)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


# ------------------------------------------------------------------ decoding


@dataclass
class Vocab:
    """Sizes from the manifest used to validate records and shape the batch."""

    num_classes: int
    num_attributes: int
    roi_dim: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Vocab":
        v = manifest["vocabularies"]
        return cls(num_classes=len(v["classes"]), num_attributes=len(v["attributes"]), roi_dim=int(v["roi_feature_dim"]))


def decode_record(row: dict, transform: ImageTransform, vocab: Vocab, max_objects: int, seed: int, device: torch.device | None = None) -> dict:
    """Decode and transform one ``image_text`` record into a sample dict.

    The image is decoded once per record (the SOHO batch pairs it with several
    captions, but holds each image once), by PIL with JPEG draft mode where
    the resize shrinks it (``data.jpeg_draft``), or with ``device`` on that
    GPU (``data.decode: gpu``, vlptune.data.gpu_decode).

    Raises DataError (or another of :data:`RECORD_ERRORS`) naming the record
    when any field is unusable.
    """
    rid = str(row.get("image_id", "?"))
    captions = row.get("captions") or []
    if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
        raise DataError(f"record {rid}: field 'captions' is empty or holds an empty caption")
    phrases = row.get("phrases")
    if phrases is None:
        phrases = [[] for _ in captions]
    if len(phrases) != len(captions):
        raise DataError(f"record {rid}: field 'phrases' has {len(phrases)} entries for {len(captions)} captions")
    image: Any
    if device is not None:
        image, source = decode_image_tensor(row.get("image"), rid, device), None
    else:
        image, source = decode_image_draft(row.get("image"), rid, transform.draft_size)
    seg = decode_segmentation(row["segmentation"], rid) if row.get("segmentation") is not None else None
    objects = row.get("objects") or []
    boxes = np.asarray([o["box"] for o in objects], dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise DataError(f"record {rid}: field 'objects[].box' holds a non-finite value")
    for k, o in enumerate(objects):
        if not 0 <= int(o["label"]) < vocab.num_classes:
            raise DataError(f"record {rid}: field 'objects[{k}].label' is {o['label']}, outside the {vocab.num_classes} classes of the manifest")
        bad = [a for a in (o.get("attributes") or []) if not 0 <= int(a) < vocab.num_attributes]
        if bad:
            raise DataError(f"record {rid}: field 'objects[{k}].attributes' holds {bad}, outside the {vocab.num_attributes} attributes of the manifest")
        roi = o.get("roi_feature")
        if roi is not None and len(roi) != vocab.roi_dim:
            raise DataError(f"record {rid}: field 'objects[{k}].roi_feature' has {len(roi)} values, the manifest says roi_feature_dim={vocab.roi_dim}")
    sims = _phrase_similarity(row.get("phrase_label_sim"), phrases, len(objects), rid)
    rng = np.random.default_rng(seed)
    try:
        t = transform(image, boxes, seg, captions, rng, source_size=source)
    except ValueError as exc:
        raise DataError(f"record {rid}: {exc}") from exc
    keep = t.keep[:max_objects]
    kept = [objects[int(k)] for k in keep]
    roi = np.zeros((len(kept), vocab.roi_dim), dtype=np.float32)
    has_roi = np.zeros(len(kept), dtype=bool)
    for k, o in enumerate(kept):
        if o.get("roi_feature") is not None:
            roi[k] = np.asarray(o["roi_feature"], dtype=np.float32)
            has_roi[k] = True
    return {
        "image_id": rid,
        "image": t.image,
        "boxes": t.boxes[:max_objects],
        "labels": np.asarray([int(o["label"]) for o in kept], dtype=np.int64),
        "attributes": [[int(a) for a in (o.get("attributes") or [])] for o in kept],
        "roi": roi,
        "has_roi": has_roi,
        "seg": t.seg,
        "captions": list(captions),
        "phrases": [[(int(p["start"]), int(p["end"])) for p in (ph or [])] for ph in phrases],
        "phrase_sim": None if sims is None else [m[:, keep] for m in sims],
        "flipped": t.flipped,
        "seed": int(seed),
    }


def _phrase_similarity(value: Any, phrases: list, num_objects: int, rid: str) -> list[np.ndarray] | None:
    """The record's ``phrase_label_sim`` as one float32 [K_c, O] array per caption (None when absent)."""
    if value is None:
        return None
    if len(value) != len(phrases):
        raise DataError(f"record {rid}: field 'phrase_label_sim' has {len(value)} entries for {len(phrases)} captions")
    out = []
    for c, (per_phrase, caption_phrases) in enumerate(zip(value, phrases)):
        k = len(caption_phrases or [])
        rows = per_phrase or []
        if len(rows) != k or any(len(r or []) != num_objects for r in rows):
            found = f"{len(rows)}x{[len(r or []) for r in rows]}"
            raise DataError(f"record {rid}: field 'phrase_label_sim[{c}]' must be {k} phrases x {num_objects} objects, found {found}")
        m = np.asarray([list(r or []) for r in rows], dtype=np.float32).reshape(k, num_objects)
        if not np.isfinite(m).all():
            raise DataError(f"record {rid}: field 'phrase_label_sim[{c}]' holds a non-finite value")
        out.append(m)
    return out


def _read_rows(paths: Sequence[Path], counts: Sequence[int], wanted: np.ndarray, root: Path, checksums: Sequence[str] | None = None) -> pa.Table:
    """Rows ``wanted`` (global indices over the shards, any order, repeats allowed) as one table in that order.

    ``checksums``: the manifest's sha256 of each shard, checked once per process
    (``data.verify_shards``); a shard error names the shard and how to check ``root``."""
    if len(wanted) == 0:

        return schema_for(TABLE).empty_table()
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    unique = np.unique(wanted)
    pieces = []
    for s, path in enumerate(paths):
        lo, hi = starts[s], starts[s + 1]
        local = unique[(unique >= lo) & (unique < hi)] - lo
        if len(local) == 0:
            continue
        shard = read_checked_shard(path, TABLE, root, checksums[s] if checksums is not None else None)
        if shard.num_rows != hi - lo:
            raise DataError(f"{path}: holds {shard.num_rows} records, the manifest says {hi - lo}; {verify_hint(root)}")
        pieces.append(shard.take(pa.array(local)))
    table = pa.concat_tables(pieces)  # rows in the order of `unique`
    return table.take(pa.array(np.searchsorted(unique, wanted)))


# ------------------------------------------------------------------ corrupt records over the ranks


def skipped_over_ranks(skipped: int, device: torch.device) -> int:
    """``skipped`` summed over the ranks when torch.distributed runs (a collective: every rank calls it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return skipped
    total = torch.tensor([float(skipped)], device=device)
    torch.distributed.all_reduce(total)
    return int(total.item())


# ------------------------------------------------------------------ the dataset


class ShardDataset(Dataset):
    """One rank's share of a split of the ``image_text`` table for one epoch.

    ``ds[i]`` is a sample dict (see :func:`decode_record`) plus ``skipped``
    (records skipped to produce it, as ``(id, reason)``) and ``distractors``
    (captions of other images, a negative pool for one-image batches); or,
    when the record and all its substitutes are corrupt, a marker
    ``{"corrupt": True, "skipped": [...]}`` that the collate drops and counts.
    """

    def __init__(self, recipe: Recipe, split: str, rank: int = 0, world_size: int = 1, train: bool = True, epoch: int = 0, root: str | Path | None = None):
        self.recipe = recipe
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.root = Path(root) if root is not None else ensure_data(recipe)
        manifest = read_manifest(self.root)
        self.vocab = Vocab.from_manifest(manifest)
        entries = manifest["shards"].get(TABLE, {}).get(split, [])
        self.paths = list_shards(self.root, TABLE, split)
        self.counts = [int(e["records"]) for e in entries]
        self.checksums = [str(e["sha256"]) for e in entries] if recipe.data.verify_shards else None
        if len(self.paths) != len(self.counts):  # pragma: no cover - same manifest, same order
            raise DataError(f"{self.root}: manifest lists {len(self.counts)} shards for {TABLE}/{split}, found {len(self.paths)}")
        self.total = int(sum(self.counts))
        if self.total == 0:
            known = sorted(manifest["shards"].get(TABLE, {}))
            raise DataError(f"{self.root}: table {TABLE!r} has no records in split {split!r} (splits: {known})")
        self.transform = ImageTransform(recipe.data, train)
        self.decode_device = check_gpu_decoding(recipe.data.num_workers) if recipe.data.decode == "gpu" else None
        self.skipped_records: list[tuple[str, str]] = []  # this process only
        self._bad: dict[int, str] = {}
        self.epoch = -1
        self.set_epoch(epoch)

    # -- epoch -----------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select (and read) this rank's records for ``epoch``."""
        if epoch == self.epoch:
            return
        self.epoch = int(epoch)
        self.positions = rank_positions(self.total, self.rank, self.world_size, self.recipe.train.seed, self.epoch, shuffle=self.train, drop_last=self.train)
        self.table = _read_rows(self.paths, self.counts, self.positions, self.root, self.checksums)
        self.image_ids = [str(x) for x in self.table.column("image_id").to_pylist()]
        self._texts: list[dict] | None = None  # captions and phrases of every row, read on the first distractor draw
        self._bad = {}

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def skipped(self) -> int:
        """Corrupt records skipped by this process (workers count their own; see SOHOLoader)."""
        return len(self.skipped_records)

    # -- samples ---------------------------------------------------------

    def _row(self, i: int, columns: Sequence[str] | None = None) -> dict:
        t = self.table.slice(i, 1)
        if columns is not None:
            t = t.select(list(columns))
        return t.to_pylist()[0]

    def _seed(self, i: int) -> int:
        return sample_seed(self.recipe.train.seed, self.epoch, int(self.positions[i]), int(self.train))

    def _distractors(self, i: int, seed: int) -> list[dict]:
        want = self.recipe.data.itm_negatives
        n = len(self)
        own = self.image_ids[i]
        rng = np.random.default_rng([seed, 1])
        out: list[dict] = []
        seen: set[str] = {own}
        for _ in range(want * DISTRACTOR_TRIES):
            if len(out) >= want or n < 2:
                break
            j = int(rng.integers(n))
            if self.image_ids[j] in seen:
                continue
            seen.add(self.image_ids[j])
            if self._texts is None:  # one read of the text columns per epoch, not a table slice per draw
                self._texts = self.table.select(["captions", "phrases"]).to_pylist()
            row = self._texts[j]
            caps = [c for c in (row["captions"] or []) if isinstance(c, str) and c.strip()]
            if not caps:
                continue
            phrases = row["phrases"] if row["phrases"] is not None and len(row["phrases"]) == len(row["captions"]) else [[]] * len(row["captions"])
            out.append(
                {
                    "image_id": self.image_ids[j],
                    "captions": caps,
                    "phrases": [[(int(p["start"]), int(p["end"])) for p in (ph or [])] for c, ph in zip(row["captions"], phrases) if isinstance(c, str) and c.strip()],
                }
            )
        return out

    def _skip(self, i: int, reason: str) -> tuple[str, str] | None:
        """Record position ``i`` as bad; the (id, reason) the first time in this process."""
        g = int(self.positions[i])
        if g in self._bad:
            return None
        self._bad[g] = reason
        entry = (self.image_ids[i], reason)
        self.skipped_records.append(entry)
        if len(self.skipped_records) <= MAX_SKIP_WARNINGS:
            log.warning("skipping corrupt record %s of %s/%s: %s", entry[0], TABLE, self.split, reason)
        return entry

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        skipped: list[tuple[str, str]] = []
        for k in range(min(n, MAX_SUBSTITUTES + 1)):
            i = (index + k) % n
            if int(self.positions[i]) in self._bad:
                continue
            seed = self._seed(i)
            try:
                sample = decode_record(self._row(i), self.transform, self.vocab, self.recipe.data.max_objects, seed, self.decode_device)
            except RECORD_ERRORS as exc:
                entry = self._skip(i, f"{type(exc).__name__}: {exc}")
                if entry:
                    skipped.append(entry)
                continue
            sample["seed"] = self._seed(index)  # the slot's seed: same batch randomness whatever substituted
            sample["skipped"] = skipped
            sample["distractors"] = self._distractors(i, seed)
            return sample
        return {"corrupt": True, "skipped": skipped, "image_id": self.image_ids[index]}


# ------------------------------------------------------------------ the loader


class SOHOLoader(DataLoader):
    """A DataLoader whose batches carry ``skipped`` = corrupt records skipped so
    far by this loader (over all its iterations and worker processes).

    The collate reports the skips of each batch; this sums them in the main process.
    """

    skipped: int = 0

    def __iter__(self) -> Iterator[dict]:
        for batch in super().__iter__():
            self.skipped += int(batch.get("skipped", 0))
            batch["skipped"] = self.skipped
            yield batch

    def set_epoch(self, epoch: int) -> None:
        """Re-shuffle for another epoch (the dataset reads its new rows)."""
        self.dataset.set_epoch(epoch)


class ObjectlessShardDataset(ShardDataset):
    """A mixture source whose objects use another vocabulary than ``data.root``'s empty one: read without its objects."""

    def __init__(self, recipe: Recipe, split: str, vocab: Vocab, **kw: Any):
        super().__init__(recipe, split, **kw)
        self.vocab = vocab

    def _row(self, i: int, columns: Sequence[str] | None = None) -> dict:
        row = super()._row(i, columns)
        if "objects" in row:
            row["objects"] = []
            row["phrase_label_sim"] = None
        return row


def build_dataset(recipe: Recipe, split: str, root: Path, rank: int = 0, world_size: int = 1, train: bool = True, epoch: int = 0) -> Dataset:
    """``split`` of ``root`` for one rank; for training with ``data.sources``, the weighted mixture of those roots (vlptune.data.mixture)."""
    sources = recipe.data.sources
    if not train or not sources:
        return ShardDataset(recipe, split, rank=rank, world_size=world_size, train=train, epoch=epoch, root=root)
    primary = read_manifest(root)["vocabularies"]
    datasets: list[ShardDataset] = []
    for source in sources:
        path = Path(source.root).expanduser()
        theirs = read_manifest(path)["vocabularies"]
        kw: dict[str, Any] = {"rank": rank, "world_size": world_size, "train": train, "epoch": epoch, "root": path}
        if any(theirs.get(k) for k in VOCABULARY_KEYS) and not any(primary.get(k) for k in VOCABULARY_KEYS):
            log.warning("data.sources: %s has object classes but data.root=%s has none: its objects are not read (set data.root to it to use them)", path, root)
            datasets.append(ObjectlessShardDataset(recipe, split, Vocab.from_manifest({"vocabularies": primary}), **kw))
            continue
        check_vocabularies(primary, {str(path): theirs}, str(root))
        datasets.append(ShardDataset(recipe, split, **kw))
    return MixtureDataset(datasets, [s.weight for s in sources], seed=recipe.train.seed, train=train, epoch=epoch)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # N workers x M threads would oversubscribe the CPUs


def build_loader(
    recipe: Recipe,
    split: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    epoch: int = 0,
    tokenizer: Any = None,
    device: torch.device | str | None = None,
) -> SOHOLoader:
    """The SOHO batch loader of ``split`` for one rank (batches: docs/contracts.md).

    ``split`` defaults to ``data.train_split`` (train) or ``data.val_split``.
    Batches hold ``data.batch_images`` images; training drops the last partial
    batch (unless the rank has less than one batch), so ``len(loader)`` is the
    number of steps in this epoch and is equal on every rank. ``device``: where
    the batches go (pinned memory on CUDA, :func:`loader_options`).
    """
    data = recipe.data
    if split is None:
        split = data.train_split if train else data.val_split
    root = ensure_data(recipe)
    dataset = build_dataset(recipe, split, root, rank=rank, world_size=world_size, train=train, epoch=epoch)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer)
    collate = SOHOCollate(recipe, tokenizer, train=train, manifest=read_manifest(root))
    drop_last = train and len(dataset) >= data.batch_images
    if data.num_workers > 0:
        # the fast tokenizer's thread pool must not be live across fork()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return SOHOLoader(
        dataset,
        batch_size=data.batch_images,
        shuffle=False,  # the dataset's order is already the epoch's shuffle
        drop_last=drop_last,
        collate_fn=collate,
        persistent_workers=False,
        **loader_options(data, device),
    )


def loader_options(data: DataConfig, device: torch.device | str | None = None) -> dict[str, Any]:
    """The DataLoader options of ``data`` for a run on ``device``: workers, pinned memory, prefetching.

    ``data.pin_memory: auto`` pins batches when ``device`` is CUDA (or, with no
    device given, when CUDA is available and ``train.device`` would pick it) and
    ``data.decode`` is cpu (GPU-decoded images are already on the device);
    ``data.prefetch_factor`` applies with workers only (torch refuses it without).
    """
    workers = data.num_workers
    cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    pin = data.pin_memory == "always" or (data.pin_memory == "auto" and cuda and data.decode == "cpu")
    out: dict[str, Any] = {"num_workers": workers, "pin_memory": pin, "worker_init_fn": _worker_init if workers > 0 else None}
    if workers > 0:
        out["prefetch_factor"] = data.prefetch_factor
    return out


# ------------------------------------------------------------------ retrieval evaluation


@dataclass
class RetrievalSet:
    """Preprocessed (un-augmented) images and their captions for zero-shot retrieval.

    ``images[i]`` is ``{"image": float32 [3,h,w], "image_id": str, "stride": int}``
    (feed lists of them to :func:`collate_images`); ``caption_image[c]`` is the
    index in ``images`` of caption ``c``'s image; ``image_captions[i]`` the
    caption indices of image ``i``.
    """

    image_ids: list[str]
    images: list[dict]
    captions: list[str]
    caption_image: torch.Tensor
    image_captions: list[list[int]] = field(default_factory=list)
    skipped: int = 0

    def image_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for s in range(0, len(self.images), batch_size):
            yield collate_images(self.images[s : s + batch_size])


def load_retrieval_set(recipe: Recipe, split: str | None = None, max_images: int | None = None, captions_per_image: int | None = None) -> RetrievalSet:
    """The first ``max_images`` decodable records of ``split`` (stored order), each
    with its first ``captions_per_image`` captions. Defaults: ``data.val_split``,
    ``eval.max_images``, ``eval.captions_per_image``. Corrupt records are skipped
    (logged, counted in ``skipped``) and the next ones taken instead."""
    split = split or recipe.data.val_split
    max_images = max_images if max_images is not None else recipe.eval.max_images
    captions_per_image = captions_per_image if captions_per_image is not None else recipe.eval.captions_per_image
    if max_images < 1 or captions_per_image < 1:
        raise ValueError(f"max_images ({max_images}) and captions_per_image ({captions_per_image}) must be >= 1")
    root = ensure_data(recipe)
    vocab = Vocab.from_manifest(read_manifest(root))
    transform = ImageTransform(recipe.data, train=False)
    stride = grid_stride(recipe.model.backbone.pool)
    out = RetrievalSet(image_ids=[], images=[], captions=[], caption_image=torch.zeros(0, dtype=torch.int64))
    owners: list[int] = []
    for entry in shard_entries(root, TABLE, split):
        if len(out.images) >= max_images:
            break
        shard = read_checked_shard(root / entry["path"], TABLE, root, str(entry["sha256"]) if recipe.data.verify_shards else None)
        for row in shard.to_batches():
            for rec in row.to_pylist():
                if len(out.images) >= max_images:
                    break
                try:
                    s = decode_record(rec, transform, vocab, recipe.data.max_objects, seed=0)
                except RECORD_ERRORS as exc:
                    out.skipped += 1
                    log.warning("retrieval set: skipping corrupt record %s: %s", rec.get("image_id", "?"), exc)
                    continue
                idx = len(out.images)
                out.image_ids.append(s["image_id"])
                out.images.append({"image": s["image"], "image_id": s["image_id"], "stride": stride})
                caps = s["captions"][:captions_per_image]
                out.image_captions.append(list(range(len(out.captions), len(out.captions) + len(caps))))
                out.captions.extend(caps)
                owners.extend([idx] * len(caps))
    if len(out.images) < 2:
        raise DataError(f"{root}: split {split!r} has {len(out.images)} decodable images; retrieval needs at least 2")
    out.caption_image = torch.tensor(owners, dtype=torch.int64)
    return out


def collate_images(samples: Sequence[Any], stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad images to one batch: ``(images [B,3,H,W], pixel_mask bool [B,H,W], grid_mask bool [B,gh,gw])``.

    ``samples``: dicts with ``image`` (and ``stride``, as in a RetrievalSet)
    or bare image tensors with ``stride`` given.
    """
    if not samples:
        raise ValueError("collate_images: no samples")
    tensors = [s["image"] if isinstance(s, dict) else s for s in samples]
    if stride is None:
        strides = {s.get("stride") for s in samples if isinstance(s, dict)}
        if len(strides) != 1 or None in strides:
            raise ValueError("collate_images: pass stride= (grid_stride(model.backbone.pool)) or samples carrying one 'stride'")
        stride = int(strides.pop() or 0)  # not None: checked above
    return pad_images(tensors, stride)


__all__ = [
    "ShardDataset",
    "SOHOLoader",
    "RetrievalSet",
    "build_loader",
    "collate_images",
    "load_retrieval_set",
    "pad_images",
    "rank_positions",
]
