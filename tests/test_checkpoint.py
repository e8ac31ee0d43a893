"""Checkpoints: pickle-free round trips, atomic writes, and exact resume of the training loop."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vlptune.config import OptimConfig, validate_recipe
from vlptune.train import checkpoint as ckpt
from vlptune.train.loop import train_worker
from vlptune.train.optim import build_optimizers
from vlptune.train.reporting import LocalReporter


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied: one tensor under two names
        self.register_buffer("codes", torch.randn(5, 4))

    def forward(self, x):
        return self.out(self.emb(x)).sum() + self.backbone(torch.ones(1, 3, 2, 2)).sum()


def _trained(seed: int):
    torch.manual_seed(seed)
    model = Tied()
    opts = build_optimizers(model, model.backbone, OptimConfig(warmup_steps=1), max_steps=5)
    for _ in range(2):
        model(torch.tensor([1, 2, 3])).backward()
        opts.step()
        opts.zero_grad()
    return model, opts


def test_tree_round_trip_without_pickle():
    tree = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}, "groups": [{"betas": (0.9, 0.999), "params": [0, 1]}], "np": np.arange(4), "none": None, 1.5: "x"}
    tensors: dict[str, torch.Tensor] = {}
    encoded = ckpt.encode_tree(tree, tensors, "s")
    json.dumps(encoded)  # plain JSON
    back = ckpt.decode_tree(json.loads(json.dumps(encoded)), tensors)
    assert set(back) == {0, "groups", "np", "none", 1.5}
    assert torch.equal(back[0]["exp_avg"], torch.ones(2, 2)) and back["groups"][0]["betas"] == (0.9, 0.999)
    assert np.array_equal(back["np"], np.arange(4))
    with pytest.raises(TypeError):
        ckpt.encode_tree({"bad": object()}, {}, "s")


def test_save_load_round_trip_restores_everything(tmp_path):
    model, opts = _trained(0)
    gen = torch.Generator().manual_seed(5)
    gen_state = gen.get_state()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(())), float(torch.rand((), generator=gen)))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    gen.set_state(gen_state)
    path = ckpt.save_checkpoint(tmp_path, 2, model, opts, {"g": gen}, {"epoch": 1, "position": 4})
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "state.json", "state.safetensors"]
    assert ckpt.latest_checkpoint(tmp_path) == path
    # consume randomness, then load into a differently-initialised copy
    random.random(), np.random.rand(), torch.rand(()), torch.rand((), generator=gen)
    other, other_opts = _trained(1)
    state = ckpt.load_checkpoint(path, other, other_opts, {"g": gen})
    assert state["step"] == 2 and state["extra"] == {"epoch": 1, "position": 4}
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert other.out.weight is other.emb.weight  # still tied after loading
    assert other_opts.optimizers["transformer"].state_dict()["state"].keys() == opts.optimizers["transformer"].state_dict()["state"].keys()
    for side in opts.optimizers:
        for k, v in opts.optimizers[side].state_dict()["state"].items():
            for name, t in v.items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(other_opts.optimizers[side].state_dict()["state"][k][name]))
    assert other_opts.schedulers["backbone"].last_epoch == opts.schedulers["backbone"].last_epoch == 2
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())), float(torch.rand((), generator=gen)))
    assert draws == expected_draws


def test_writes_are_atomic_and_old_checkpoints_pruned(tmp_path, monkeypatch):
    model, opts = _trained(0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opts)
    root = ckpt.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 4, model, opts)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"  # the old one still stands
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # nothing half-written left


def test_loading_into_another_model_is_refused(tmp_path):
    model, opts = _trained(0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opts)
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        ckpt.load_checkpoint(path, nn.Linear(2, 2))
    (path / "state.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_checkpoint(path, model)


# --------------------------------------------------------------------------- exact resume of the loop


class Interrupt(Exception):
    """Raised by the reporter to simulate a worker killed right after a checkpoint."""


class InterruptingReporter(LocalReporter):
    def __init__(self, at_step: int):
        super().__init__(quiet=True)
        self.at_step = at_step

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["step"] == self.at_step:
            raise Interrupt()


def per_step_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def resume_recipe(root: Path, steps: int, half: int):
    return validate_recipe(
        {
            "name": "resume",
            "data": {"root": str(root), "synth": {"train": 16, "val": 8, "image_size": 64}, "image_size": 64, "max_long_side": 96, "batch_images": 4},
            "model": {"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 16}, "fusion": {"layers": 1}},
            "objectives": {"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}, "mvm": {"weight": 1.0, "prob": 0.5}},
            "optim": {"warmup_steps": 2},
            # 16 images / 4 per batch = 4 batches per epoch: the 6 steps cross an epoch boundary
            "train": {"max_steps": steps, "eval_every": half, "log_every": 1, "seed": 3},
            "eval": {"max_images": 4, "loss_batches": 1, "vd_picture_codes": 0},
            "resources": {"cpus_per_worker": 2},
        },
        "resume test",
    )


def test_resumed_run_matches_an_uninterrupted_one(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    half = 3
    # the same small world as tests/test_loop.py (same path and settings): generated once per session
    recipe = resume_recipe(tmp_path_factory.getbasetemp() / "synth-loop", 2 * half, half)
    straight = train_worker(recipe, LocalReporter(quiet=True), base / "straight", resume=False)
    assert straight["stop_reason"] == "max_steps" and straight["step"] == 2 * half

    with pytest.raises(Interrupt):
        train_worker(recipe, InterruptingReporter(half), base / "resumed", resume=False)
    assert ckpt.latest_checkpoint(base / "resumed").name == ckpt.step_dir_name(half)
    resumed = train_worker(recipe, LocalReporter(quiet=True), base / "resumed", resume=True)
    assert resumed["step"] == 2 * half and resumed["epoch"] == straight["epoch"] == 1

    a, b = per_step_losses(base / "straight"), per_step_losses(base / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 2 * half + 1))
    for step in range(half + 1, 2 * half + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], rel=1e-4)
