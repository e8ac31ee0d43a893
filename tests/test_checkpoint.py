"""Checkpoints: pickle-free round trips, atomic writes, and exact resume of the training loop."""

from __future__ import annotations

import json
import random
import shutil
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
    tree = {
        0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)},
        "groups": [{"betas": (0.9, 0.999), "params": [0, 1]}],
        "np": np.arange(4),
        "none": None,
        1.5: "x",
    }
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
        ckpt.save_checkpoint(tmp_path, step, model, opts, keep=2)
    root = ckpt.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000003"
    resaved = ckpt.save_checkpoint(tmp_path, 3, model, opts)  # re-saving a step (after a resume), keep=1 by default
    assert [p for p in root.iterdir() if p.is_dir()] == [resaved] and ckpt.checkpoint_step(resaved) == 3
    assert ckpt.latest_checkpoint(tmp_path) == resaved

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 4, model, opts)
    assert ckpt.latest_checkpoint(tmp_path) == resaved  # the old one still stands
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]  # nothing half-written left


def test_loading_into_another_model_is_refused(tmp_path):
    model, opts = _trained(0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opts)
    with pytest.raises(ckpt.CheckpointError, match="does not fit"):
        ckpt.load_checkpoint(path, nn.Linear(2, 2))
    (path / "state.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_checkpoint(path, model)


def _fsynced_paths(monkeypatch) -> list[str]:
    """Record the path of every fsync (files and directories) from now on, in order."""
    import os

    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_every_file_and_directory_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    import os

    model, opts = _trained(0)
    seen = _fsynced_paths(monkeypatch)
    renamed: list[tuple[str, str, list[str]]] = []
    real_replace = os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: renamed.append((str(a), str(b), list(seen))) or real_replace(a, b))
    path = ckpt.save_checkpoint(tmp_path, 1, model, opts)
    tmp, final, before = renamed[0]
    assert final == str(path) and Path(tmp).name.startswith(ckpt.TMP_PREFIX)
    assert {f"{tmp}/{n}" for n in (ckpt.MODEL_FILE, ckpt.TENSORS_FILE, ckpt.STATE_FILE)} | {tmp} <= set(before)
    root = str(ckpt.checkpoint_root(tmp_path))
    after = seen[len(before) :]
    assert after.count(root) >= 2  # the rename of the directory and the one of `latest`
    assert any(p.startswith(f"{root}/.{ckpt.LATEST}.") for p in after)  # `latest`'s own file, before its rename


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writes_leftovers_are_removed_by_the_next_write(tmp_path):
    import os

    model, opts = _trained(0)
    ckpt.save_checkpoint(tmp_path, 1, model, opts)
    root = ckpt.checkpoint_root(tmp_path)
    dead = _dead_pid()
    # what a writer killed mid-way (SIGKILL: no cleanup ran) leaves: a half-written checkpoint, a half-removed one
    leftovers = [f"{ckpt.TMP_PREFIX}step_00000002-{dead}-1", f"{ckpt.OLD_PREFIX}step_00000001-{dead}-2"]
    for name in leftovers:
        (root / name).mkdir()
        (root / name / ckpt.MODEL_FILE).write_bytes(b"\0" * 1000)
    live = root / f"{ckpt.TMP_PREFIX}step_00000002-{os.getppid()}-3"  # a live process's write in progress
    live.mkdir()
    path = ckpt.save_checkpoint(tmp_path, 2, model, opts)
    assert sorted(p.name for p in root.iterdir()) == sorted([ckpt.LATEST, path.name, live.name])
    assert ckpt.remove_interrupted(root) == [] and live.is_dir()  # still alive: left alone
    # the same when the next start installs Ray's copy instead of writing one
    (root / leftovers[0]).mkdir()
    ckpt.install_checkpoint(tmp_path, path)
    assert not (root / leftovers[0]).exists()


