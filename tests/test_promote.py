"""Promotion: picking complete trials, the fidelity map's rules, provenance, the rank report.

The source experiment is a hand-written experiment directory in the format
``vlptune.search.results.collect`` reads (Tune's experiment state and each
trial's result.json, the Optuna study, the experiment meta and base recipe);
no Ray cluster runs here.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from vlptune.cli import main as vlptune_main
from vlptune.config import load_recipe
from vlptune.search import results as res
from vlptune.search.layout import BASE_COPY, META_FILE, OPTUNA_DB
from vlptune.study import promote as pr
from vlptune.study.fidelity import FidelityMapError, Ratios, load_fidelity_map
from vlptune.study.promote_report import format_report, rank_report

METRIC = "retrieval/rsum"
MAX_STEPS = 40
EVAL_EVERY = 10
PARAMS = ["model.vd.size", "objectives.mvm.weight", "data.image_size", "optim.transformer.lr", "optim.backbone.lr", "optim.warmup_steps"]
DISTRIBUTIONS = {
    "model.vd.size": CategoricalDistribution([0, 32, 64]),
    "objectives.mvm.weight": FloatDistribution(0.0, 2.0),
    "data.image_size": CategoricalDistribution([64, 96]),
    "optim.transformer.lr": FloatDistribution(1e-5, 1e-3, log=True),
    "optim.backbone.lr": FloatDistribution(1e-3, 1e-1, log=True),
    "optim.warmup_steps": IntDistribution(0, 10),
}
# The source: 8 images per step on 1 worker, 40 steps.
BASE = {
    "name": "light-test",
    "data": {"root": "data/none", "synthesize": False, "batch_images": 8, "image_size": 96},
    "model": {"vd": {"size": 64}, "backbone": {"depth": 18}},
    "objectives": {"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}, "mvm": {"weight": 1.0}},
    "optim": {"transformer": {"lr": 1e-4}, "backbone": {"lr": 1e-2}, "warmup_steps": 2},
    "train": {"max_steps": MAX_STEPS, "eval_every": EVAL_EVERY},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}
# The target: 16 images x 2 workers = 32 per step (4x the source), 400 steps (10x).
TARGET = """
name: full-test
data: {root: data/none, synthesize: false, batch_images: 16, image_size: 128}
model: {vd: {size: 256}, backbone: {depth: 50}, fusion: {layers: 6}}
objectives: {mlm: {weight: 1.0}, itm: {weight: 1.0}, mvm: {weight: 1.0}}
optim: {transformer: {lr: 1.0e-4}, backbone: {lr: 1.0e-2}, warmup_steps: 20}
train: {max_steps: 400, eval_every: 100}
resources: {workers: 2, cpus_per_worker: 1}
"""
MAP = """
description: test light -> full
rules:
  model.vd.size: carry
  objectives.*.weight: carry
  data.image_size: target
  optim.transformer.lr: lr_sqrt
  optim.backbone.lr: lr_linear
  optim.warmup_steps: steps
