"""The demo's downstream metric learns within the demo's budget (slow suite).

``make demo``'s search ranks by ``downstream/vqa/score``: a trial that completes
its 30 pretraining steps finetunes its final checkpoint on VQA with the
space's ``downstream.vqa`` settings. Here one such trial, in this process: a
demo-light recipe as the demo space resolves it (its ``fixed:``, the corner
values of its parameters), pretrained for the space's 30 steps, then the
trial's finetuning step (:func:`vlptune.search.finetune.finish_with_downstream`)
with each task's run in this process instead of a Ray Train run. The VQA
score must clear the majority answer's clearly.
"""

from __future__ import annotations

import time

import pytest

from vlptune import demo
from vlptune.config import validate_recipe
from vlptune.data.prepare import ensure_data
from vlptune.search.finetune import finish_with_downstream
from vlptune.search.space import load_space
from vlptune.train.checkpoint import latest_checkpoint
from vlptune.train.finetune import finetune_worker
from vlptune.train.loop import train_worker
from vlptune.train.reporting import LocalReporter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

METRIC = "downstream/vqa/score"


def test_the_demo_trials_vqa_score_beats_the_majority_answer(tmp_path):
    space = load_space(demo.DEMO_SPACE, overrides=[f"data.root={tmp_path / 'world'}", "train.keep_when_done=last"])
    assert space.metric == METRIC and (space.prune_metric, space.prune_mode) == ("val/mlm_acc", "max")
    raw = space.resolve(space.corner_values()[0])
    recipe = validate_recipe(raw, "demo trial")
    ensure_data(recipe)
    run = tmp_path / "tb" / "trial"
    train_worker(recipe, LocalReporter(quiet=True), str(run), resume=False)
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None

    def in_process(recipe, task, checkpoint, out_dir, storage, name, failures_max):
        return finetune_worker(recipe, task, checkpoint, LocalReporter(quiet=True), out_dir)

    start = time.perf_counter()
    final = finish_with_downstream({"step": recipe.train.max_steps}, recipe, str(checkpoint), run, str(tmp_path / "train"), "trial", False, 0, in_process)
    seconds = time.perf_counter() - start
    score, chance = final[METRIC], final["downstream/vqa/chance_score"]
    print(f"demo trial: VQA score {score:.1f} vs majority {chance:.1f}; finetuning took {seconds:.0f} s")
    assert score > chance + 5.0, final
