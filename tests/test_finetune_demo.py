"""The demo's finetuning stage (``make demo``'s 4b) on a stand-in search directory: slow suite.

A 30-step demo-light pretraining run (what a completed demo trial is) is laid
out as a search trial (its checkpoint in Ray's storage ``train/<trial>/``, its
recipe in ``tb/<trial>/``); the stage must finetune it on VQA and print the
score next to the majority answer's, above it, and say how long it took.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from vlptune import demo
from vlptune.config import load_recipe
from vlptune.search.layout import TB_DIR, TRAIN_DIR, TRIAL_RECIPE
from vlptune.train.loop import train_worker
from vlptune.train.reporting import LocalReporter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TRIAL = "trial_0001"


def test_demo_finetune_stage_beats_the_majority_answer(tmp_path, capsys):
    overrides = [
        f"data.root={tmp_path / 'world'}",
        "data.synth.train=400",
        "data.synth.val=100",
        "train.max_steps=30",
        "train.eval_every=30",
        "eval.max_images=16",
    ]
    recipe = load_recipe(demo.DEMO_RECIPE, overrides)
    train_worker(recipe, LocalReporter(quiet=True), tmp_path / "pre", resume=False)
    search = tmp_path / "search"
    checkpoint = sorted((tmp_path / "pre" / "checkpoints").glob("step_*"))[-1]
    shutil.copytree(checkpoint, search / TRAIN_DIR / TRIAL / "checkpoint_2026-01-01_00-00-00.000000")
    (search / TB_DIR / TRIAL).mkdir(parents=True)
    shutil.copy(tmp_path / "pre" / "recipe.yaml", search / TB_DIR / TRIAL / TRIAL_RECIPE)
    capsys.readouterr()
    start = time.perf_counter()
    assert demo.stage_finetune(search, TRIAL, tmp_path, demo.FINETUNE_STEPS) == 0
    seconds = time.perf_counter() - start
    text = capsys.readouterr().out
    found = re.search(r"vqa: score = ([\d.]+) \(chance ([\d.]+)\)", text)
    assert found, text
    score, chance = float(found.group(1)), float(found.group(2))
    print(f"demo finetune stage: VQA score {score:.1f} vs majority {chance:.1f} in {seconds:.0f} s")
    assert score > chance + 5.0, text