"""


def _values(vd: int, w: float, img: int, tlr: float, blr: float, warm: int) -> dict:
    return dict(zip(PARAMS, [vd, w, img, tlr, blr, warm]))


# trial id -> (params, history of (step, metric), outcome told to Optuna, Tune status)
TRIALS = {
    "abc_00000": (_values(32, 1.5, 64, 1e-4, 1e-2, 5), [(10, 150.0), (20, 180.0), (40, 210.0)], "completed", "TERMINATED"),
    "abc_00001": (_values(64, 0.5, 96, 2e-4, 2e-2, 3), [(10, 140.0), (20, 170.0), (40, 205.0)], "completed", "TERMINATED"),
    "abc_00002": (_values(0, 0.0, 96, 3e-4, 5e-3, 7), [(10, 130.0), (20, 160.0), (40, 200.0)], "completed", "TERMINATED"),
    # the best value of all, but ASHA stopped it at step 20: must never be promoted
    "abc_00003": (_values(32, 2.0, 96, 5e-4, 1e-2, 1), [(10, 240.0), (20, 250.0)], "pruned", "TERMINATED"),
    # non-finite metric at the end
    "abc_00004": (_values(64, 1.0, 64, 1e-3, 1e-1, 9), [(10, 220.0), (40, float("nan"))], "nan", "TERMINATED"),
    # crashed
    "abc_00005": (_values(32, 1.0, 64, 1e-5, 1e-3, 0), [(10, 230.0)], "error", "ERROR"),
}


def make_experiment(root: Path, name: str = "light-exp", metric: str = METRIC) -> Path:
    """A search experiment directory as `vlptune search` leaves it, written by hand (ranked by ``metric``)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune import PlacementGroupFactory
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    exp = (root / name).resolve()
    exp.mkdir(parents=True)
    storage_url = f"sqlite:///{exp / OPTUNA_DB}"
    meta = {
        "name": name,
        "space_file": str(exp / "space.yaml"),
        "base_file": str(exp / "light.yaml"),
        "overrides": [],
        "metric": metric,
        "mode": "max",
        "max_fidelity": MAX_STEPS,
        "time_attr": "step",
        "parameters": PARAMS,
        "storage_url": storage_url,
        "study_name": name,
        "scheduler": "asha",
        "searcher": "tpe",
        "num_samples": len(TRIALS),
        "address": None,
        "created": "2025-01-01T00:00:00",
    }
    (exp / META_FILE).write_text(json.dumps(meta))
    (exp / BASE_COPY).write_text(yaml.safe_dump(BASE))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_url, study_name=name, direction="maximize")
    states = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
    tune_states = []
    for tid, (params, history, outcome, tune_status) in TRIALS.items():
        last_step, last_value = history[-1]
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=DISTRIBUTIONS,
                state=states.get(outcome, TrialState.FAIL),
                value=last_value if outcome == "completed" else None,
                intermediate_values={s: v for s, v in history if math.isfinite(v)},
                user_attrs={"ray_trial_id": tid, "outcome": outcome, "fidelity": last_step},
            )
        )
        ctx = StorageContext(storage_path=str(exp.parent), experiment_dir_name=exp.name, trial_dir_name=f"vlptune_trial_{tid}")
        trial = Trial(
            "vlptune_trial", config=params, trial_id=tid, stub=True, storage=ctx, placement_group_factory=PlacementGroupFactory([{"CPU": 0, "memory": 2**20}])
        )
        trial.create_placement_group_factory()
        trial.status = tune_status
        trial_dir = Path(trial.storage.trial_fs_path)
        trial_dir.mkdir(parents=True)
        lines = [json.dumps({"step": s, metric: v, "time_total_s": float(s)}) for s, v in history]
        (trial_dir / "result.json").write_text("\n".join(lines) + "\n")
        trial.run_metadata.last_result = {"step": last_step, metric: last_value}
        tune_states.append(trial.get_json_state())
    (exp / TuneController.CKPT_FILE_TMPL.format("2025-01-01_00-00-00")).write_text(json.dumps({"trial_data": tune_states}))
    return exp


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    return make_experiment(tmp_path_factory.mktemp("src"))


@pytest.fixture
def target(tmp_path) -> Path:
    path = tmp_path / "trials" / "full-test.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(textwrap.dedent(TARGET))
    return path


@pytest.fixture
def fmap(tmp_path) -> Path:
    path = tmp_path / "map.yaml"
    path.write_text(textwrap.dedent(MAP))
    return path


# ------------------------------------------------------------------ selection


def test_collect_reads_the_fake_experiment(experiment):
    collected = res.collect(experiment)
    status = {r.trial_id: r.status for r in collected.rows}
    assert status == {
        "abc_00000": "completed",
        "abc_00001": "completed",
        "abc_00002": "completed",
        "abc_00003": "pruned",
        "abc_00004": "nan",
        "abc_00005": "error",
    }