def test_replacing_a_checkpoint_of_the_same_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    model, opts = _trained(0)
    first = ckpt.save_checkpoint(tmp_path, 3, model, opts)
    root = ckpt.checkpoint_root(tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies here

    def loads(path):
        fresh, _ = _trained(1)
        return ckpt.load_checkpoint(path, fresh, restore_rng_state=False)["step"] == 3

    # killed after the new copy is in place, before `latest` names it: the old one stands
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "atomic_write_text", crash)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(tmp_path, 3, model, opts)
    assert ckpt.latest_checkpoint(tmp_path) == first and loads(first)
    # killed after `latest` names the new copy, before the old one is removed: the new one stands
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "remove_checkpoint", crash)
        with pytest.raises(KeyboardInterrupt):
            ckpt.install_checkpoint(tmp_path, first)  # Ray's copy of the same step installed over it
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest != first and ckpt.checkpoint_step(latest) == 3 and loads(latest)
    # a normal write later tidies up: one checkpoint (keep=1), `latest` its own
    final = ckpt.save_checkpoint(tmp_path, 4, model, opts)
    assert [p for p in root.iterdir() if p.is_dir()] == [final] and ckpt.latest_checkpoint(tmp_path) == final


# --------------------------------------------------------------------------- which checkpoints stay


def fake_checkpoints(run_dir: Path, scores: dict[int, float | None], metric: str = "val/acc") -> Path:
    """Step directories with a state.json each (the evaluation of the step under ``metric``; None: no
    evaluation saved), and ``latest`` naming the newest, as the loop leaves them."""
    root = ckpt.checkpoint_root(run_dir)
    root.mkdir(parents=True)
    for step, value in scores.items():
        path = root / ckpt.step_dir_name(step)
        path.mkdir()
        metrics = {} if value is None else {metric: value, "step_metric_noise": 1.0}
        (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "extra": {ckpt.METRICS_KEY: metrics}}))
    (root / ckpt.LATEST).write_text(ckpt.step_dir_name(max(scores)) + "\n")
    return root


def entries(scores: dict[int, float | None], metric: str = "val/acc") -> list[ckpt.Entry]:
    return [ckpt.Entry(ckpt.step_dir_name(s), s, {} if v is None else {metric: v}) for s, v in scores.items()]


def steps(names: set[str]) -> list[int]:
    return sorted(int(n.split("_")[1]) for n in names)


