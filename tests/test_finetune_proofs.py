"""The proofs that finetuning learns and that pretraining pays, over 3 seeds (slow suite; the demo-light part measured 19 min 35 s on 2 cores with its world and backbone).

* VQA, NLVR2 and SNLI-VE (the small recipe): for each seed s in 0, 1, 2,
  pretrain it (MLM + ITM, ``PRETRAIN_STEPS`` steps, ``train.seed = s``), then
  finetune each task from that checkpoint (``BUDGETS``, task seed s). Asserted
  on the means over the seeds: VQA score well above the majority answer,
  NLVR2 above 50 %, SNLI-VE above 33 %.
* Retrieval, and pretrained against random initialisation (demo-light, the
  recipe whose SOHO mix aligns images and texts): for each seed, pretrain
  ``DEMO_PRETRAIN_STEPS`` steps, finetune retrieval from that checkpoint and
  from no VLP pretraining at the same budget (``DEMO_RETRIEVAL``). Asserted:
  TR + IR R@1 several times chance, and the pretrained checkpoint ahead of
  random initialisation by Welch's 95 % interval of the study statistics
  (vlptune.study.stats).

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
}
MAIN = {"vqa": "score", "snli_ve": "acc", "nlvr2": "acc"}


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
            metrics = finetune(root / "world", root / f"{task}-{seed}", task, seed=seed, checkpoint=checkpoint, **fields)
            row = {k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if k.startswith(f"downstream/{task}/") and isinstance(v, float)}
            out.setdefault(task, {}).setdefault("pretrained", []).append(row)
            print(f"seed {seed} {task}: {MAIN[task]} {row[MAIN[task]]:.2f} (chance {row['chance_' + MAIN[task]]:.2f})", flush=True)
    (root / "proofs.json").write_text(json.dumps(out, indent=1))
    print(f"proofs: {root / 'proofs.json'}")
    return out


def values(proofs: dict[str, Any], task: str, init: str, key: str) -> list[float]:
    return [row[key] for row in proofs[task][init]]


def test_vqa_nlvr2_and_snli_ve_learn_well_above_chance_after_pretraining(proofs):
    # measured (seeds 0/1/2, 2 cores, 5 min 35 s): VQA score 31.9 / 31.2 / 28.0 against the majority answer's
    # 15.3; SNLI-VE 86.7 / 82.5 / 62.5 % (chance 33.3); NLVR2 55.0 / 62.5 / 60.0 % (chance 50). Before its fixture
    # dropped the retrieval and random-init runs: 31.2 / 31.2 / 28.7, 84.2 / 80.8 / 62.5, 55.0 / 65.0 / 60.0
    vqa, vqa_chance = values(proofs, "vqa", "pretrained", "score"), values(proofs, "vqa", "pretrained", "chance_score")
    assert mean(vqa) > mean(vqa_chance) + 10.0, (vqa, vqa_chance)
    assert mean(values(proofs, "snli_ve", "pretrained", "acc")) > 33.3 + 25.0, proofs["snli_ve"]["pretrained"]
    assert mean(values(proofs, "nlvr2", "pretrained", "acc")) > 50.0 + 5.0, proofs["nlvr2"]["pretrained"]


# ---------------------------------------------------------------- retrieval, and what pretraining pays: demo-light

# demo-light (the recipe that aligns images and texts: issue 15) pretrained for DEMO_PRETRAIN_STEPS
# steps per seed on the demo world, its CNN from the world-pretrained backbone (model.backbone.init:
# pretrained, made once under the world); then retrieval finetuned from that checkpoint and, at the
# same budget, from no VLP pretraining (the CNN still the world-pretrained one, as a paper's baseline
# keeps its ImageNet CNN). The small recipe above (MLM + ITM, 250 steps) left ITM at chance: its
# retrieval R@1 was 2.5 / 7.5 / 5.0 against 5.0 and pretrained - random RSUM -3.3 (CI [-12.9, +6.3]).
DEMO_PRETRAIN_STEPS = 300  # the default learning test's cut of demo-light's 500 steps
DEMO_RETRIEVAL = {
    "max_steps": 60,
    "eval_every": 30,
    "lr": 1e-4,
    "batch_size": 8,
    "eval_images": 50,
    "captions_per_image": 1,
    "candidates": 0,
    "eval_split": "val",
    "patience": 0,
}


@pytest.fixture(scope="module")
def demo_proofs(tmp_path_factory) -> dict[str, list[dict[str, float]]]:
    from test_learning import DEMO, demo_world_at
    from vlptune.config import load_recipe, recipe_to_dict, validate_recipe
    from vlptune.train.finetune import finetune_worker
    from vlptune.train.loop import train_worker
    from vlptune.train.reporting import LocalReporter

    world = demo_world_at(tmp_path_factory)
    root = tmp_path_factory.mktemp("demo-proofs")
    out: dict[str, list[dict[str, float]]] = {}
    for seed in SEEDS:
        steps = [f"train.max_steps={DEMO_PRETRAIN_STEPS}", f"train.eval_every={DEMO_PRETRAIN_STEPS}", f"train.seed={seed}"]
        recipe = load_recipe(DEMO, [f"data.root={world}", *steps])
        pre = train_worker(recipe, LocalReporter(quiet=True), root / f"pre{seed}", resume=False)
        spec = recipe_to_dict(recipe)
        spec["downstream"] = {"retrieval": {"seed": seed, **DEMO_RETRIEVAL}}
        task_recipe = validate_recipe(spec, "demo-light retrieval finetuning")
        for init, source in (("pretrained", pre["checkpoint"]), ("random", None)):
            metrics = finetune_worker(task_recipe, "retrieval", source, LocalReporter(quiet=True), root / f"retrieval-{init}-{seed}")
            row = {k.rsplit("/", 1)[-1]: v for k, v in metrics.items() if k.startswith("downstream/retrieval/") and isinstance(v, float)}
            out.setdefault(init, []).append(row)
            print(
                f"seed {seed} demo-light retrieval {init}: TR/IR R@1 {row['tr_r1']:.0f}/{row['ir_r1']:.0f} (chance {row['chance_tr_r1']:.0f}), "
                f"RSUM {row['rsum']:.1f} (chance {row['chance_rsum']:.1f})",
                flush=True,
            )
    (root / "proofs.json").write_text(json.dumps(out, indent=1))
    print(f"demo-light proofs: {root / 'proofs.json'}")
    return out


def test_retrieval_r1_is_several_times_chance_after_pretraining(demo_proofs):
    # measured (seeds 0/1/2, 2 cores): TR / IR R@1 14 / 8, 28 / 22, 16 / 14 against chance 2 / 2 (50 images): TR+IR
    # 22 / 50 / 30 against 4, 8.5x on the mean; RSUM 264 / 346 / 278 against 64
    r1 = [row["tr_r1"] + row["ir_r1"] for row in demo_proofs["pretrained"]]
    chance = [row["chance_tr_r1"] + row["chance_ir_r1"] for row in demo_proofs["pretrained"]]
    assert mean(r1) > 3.0 * mean(chance), (r1, chance)


def test_pretraining_beats_random_initialisation_on_a_task(demo_proofs):
    # Welch's 95% interval of pretrained - random RSUM at equal finetuning budget (vlptune.study.stats); measured:
    # random init RSUM 130 / 80 / 118 (R@1 4 / 6, 0 / 2, 2 / 6), pretrained - random +187 [+97, +276], p 0.006
    c = compare([row["rsum"] for row in demo_proofs["pretrained"]], [row["rsum"] for row in demo_proofs["random"]])
    assert c.ci_low is not None and c.ci_low > 0.0, (c.diff, c.ci_low, c.p, demo_proofs)