def test_selection_takes_only_trials_that_completed_the_final_fidelity(experiment):
    collected = res.collect(experiment)
    sel = pr.select_trials(collected, top_k=2)
    assert [r.trial_id for r in sel.picked] == ["abc_00000", "abc_00001"]
    assert sel.eligible == 3
    reasons = {r.trial_id: why for r, why in sel.skipped}
    assert set(reasons) == {"abc_00003", "abc_00004", "abc_00005"}
    assert "stopped early" in reasons["abc_00003"] and "step 20" in reasons["abc_00003"]
    # asking for more than completed gives the completed ones, never the pruned one with the best value
    assert [r.trial_id for r in pr.select_trials(collected, top_k=5).picked] == ["abc_00000", "abc_00001", "abc_00002"]


def test_a_completed_status_below_the_final_fidelity_is_refused(experiment):
    collected = res.collect(experiment)
    row = next(r for r in collected.rows if r.trial_id == "abc_00000")
    row.fidelity = MAX_STEPS // 2
    assert "not the final fidelity" in pr.skip_reason(row, MAX_STEPS)


# ------------------------------------------------------------------ fidelity map


def test_ratios_by_hand():
    from vlptune.config import Recipe

    source = Recipe.model_validate(BASE)
    target = Recipe.model_validate(yaml.safe_load(TARGET))
    r = Ratios.between(source, target)
    assert (r.source_batch, r.target_batch, r.source_steps, r.target_steps) == (8, 32, 40, 400)
    assert r.factor("lr_linear") == pytest.approx(4.0)
    assert r.factor("lr_sqrt") == pytest.approx(2.0)
    assert r.factor("steps") == pytest.approx(10.0)
    assert r.factor("carry") == 1.0


def test_promote_writes_mapped_recipes_with_provenance(experiment, target, fmap, tmp_path):
    out = tmp_path / "promoted"
    promotion = pr.promote(experiment, top_k=2, target=target, fidelity_map=fmap, promoted_dir=out)
    assert [t.trial_id for t in promotion.trials] == ["abc_00000", "abc_00001"]
    first = promotion.trials[0]
    path = out / experiment.name / "abc_00000.yaml"
    assert Path(first.file) == path.resolve() and path.is_file()
    # hand-computed: lr_sqrt 1e-4 * sqrt(32/8) = 2e-4; lr_linear 1e-2 * 32/8 = 4e-2; steps 5 * 400/40 = 50
    assert first.overrides == {
        "model.vd.size": 32,
        "objectives.mvm.weight": 1.5,
        "optim.transformer.lr": pytest.approx(2e-4),
        "optim.backbone.lr": pytest.approx(4e-2),
        "optim.warmup_steps": 50,
    }
    recipe = load_recipe(path)
    assert recipe.model.vd.size == 32
    assert recipe.objectives["mvm"].weight == 1.5
    assert recipe.data.image_size == 128  # rule target: the trial's 64 is dropped
    assert recipe.model.backbone.depth == 50  # not searched: the target's
    assert recipe.optim.transformer.lr == pytest.approx(2e-4)
    assert recipe.optim.backbone.lr == pytest.approx(4e-2)
    assert recipe.optim.warmup_steps == 50
    assert recipe.train.max_steps == 400
    assert yaml.safe_load(path.read_text())["base"] == "../../trials/full-test.yaml"
    prov = pr.read_provenance(path)
    assert prov["source_experiment"] == str(experiment)
    assert prov["trial_id"] == "abc_00000" and prov["rank"] == 1
    assert prov["metric"] == METRIC and prov["metric_value"] == 210.0
    assert prov["fidelity"] == MAX_STEPS == prov["max_fidelity"]
    assert prov["searched"] == TRIALS["abc_00000"][0]
    rules = {m["path"]: m for m in prov["mapped"]}
    assert rules["data.image_size"]["rule"] == "target" and rules["data.image_size"]["trial"] == 64 and rules["data.image_size"]["promoted"] == 128
    assert rules["optim.transformer.lr"]["rule"] == "lr_sqrt" and rules["optim.transformer.lr"]["factor"] == pytest.approx(2.0)
    assert rules["objectives.mvm.weight"]["map_entry"] == "objectives.*.weight"
    assert prov["git_commit"] and prov["date"]
    assert prov["target"] == str(target.resolve()) and prov["fidelity_map"] == str(fmap.resolve())
    # the second trial: 3 warmup steps x 10 = 30; 2e-2 x 4 = 8e-2
    second = load_recipe(out / experiment.name / "abc_00001.yaml")
    assert second.optim.warmup_steps == 30 and second.optim.backbone.lr == pytest.approx(8e-2) and second.model.vd.size == 64


