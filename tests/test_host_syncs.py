"""No host syncs in a training step outside the log interval (issue 17, GPU hygiene).

A tiny training run on CPU with every Python-level device read of a tensor
(``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``, ``float()``,
``int()``, ``index()``) counted per step: on a GPU each one waits for the
device. Steps that neither log nor evaluate nor checkpoint must read nothing
back (the loop settles their scalars at the next logged step, the fused
optimisers skip a non-finite step from a device flag); the first step may
read the VD's ``initialised`` flag once. Implicit syncs inside kernels
(boolean-mask indexing) are not visible on CPU; bench/gpu.py counts those
with CUDA's sync debug mode.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vlptune.config import OptimConfig, validate_recipe
from vlptune.train import loop
from vlptune.train.optim import build_optimizers
from vlptune.train.reporting import LocalReporter

WORLD = {"train": 24, "val": 8, "image_size": 64, "seed": 0, "shard_size": 10}  # test_dataset's world (shared in a session)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
LOG_EVERY = 3
STEPS = 6


def _recipe(root: Path, **optim: Any):
    return validate_recipe(
        {
            "name": "syncs",
            "data": {"root": str(root), "synth": WORLD, "image_size": 64, "max_long_side": 96, "batch_images": 4},
            "model": {"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 16}, "fusion": {"layers": 1}},
            "train": {"max_steps": STEPS, "eval_every": 100, "log_every": LOG_EVERY},
            "eval": {"max_images": 2, "loss_batches": 0, "vd_picture_codes": 0},
            "optim": optim,
            "resources": {"cpus_per_worker": 1},  # tiny tensors: one thread (two contend on a shared machine)
        },
        "host sync test",
    )


def _count_reads(monkeypatch, recipe, out_dir: Path) -> collections.Counter:
    """Device reads per training step (1-based) of ``train_worker(recipe)``."""
    counts: collections.Counter = collections.Counter()
    state = {"step": 0, "on": False}

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if state["on"]:
                counts[state["step"]] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    step = loop.train_step

    def counted_step(*args, **kwargs):
        state["step"] += 1
        state["on"] = True
        try:
            return step(*args, **kwargs)
        finally:
            state["on"] = False

    monkeypatch.setattr(loop, "train_step", counted_step)
    loop.train_worker(recipe, LocalReporter(), out_dir, resume=False)
    assert state["step"] == STEPS
    return counts


def test_steps_between_logs_read_nothing_back(tmp_path, tmp_path_factory, monkeypatch):
    counts = _count_reads(monkeypatch, _recipe(tmp_path_factory.getbasetemp() / "synth-world"), tmp_path / "run")
    quiet = [s for s in range(2, STEPS + 1) if s % LOG_EVERY != 0]
    assert quiet == [2, 4, 5]
    assert {s: counts[s] for s in quiet} == dict.fromkeys(quiet, 0)
    assert counts[1] <= 1  # the VD's `initialised` flag, read once
    # the counter sees reads: logged steps measure per-objective gradient norms and VD statistics
    assert all(counts[s] > 0 for s in range(LOG_EVERY, STEPS + 1, LOG_EVERY))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)


@pytest.mark.parametrize("fused", ["auto", "never"])
def test_a_non_finite_step_is_skipped_with_and_without_fused_kernels(fused):
    toy = _Toy()
    opts = build_optimizers(toy, toy.backbone, OptimConfig(fused=fused), max_steps=4)
    assert opts.skips_on_device is (fused == "auto")  # CPU: torch has fused AdamW and SGD
    before = [p.detach().clone() for p in toy.parameters()]
    x = torch.full((2, 3), float("nan"))
    out = loop.train_step(
        lambda b, g: (toy.head(toy.backbone(b["images"])).sum(), {}),
        toy,
        opts,
        [{"images": x, "pair_image": torch.arange(2)}],
        torch.device("cpu"),
        "fp32",
        1.0,
        None,
    )
    assert not out.finite
    assert all(torch.equal(a, b) for a, b in zip(before, toy.parameters()))
    assert [s.last_epoch for s in opts.schedulers.values()] == [1, 1]  # the schedule still advanced
    ok = loop.train_step(
        lambda b, g: (toy.head(toy.backbone(b["images"])).sum(), {}),
        toy,
        opts,
        [{"images": torch.ones(2, 3), "pair_image": torch.arange(2)}],
        torch.device("cpu"),
        "fp32",
        1.0,
        None,
    )
    assert ok.finite and not all(torch.equal(a, b) for a, b in zip(before, toy.parameters()))
