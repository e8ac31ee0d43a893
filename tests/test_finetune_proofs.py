"""The proofs that finetuning learns and that pretraining pays, over 3 seeds (slow suite, ~15-25 minutes on 2 cores).

For each seed s in 0, 1, 2: pretrain the small recipe (MLM + ITM,
``PRETRAIN_STEPS`` steps, ``train.seed = s``), then finetune every task from
that checkpoint (``BUDGETS``, task seed s), and the tasks of
``RANDOM_INIT_TASKS`` also from random initialisation at the same budget.
Asserted, on the means over the seeds (the issue's bars; the values this
test measured are in the report of issue 16 and printed with ``-s``):

* VQA score well above the majority answer; NLVR2 above 50 %, SNLI-VE above
  33 % (passes);
* retrieval R@1 several times chance, and the pretrained checkpoint beating
  random initialisation on at least one task by Welch's interval of the study
  statistics (vlptune.study.stats): both measured false at this budget, so
  they are strict xfails (they fail loudly once they start to pass).

Every run's metrics are printed (``-s``) and written to ``proofs.json``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from test_finetune_tasks import WORLD_SIZE, WORLD_TRAIN, WORLD_VAL, finetune, pretrain
from vlptune.data.synth import make_world
from vlptune.study.stats import compare

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

SEEDS = (0, 1, 2)
PRETRAIN_STEPS = 250
RECORD = {"batch_size": 16, "eval_records": 400, "pooling": "mean", "patience": 0, "lr": 3e-4}
BUDGETS: dict[str, dict[str, Any]] = {
    "vqa": {**RECORD, "max_steps": 40, "eval_every": 20},
    "snli_ve": {**RECORD, "max_steps": 20, "eval_every": 20},
    "nlvr2": {**RECORD, "max_steps": 60, "eval_every": 30},
    "retrieval": {
        "max_steps": 60,
        "eval_every": 30,
        "lr": 1e-4,
        "batch_size": 8,
        "eval_images": 40,
        "captions_per_image": 1,
        "candidates": 0,
        "eval_split": "val",
        "patience": 0,
    },
}
RANDOM_INIT_TASKS = ("retrieval", "vqa")
MAIN = {"vqa": "score", "snli_ve": "acc", "nlvr2": "acc", "retrieval": "rsum"}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def proofs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("proofs")
    make_world(root / "world", train=WORLD_TRAIN, val=WORLD_VAL, image_size=WORLD_SIZE, seed=5, caption_style="descriptive")
    out: dict[str, Any] = {}
    for seed in SEEDS:
        run = pretrain(root / "world", root / f"pre{seed}", PRETRAIN_STEPS, seed=seed)
        checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
        for task, fields in BUDGETS.items():
            for init, source in (("pretrained", checkpoint), ("random", None))[: 2 if task in RANDOM_INIT_TASKS else 1]:
                metrics = finetune(root / "world", root / f"{task}-{init}-{seed}", task, seed=seed, checkpoint=source, **fields)
                row = {k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if k.startswith(f"downstream/{task}/") and isinstance(v, float)}
                out.setdefault(task, {}).setdefault(init, []).append(row)
                print(f"seed {seed} {task} {init}: {MAIN[task]} {row[MAIN[task]]:.2f} (chance {row['chance_' + MAIN[task]]:.2f})", flush=True)
    (root / "proofs.json").write_text(json.dumps(out, indent=1))
    print(f"proofs: {root / 'proofs.json'}")
    return out


def values(proofs: dict[str, Any], task: str, init: str, key: str) -> list[float]:
    return [row[key] for row in proofs[task][init]]


def test_vqa_nlvr2_and_snli_ve_learn_well_above_chance_after_pretraining(proofs):
    # measured (seeds 0/1/2, 2 cores, heavily loaded): VQA score 31.2 / 31.2 / 28.7 against the majority
    # answer's 15.3; SNLI-VE 84.2 / 80.8 / 62.5 % (chance 33.3); NLVR2 55.0 / 65.0 / 60.0 % (chance 50)
    vqa, vqa_chance = values(proofs, "vqa", "pretrained", "score"), values(proofs, "vqa", "pretrained", "chance_score")
    assert mean(vqa) > mean(vqa_chance) + 10.0, (vqa, vqa_chance)
    assert mean(values(proofs, "snli_ve", "pretrained", "acc")) > 33.3 + 25.0, proofs["snli_ve"]["pretrained"]
    assert mean(values(proofs, "nlvr2", "pretrained", "acc")) > 50.0 + 5.0, proofs["nlvr2"]["pretrained"]


NOT_YET = "measured false at this budget (issue 16 report): needs longer pretraining than this test affords"


@pytest.mark.xfail(strict=True, reason=NOT_YET)
def test_retrieval_r1_is_several_times_chance_after_pretraining(proofs):
    # measured (seeds 0/1/2): TR+IR R@1 2.5 / 7.5 / 5.0 against chance 5.0 (40 images), RSUM 85.0 / 85.0 / 77.5
    # against 80: 250 pretraining steps of MLM + ITM and 60 finetuning steps leave ITM at chance on the small
    # model (tests/test_learning.py: ITM alone needs ~1000 steps on demo-light for R@1 2.5x chance)
    r1 = [row["tr_r1"] + row["ir_r1"] for row in proofs["retrieval"]["pretrained"]]
    chance = [row["chance_tr_r1"] + row["chance_ir_r1"] for row in proofs["retrieval"]["pretrained"]]
    assert mean(r1) > 3.0 * mean(chance), (r1, chance)


@pytest.mark.xfail(strict=True, reason=NOT_YET)
def test_pretraining_beats_random_initialisation_on_a_task(proofs):
    # measured (seeds 0/1/2), pretrained - random at equal finetuning budget: VQA -1.3 points (95% CI
    # [-5.8, +3.3], p 0.46), retrieval RSUM -3.3 (CI [-12.9, +6.3], p 0.31): no difference shown yet
    better = {}
    for task in RANDOM_INIT_TASKS:
        key = MAIN[task]
        c = compare(values(proofs, task, "pretrained", key), values(proofs, task, "random", key))
        better[task] = (c.diff, c.ci_low, c.p)
    assert any(ci_low is not None and ci_low > 0.0 for _, ci_low, _ in better.values()), better