def test_a_target_without_objectives_keeps_the_default_ones(experiment, tmp_path, fmap):
    bare = tmp_path / "bare.yaml"
    bare.write_text(textwrap.dedent(TARGET).replace("objectives: {mlm: {weight: 1.0}, itm: {weight: 1.0}, mvm: {weight: 1.0}}\n", ""))
    promotion = pr.promote(experiment, top_k=1, target=bare, fidelity_map=fmap, promoted_dir=tmp_path / "p")
    recipe = load_recipe(promotion.trials[0].file)
    assert sorted(recipe.objectives) == ["itm", "mlm", "mvm"]  # not only the mapped mvm
    assert recipe.objectives["mvm"].weight == 1.5


def test_an_unmapped_searched_parameter_is_refused_by_name(experiment, target, tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text(MAP.replace("  data.image_size: target\n", "").replace("  optim.warmup_steps: steps\n", ""))
    with pytest.raises(FidelityMapError, match=r"data\.image_size, optim\.warmup_steps") as info:
        pr.promote(experiment, top_k=2, target=target, fidelity_map=partial, promoted_dir=tmp_path / "out")
    assert "silent carry-over" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    "rules, message",
    [
        ("model.vd.size: scale", r"rules\.model\.vd\.size.*carry.*lr_linear"),
        ("model.backbone.init: lr_linear", r"not a numeric field"),
        ("model.vd.sise: carry", r"rules\.model\.vd\.sise.*no field 'sise'"),
        ("modle.*.lr: lr_sqrt", r"'modle', which is not a recipe section"),
    ],
)
def test_bad_fidelity_maps_are_refused(tmp_path, rules, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"rules:\n  {rules}\n")
    with pytest.raises(FidelityMapError, match=message):
        load_fidelity_map(path)