def test_kept_while_running_is_the_n_best_and_the_latest():
    scores = {10: 0.5, 20: 0.9, 30: 0.7, 40: float("nan"), 50: 0.2}
    assert steps(ckpt.kept_while_running(entries(scores), 1, "val/acc", "max")) == [20, 50]
    assert steps(ckpt.kept_while_running(entries(scores), 2, "val/acc", "max")) == [20, 30, 50]
    assert steps(ckpt.kept_while_running(entries(scores), 1, "val/acc", "min")) == [50]  # the best is the latest
    assert steps(ckpt.kept_while_running(entries(scores), 2, "val/acc", "min")) == [10, 50]
    # no metric (a plain run), or none of them scored: the N latest
    assert steps(ckpt.kept_while_running(entries(scores), 2)) == [40, 50]
    assert steps(ckpt.kept_while_running(entries(scores), 2, "val/other", "max")) == [40, 50]
    assert steps(ckpt.kept_while_running(entries(scores), 9, "val/acc", "max")) == [10, 20, 30, 40, 50]
    # ties: the later one (Ray's report order)
    assert steps(ckpt.kept_while_running(entries({1: 0.5, 2: 0.5, 3: 0.1}), 1, "val/acc", "max")) == [2, 3]
    assert ckpt.kept_while_running([], 1, "val/acc", "max") == set()
    with pytest.raises(ValueError, match="keep must be at least 1"):
        ckpt.kept_while_running(entries(scores), 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        ckpt.kept_while_running(entries(scores), 1, "val/acc", "maximum")


def test_kept_when_ended_best_last_none():
    scores = {10: 0.5, 20: 0.9, 30: None, 40: float("nan")}
    assert steps(ckpt.kept_when_ended(entries(scores), "best", "val/acc", "max")) == [20]
    assert steps(ckpt.kept_when_ended(entries(scores), "best", "val/acc", "min")) == [10]
    assert steps(ckpt.kept_when_ended(entries(scores), "best")) == [40]  # no metric: the last
    assert steps(ckpt.kept_when_ended(entries({1: None, 2: float("nan")}), "best", "val/acc", "max")) == [2]
    assert steps(ckpt.kept_when_ended(entries(scores), "last", "val/acc", "max")) == [40]
    assert ckpt.kept_when_ended(entries(scores), "none", "val/acc", "max") == set()
    with pytest.raises(ValueError, match="policy must be one of"):
        ckpt.kept_when_ended(entries(scores), "all")


def test_finish_checkpoints_keeps_the_policy_and_repoints_latest(tmp_path):
    scores = {2: 0.3, 4: 0.8, 6: 0.1}
    root = fake_checkpoints(tmp_path / "best", scores)
    (root / ".tmp-step_00000008-1-2").mkdir()  # a write cut short
    (root / "step_00000007").mkdir()  # no state.json: not a checkpoint
    kept = ckpt.finish_checkpoints(tmp_path / "best", "best", "val/acc", "max")
    assert kept == root / "step_00000004"
    assert sorted(p.name for p in root.iterdir()) == [ckpt.LATEST, "step_00000004"]
    assert ckpt.latest_checkpoint(tmp_path / "best") == kept

    fake_checkpoints(tmp_path / "last", scores)
    assert ckpt.finish_checkpoints(tmp_path / "last", "last", "val/acc", "max").name == "step_00000006"
    root = fake_checkpoints(tmp_path / "none", scores)
    assert ckpt.finish_checkpoints(tmp_path / "none", "none") is None
    assert list(root.iterdir()) == [] and ckpt.latest_checkpoint(tmp_path / "none") is None
    assert ckpt.finish_checkpoints(tmp_path / "never-ran", "best") is None


def test_remove_checkpoint_is_atomic(tmp_path, monkeypatch):
    root = fake_checkpoints(tmp_path, {1: 0.1, 2: 0.2})

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies while deleting the files

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.remove_checkpoint(root / "step_00000002")
    # what is left is no checkpoint: not under a step_ name, so never read as one
    assert [p.name for p in root.iterdir() if p.name.startswith(ckpt.STEP_PREFIX)] == ["step_00000001"]
    assert ckpt.latest_checkpoint(tmp_path) is None
    monkeypatch.undo()
    ckpt.remove_checkpoint(root / "step_00000001")
    ckpt.remove_checkpoint(root / "step_00000001")  # gone already: nothing to do
    assert (root / ckpt.LATEST).is_file()  # it names step 2, not the one removed


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


HALF = 3  # the interrupted runs stop after the report of step HALF, of 2 * HALF


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The recipe of the resume tests and its uninterrupted run."""
    base = tmp_path_factory.mktemp("resume")
    # the same small world as tests/test_loop.py (same path and settings): generated once per session
    recipe = resume_recipe(tmp_path_factory.getbasetemp() / "synth-loop", 2 * HALF, HALF)
    result = train_worker(recipe, LocalReporter(quiet=True), base / "straight", resume=False)
    assert result["stop_reason"] == "max_steps" and result["step"] == 2 * HALF
    return recipe, result, base


def assert_same_run(straight_dir: Path, run_dir: Path, straight_result: dict, result: dict) -> None:
    a, b = per_step_losses(straight_dir), per_step_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 2 * HALF + 1))
    for step in range(HALF + 1, 2 * HALF + 1):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step
    assert result["val/loss"] == pytest.approx(straight_result["val/loss"], rel=1e-4)


def test_resumed_run_matches_an_uninterrupted_one(straight):
    recipe, straight_result, base = straight
    with pytest.raises(Interrupt):
        train_worker(recipe, InterruptingReporter(HALF), base / "resumed", resume=False)
    assert ckpt.latest_checkpoint(base / "resumed").name == ckpt.step_dir_name(HALF)
    resumed = train_worker(recipe, LocalReporter(quiet=True), base / "resumed", resume=True)
    assert resumed["step"] == 2 * HALF and resumed["epoch"] == straight_result["epoch"] == 1
    assert_same_run(base / "straight", base / "resumed", straight_result, resumed)
    # a plain run ends with train.keep_when_done=best: without a metric, its last checkpoint
    assert sorted(p.name for p in ckpt.checkpoint_root(base / "resumed").iterdir() if p.is_dir()) == [ckpt.step_dir_name(2 * HALF)]
    assert resumed["checkpoint"] == str(ckpt.checkpoint_root(base / "resumed") / ckpt.step_dir_name(2 * HALF))


class PersistingReporter(LocalReporter):
    """Stands in for the Ray Train reporter: each reported checkpoint is copied into ``storage``
    (Ray's run storage) and ``persisted`` confirms the last copy."""

    def __init__(self, storage: Path):
        super().__init__(quiet=True)
        self.storage = storage
        self.copies: dict[str, Path] = {}  # local checkpoint dir -> its copy

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir:
            copy = self.storage / f"checkpoint_{len(list(self.storage.iterdir())):06d}"
            shutil.copytree(checkpoint_dir, copy)
            self.copies[checkpoint_dir] = copy

    def persisted(self, checkpoint_dir):
        return checkpoint_dir in self.copies and (self.copies[checkpoint_dir] / ckpt.STATE_FILE).is_file()


def test_a_persisted_checkpoint_leaves_its_one_copy_and_resumes_from_it(straight, monkeypatch):
    """The loop drops its own copy once the reporter holds one; a restarted worker resumes from that copy."""
    import ray.train

    from vlptune.search.trainable import materialize_ray_checkpoint
    from vlptune.train import loop

    recipe, straight_result, base = straight
    run, storage = base / "persisted", base / "storage"
    storage.mkdir()
    drop = loop.drop_persisted_copy

    def drop_then_die(reporter, checkpoint_dir, run_dir):
        drop(reporter, checkpoint_dir, run_dir)
        if reporter.last.get("step") == HALF:
            raise Interrupt()  # the worker dies right after dropping its copy

    with monkeypatch.context() as patch:
        patch.setattr(loop, "drop_persisted_copy", drop_then_die)
        with pytest.raises(Interrupt):
            train_worker(recipe, PersistingReporter(storage), run, resume=False)
    assert not [p for p in ckpt.checkpoint_root(run).iterdir() if p.is_dir()]  # the local copy went
    assert ckpt.latest_checkpoint(run) is None
    (copy,) = storage.iterdir()
    assert json.loads((copy / ckpt.STATE_FILE).read_text())["step"] == HALF
    assert json.loads((copy / ckpt.STATE_FILE).read_text())["extra"][ckpt.METRICS_KEY]["val/loss"] > 0  # ranked by its evaluation

    # the restarted worker: train_loop_per_worker copies Ray's checkpoint in before the loop starts
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(copy)))
    materialize_ray_checkpoint(run)
    assert ckpt.latest_checkpoint(run).name == ckpt.step_dir_name(HALF)
    reporter = PersistingReporter(storage)
    resumed = train_worker(recipe, reporter, run, resume=True)
    assert_same_run(base / "straight", run, straight_result, resumed)
    # one copy of each checkpoint: the reporter's; the loop kept none
    assert not [p for p in ckpt.checkpoint_root(run).iterdir() if p.is_dir()]
    assert resumed["checkpoint"] is None
    assert [json.loads((p / ckpt.STATE_FILE).read_text())["step"] for p in sorted(storage.iterdir())] == [HALF, 2 * HALF]


def test_checkpoints_elsewhere_or_unconfirmed_are_not_dropped(tmp_path):
    from vlptune.train.checkpoint import drop_persisted_copy

    root = fake_checkpoints(tmp_path / "run", {1: 0.1})
    other = fake_checkpoints(tmp_path / "given", {1: 0.1}) / ckpt.step_dir_name(1)
    confirming = PersistingReporter(tmp_path)
    confirming.copies = {str(other): other}  # the reporter holds a copy of a checkpoint outside the run
    drop_persisted_copy(confirming, str(other), tmp_path / "run")
    assert other.is_dir()
    local = str(root / ckpt.step_dir_name(1))
    drop_persisted_copy(LocalReporter(quiet=True), local, tmp_path / "run")  # no persisted(): keeps it
    drop_persisted_copy(PersistingReporter(tmp_path), local, tmp_path / "run")  # not confirmed: keeps it
    assert Path(local).is_dir()
    confirming.copies[local] = other
    drop_persisted_copy(confirming, local, tmp_path / "run")
    assert not Path(local).exists()
