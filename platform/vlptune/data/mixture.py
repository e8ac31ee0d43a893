"""Pretraining mixtures: several converted roots sampled by weight (``data.sources``), e.g. COCO + VG as SOHO pretrains.

:class:`MixtureDataset` wraps one per-root dataset per source (each already
this rank's share of its split: the DDP-aware sharding is theirs) and, for
training, draws an epoch of ``sum(len(source))`` samples, source ``i``
giving ``round(N * w_i / sum(w))`` of them (its own shuffled order, cycled
when it is asked for more than it holds), interleaved by a permutation
seeded by ``(seed, epoch)``: the same on every rank, equal lengths on every
rank. Evaluation (``train=False``) concatenates the sources unweighted.
Corrupt-record skipping stays the sources' own (their ``__getitem__``).

The heads' vocabularies come from one root (``data.root``):
:func:`check_vocabularies` refuses a source whose objects use other classes
or attributes (a source without objects, like COCO captions, mixes with any).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from vlptune.data.schema import DataError

MIXTURE_STREAM = 7  # seed stream of the mixture's interleaving (apart from the sources' own shuffles)
VOCABULARY_KEYS = ("classes", "attributes")


def source_counts(lengths: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Samples per source in an epoch of ``sum(lengths)``: proportional to ``weights`` (largest remainders get the rest)."""
    total = int(sum(lengths))
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def check_vocabularies(primary: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]], primary_name: str) -> None:
    """Refuse a source whose non-empty class / attribute vocabulary differs from the primary root's."""
    for name, vocab in others.items():
        for key in VOCABULARY_KEYS:
            theirs, ours = list(vocab.get(key, [])), list(primary.get(key, []))
            if theirs and theirs != ours:
                raise DataError(
                    f"data.sources: {name} has a {key!r} vocabulary of {len(theirs)} names that differs from data.root={primary_name!r} "
                    f"({len(ours)} names); the heads use data.root's, so its labels would mean other things. "
                    "Set data.root to that source, or convert the sources with one vocabulary"
                )


class MixtureDataset(Dataset):
    """Samples of several datasets by weight (see the module docstring); ``set_epoch`` re-draws the epoch."""

    def __init__(self, sources: Sequence[Any], weights: Sequence[float], seed: int, train: bool = True, epoch: int = 0):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"a mixture needs one weight per source, got {len(sources)} sources and {len(weights)} weights")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.seed = int(seed)
        self.train = train
        self.epoch = -1
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = int(epoch)
        for source in self.sources:
            source.set_epoch(epoch)
        lengths = [len(s) for s in self.sources]
        if not self.train:
            self.index = np.asarray([(i, j) for i, n in enumerate(lengths) for j in range(n)], dtype=np.int64).reshape(-1, 2)
            return
        rng = np.random.default_rng([self.seed, self.epoch, MIXTURE_STREAM])
        pieces = []
        for i, (n, want) in enumerate(zip(lengths, source_counts(lengths, self.weights))):
            if want and n == 0:
                raise DataError(f"mixture source {i} has no records for this rank; give it weight 0 or more data")
            local = np.concatenate([rng.permutation(n) for _ in range(-(-want // n))])[:want] if want else np.zeros(0, dtype=np.int64)
            pieces.append(np.stack([np.full(want, i), local], axis=1))
        index = np.concatenate(pieces).astype(np.int64)
        self.index = index[rng.permutation(len(index))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        source, local = self.index[i % n]
        return self.sources[int(source)][int(local)]

    def source_of(self, i: int) -> int:
        """Which source sample ``i`` comes from (tests, logs)."""
        return int(self.index[i][0])

    @property
    def skipped(self) -> int:
        return sum(int(getattr(s, "skipped", 0)) for s in self.sources)