def test_map_precedence_exact_before_glob(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("rules:\n  objectives.*.weight: carry\n  objectives.mvm.weight: target\n  optim.*.lr: lr_sqrt\n  optim.backbone.lr: lr_linear\n")
    m = load_fidelity_map(path)
    assert m.rule_for("objectives.mvm.weight") == ("objectives.mvm.weight", "target")
    assert m.rule_for("objectives.itm.weight") == ("objectives.*.weight", "carry")
    assert m.rule_for("optim.backbone.lr") == ("optim.backbone.lr", "lr_linear")
    assert m.rule_for("optim.transformer.lr") == ("optim.*.lr", "lr_sqrt")
    assert m.rule_for("data.mlm_prob") is None


def test_shipped_maps_cover_the_shipped_spaces():
    from vlptune.search.space import load_space

    for space, fmap in (("search_spaces/demo.yaml", "trials/fidelity/demo.yaml"), ("search_spaces/soho_light.yaml", "trials/fidelity/light-to-full.yaml")):
        params = [p.path for p in load_space(pr.REPO / space).params]
        assert load_fidelity_map(pr.REPO / fmap).uncovered(params) == [], space


def test_promotion_becomes_a_study_with_the_same_overrides(experiment, target, fmap, tmp_path):
    promotion = pr.promote(experiment, top_k=2, target=target, fidelity_map=fmap, promoted_dir=tmp_path / "p")
    spec = pr.promotion_study(promotion, seeds=2, fixed={"train.max_steps": 10, "train.eval_every": 5}, resources={"workers": 1}, max_concurrent=2)
    assert spec.variants == {t.trial_id: t.overrides for t in promotion.trials}
    assert spec.baseline == "abc_00000" and spec.seeds == 2 and spec.metric == METRIC and spec.mode == "max"
    assert Path(spec.base_file) == target.resolve()
    assert spec.max_fidelity == 10
    assert spec.variant_recipe("abc_00001").optim.warmup_steps == 30
    assert "train.max_steps = 10 instead of the target's 400" in pr.run_note(promotion, spec.fixed)
    assert "optim.warmup_steps" in pr.run_note(promotion, spec.fixed)  # steps-scaled for 400, not 10
    one = pr.promote(experiment, top_k=1, target=target, fidelity_map=fmap, promoted_dir=tmp_path / "q")
    with pytest.raises(pr.PromotionError, match="at least 2"):
        pr.promotion_study(one, seeds=1)


def test_promotion_record_round_trip(experiment, target, fmap, tmp_path):
    promotion = pr.promote(experiment, top_k=2, target=target, fidelity_map=fmap, promoted_dir=tmp_path / "p")
    pr.write_promotion_record(tmp_path / "run", promotion, {"seeds": 1})
    again, run = pr.read_promotion_record(tmp_path / "run")
    assert again == promotion and run == {"seeds": 1}
    with pytest.raises(pr.PromotionError, match="not a promoted run"):
        pr.read_promotion_record(tmp_path)


def test_promote_command(experiment, target, fmap, tmp_path, capsys):
    code = vlptune_main(["promote", str(experiment), "--top-k", "2", "--to", str(target), "--map", str(fmap), "--promoted-dir", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert code == 0
    assert "#1 abc_00000" in out and "#2 abc_00001" in out
    assert "abc_00003" in out and "stopped early" in out  # said why the pruned one was not taken
    assert "showed a better" in out


def test_git_commit_outside_a_checkout(tmp_path):
    assert pr.git_commit(tmp_path) == "unknown"


# ------------------------------------------------------------------ the report


def test_rank_report_by_hand():
    # light ranks a b c d; full ranks a c d b. Spearman: d = 0, 2, -1, -1 -> 1 - 6*6/(4*15) = 0.4.
    # Kendall: 6 pairs, 4 concordant, 2 discordant -> (4 - 2)/6 = 1/3.
    r = rank_report(["a", "b", "c", "d"], [4.0, 3.0, 2.0, 1.0], [40.0, 10.0, 30.0, 20.0], metric=METRIC, mode="max")
    assert r.spearman == pytest.approx(0.4)
    assert r.kendall == pytest.approx(1 / 3)
    assert r.light_winner == r.full_winner == "a" and r.same_winner is True
    assert [row.full_rank for row in r.rows] == [1, 4, 2, 3]
    assert r.predicted is True and not r.warnings


def test_rank_report_warns_when_light_did_not_predict_full():
    r = rank_report(["a", "b", "c"], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], metric=METRIC, mode="max")
    assert r.spearman == pytest.approx(-1.0) and r.kendall == pytest.approx(-1.0)
    assert (r.light_winner, r.full_winner, r.same_winner, r.predicted) == ("c", "a", False, False)
    text = format_report(r)
    assert "WARNING: the light winner (c) is not the full winner (a)" in text
    assert "did not predict the full one" in text and "reversed" in text


def test_rank_report_mode_min_and_winner_mismatch():
    # lower is better: light a < b < c, full b < a < c. Spearman 1 - 6*2/(3*8) = 0.5; Kendall (2 - 1)/3.
    r = rank_report(["a", "b", "c"], [1.0, 2.0, 3.0], [2.0, 1.0, 3.0], metric="val/loss", mode="min")
    assert r.spearman == pytest.approx(0.5) and r.kendall == pytest.approx(1 / 3)
    assert (r.light_winner, r.full_winner) == ("a", "b")
    assert r.predicted is False and any("not the full winner" in w for w in r.warnings)


def test_rank_report_two_configs_is_only_a_sign_and_missing_full_is_left_out():
    r = rank_report(["a", "b", "c"], [5.0, 4.0, 3.0], [50.0, 40.0, None], metric=METRIC, mode="max")
    assert r.n == 2 and r.spearman == pytest.approx(1.0)
    text = format_report(r)
    assert "only be +1 or -1: it is a sign" in text
    assert "no full result for c" in text
    single = rank_report(["a"], [1.0], [2.0], metric=METRIC, mode="max")
    assert single.spearman is None and single.predicted is None and "at least 2" in format_report(single)


# ------------------------------------------------------------------ --run, end to end (Ray)

STANDIN = textwrap.dedent(
    """
    def worker(recipe, reporter, out_dir, resume=True):
        # the full metric falls with the MVM weight: the reverse of the light order
        value = 100.0 - 10.0 * recipe.objectives["mvm"].weight + recipe.train.seed
        for step in range(recipe.train.eval_every, recipe.train.max_steps + 1, recipe.train.eval_every):
            reporter.report({"step": step, "retrieval/rsum": value}, None)
        return {"step": recipe.train.max_steps, "stop_reason": "max_steps"}
    """
)


@pytest.mark.slow
def test_run_and_report_end_to_end(experiment, target, fmap, tmp_path):
    import importlib.util
    import sys

    import ray.cloudpickle

    from vlptune.study.promote_report import collect_report

    path = tmp_path / "standin_promote.py"
    path.write_text(STANDIN)
    spec_ = importlib.util.spec_from_file_location("standin_promote", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    sys.modules[spec_.name] = module
    ray.cloudpickle.register_pickle_by_value(module)

    promotion = pr.promote(experiment, top_k=3, target=target, fidelity_map=fmap, promoted_dir=tmp_path / "p")
    spec = pr.promotion_study(
        promotion, seeds=2, fixed={"train.max_steps": 4, "train.eval_every": 2}, resources={"workers": 1, "cpus_per_worker": 1}, max_concurrent=2
    )
    exp_dir = pr.run_promotion(promotion, spec, exp_dir=tmp_path / "run", worker_fn=module.worker, verbose=0)
    again, run = pr.read_promotion_record(exp_dir)
    assert again == promotion and run["seeds"] == 2 and run["fixed"] == {"train.max_steps": 4, "train.eval_every": 2}
    report, _ = collect_report(exp_dir)
    full = {r.name: (r.full, r.full_n) for r in report.rows}
    # 100 - 10 x mvm weight, + seed (0 and 1): means over the 2 seeds by hand
    assert full == {"abc_00000": (pytest.approx(85.5), 2), "abc_00001": (pytest.approx(95.5), 2), "abc_00002": (pytest.approx(100.5), 2)}
    assert report.spearman == pytest.approx(-1.0) and report.kendall == pytest.approx(-1.0)
    assert report.same_winner is False and report.full_winner == "abc_00002"
    assert any("did not predict" in w for w in report.warnings)


def test_a_search_ranked_by_a_downstream_metric_is_promoted_the_same_way(tmp_path, target, fmap):
    """Ranked by downstream/vqa/score (trials that pretrain then finetune): the same selection, and the
    promotion study ranks by it too, so its trials pretrain then finetune as well."""
    exp = make_experiment(tmp_path / "src", metric="downstream/vqa/score")
    promotion = pr.promote(exp, top_k=2, target=target, fidelity_map=fmap, promoted_dir=tmp_path / "p")
    assert promotion.metric == "downstream/vqa/score" and [t.trial_id for t in promotion.trials] == ["abc_00000", "abc_00001"]
    fixed = {"train.max_steps": 10, "train.eval_every": 5, "downstream": {"vqa": {"max_steps": 3}}}  # the search's finetuning budget (the demo does this)
    spec = pr.promotion_study(promotion, seeds=2, fixed=fixed, resources={"workers": 1}, max_concurrent=2)
    assert spec.metric == "downstream/vqa/score" and spec.metrics[0] == "downstream/vqa/score"
    assert spec.variant_recipe("abc_00001").downstream["vqa"].max_steps == 3
