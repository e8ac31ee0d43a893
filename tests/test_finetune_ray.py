"""Finetuning as a Ray Train run (two DDP workers on a local cluster), and ``vlptune finetune --ray``: slow suite.

A tiny pretraining run (in this process) gives the checkpoint; the VQA
finetuning then runs as a ``TorchTrainer`` of two gloo workers and must report
the task's metrics, keep the best checkpoint and write ``finetune.json`` in
its run directory, like the in-process run of tests/test_finetune_tasks.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_ray_command
from test_finetune_tasks import PRETRAIN_OBJECTIVES, WORLD_SIZE, WORLD_TRAIN, WORLD_VAL, task_recipe
from vlptune.data.synth import make_world
from vlptune.train.finetune import FINETUNE_STATE
from vlptune.train.loop import train_worker
from vlptune.train.reporting import LocalReporter

pytestmark = pytest.mark.slow

PRETRAIN_STEPS = 6


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-finetune")
    make_world(root / "world", train=WORLD_TRAIN, val=WORLD_VAL, image_size=WORLD_SIZE, seed=5, caption_style="descriptive")
    recipe = task_recipe(root / "world", "vqa", max_steps=8, eval_every=4, batch_size=8, eval_records=64, patience=0)
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"max_steps": PRETRAIN_STEPS, "eval_every": PRETRAIN_STEPS})})
    train_worker(recipe, LocalReporter(quiet=True), root / "pretrain", resume=False)
    assert PRETRAIN_OBJECTIVES  # the pretraining recipe of the in-process tests
    return root / "pretrain"


def test_finetune_command_with_ray_runs_two_ddp_workers(pretrained, tmp_path):
    out = tmp_path / "vqa-ray"
    rc, text = run_ray_command(
        ["finetune", str(pretrained), "--task", "vqa", "--ray", "-o", "resources.workers=2", "-o", "resources.cpus_per_worker=0.5", "--out", str(out)]
    )
    assert rc == 0, text
    assert "vqa: score = " in text and "(chance " in text, text
    state = json.loads((out / FINETUNE_STATE).read_text())
    assert state["task"] == "vqa" and Path(state["pretrained"]).is_dir() and state["best"]["downstream/vqa/score"] >= 0.0
    kept = [p for p in (out / "ray").rglob("checkpoint_*") if p.is_dir()]
    assert len(kept) == 1 and f"best checkpoint {kept[0]}" in text, (kept, text)  # Ray Train keeps the best one
    assert list(out.glob("events.out.tfevents.*")), list(out.iterdir())  # TensorBoard in the run directory
