"""Ablation studies: the file format and its validation, the statistics against numbers
computed by hand, the table's files, the shipped studies, and (-m slow) a tiny study of
the real loop run through run_study on a local Ray cluster."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from pathlib import Path

import pytest
import yaml
from scipy import stats as scipy_stats

from helpers import tiny_loop_fixed
from vlptune.config import ConfigError
from vlptune.study import stats
from vlptune.study.ablation import (
    StudyResults,
    StudyTrial,
    collect_study,
    load_study,
    run_study,
    study_from_dict,
    write_study_outputs,
)
from vlptune.study.ablation_table import format_markdown, study_table

REPO = Path(__file__).resolve().parents[1]
DEMO_LIGHT = REPO / "trials" / "demo-light.yaml"
ABLATIONS = REPO / "search_spaces" / "ablations"
METRIC = "retrieval/rsum"
SECOND = "val/itm_acc"

# Hand-made arms: baseline mean 12, variance 4; variant mean 17, variance 7.
BASE = [10.0, 12.0, 14.0]
VARIANT = [15.0, 16.0, 20.0]


def by_hand(a: list[float], b: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Welch's interval and test, written out from the textbook formulas."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se = math.sqrt(va / na + vb / nb)
    df = (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    tq = scipy_stats.t.ppf(1 - (1 - confidence) / 2, df)
    t = (ma - mb) / se
    return {
        "diff": ma - mb,
        "se": se,
        "df": df,
        "low": ma - mb - tq * se,
        "high": ma - mb + tq * se,
        "t": t,
        "p": 2 * scipy_stats.t.sf(abs(t), df),
        "std_a": math.sqrt(va),
    }


def study_doc(**changes) -> dict:
    doc = {
        "name": "unit",
        "base": str(DEMO_LIGHT),
        "baseline": "no-vd",
        "variants": {"no-vd": {"model.vd.size": 0, "objectives.mvm.weight": 0.0}, "vd-16": {"model.vd.size": 16}},
        "seeds": 3,
        "metrics": [METRIC, SECOND, "val/mvm_acc"],
        "metric": METRIC,
        "mode": "max",
        "fixed": {"train.max_steps": 4},
    }
    doc.update(changes)
    return doc


def hand_results(base=BASE, variant=VARIANT, extra_trials=()) -> StudyResults:
    spec = study_from_dict(study_doc(), source="unit.yaml", base_dir=REPO)
    trials = []
    for seed, value in enumerate(base):
        trials.append(StudyTrial(f"b{seed}", "no-vd", seed, "completed", 4, {METRIC: value, SECOND: 0.5}))
    for seed, value in enumerate(variant):
        trials.append(StudyTrial(f"v{seed}", "vd-16", seed, "completed", 4, {METRIC: value, SECOND: 0.5, "val/mvm_acc": 0.1 * (seed + 1)}))
    trials += list(extra_trials)
    return StudyResults.for_spec(spec, trials, "/tmp/unit")


def row_of(rows, metric, variant):
    return next(r for r in rows if r["metric"] == metric and r["variant"] == variant)


# ====================================================================== statistics


def test_stats_against_hand_computation():
    s = stats.summarize(VARIANT)
    assert s.n == 3 and s.mean == pytest.approx(17.0) and s.std == pytest.approx(math.sqrt(7.0))
    c = stats.compare(VARIANT, BASE)
    h = by_hand(VARIANT, BASE)
    assert h["df"] == pytest.approx(242 / 65)  # (11/3)^2 / ((7/3)^2/2 + (4/3)^2/2)
    assert c.diff == pytest.approx(5.0)
    assert c.se == pytest.approx(math.sqrt(11 / 3))
    assert c.df == pytest.approx(h["df"])
    assert (c.ci_low, c.ci_high) == (pytest.approx(h["low"]), pytest.approx(h["high"]))
    assert c.t == pytest.approx(h["t"]) and c.p == pytest.approx(h["p"])
    assert c.note is None
    # a 90% interval is narrower and lies inside the 95% one
    c90 = stats.compare(VARIANT, BASE, confidence=0.90)
    assert c.ci_low < c90.ci_low < c90.ci_high < c.ci_high


def test_stats_too_few_seeds_and_no_variance():
    one = stats.compare([15.0], BASE)
    assert one.p is None and one.ci_low is None and one.diff == pytest.approx(3.0)
    assert "too few seeds" in one.note and "1 for this variant" in one.note and "at least 2" in one.note
    assert stats.summarize([15.0]).std is None
    flat = stats.compare([3.0, 3.0], [1.0, 1.0])
    assert flat.p is None and flat.diff == pytest.approx(2.0) and "zero variance" in flat.note
    none = stats.compare([], BASE)
    assert none.diff is None and "no finished seed of this variant" in none.note
    with pytest.raises(ValueError, match="confidence"):
        stats.compare(VARIANT, BASE, confidence=1.5)


# ====================================================================== the table from hand-made trials


def test_study_table_from_hand_made_trials(tmp_path):
    h = by_hand(VARIANT, BASE)
    results = hand_results(extra_trials=[StudyTrial("x", "vd-16", 3, "error", 2, {}, "RuntimeError: boom")])
    rows = study_table(results)
    # primary metric first, baseline first
    assert [(r["metric"], r["variant"]) for r in rows[:2]] == [(METRIC, "no-vd"), (METRIC, "vd-16")]
    base = row_of(rows, METRIC, "no-vd")
    assert base["is_baseline"] and base["n"] == 3 and base["mean"] == pytest.approx(12.0) and base["std"] == pytest.approx(2.0)
    assert base["diff"] is None and base["p"] is None
    var = row_of(rows, METRIC, "vd-16")
    assert var["n"] == 3 and var["mean"] == pytest.approx(17.0) and var["std"] == pytest.approx(h["std_a"])
    assert var["diff"] == pytest.approx(h["diff"]) and var["df"] == pytest.approx(h["df"])
    assert var["ci_low"] == pytest.approx(h["low"]) and var["ci_high"] == pytest.approx(h["high"])
    assert var["p"] == pytest.approx(h["p"]) and var["t"] == pytest.approx(h["t"])
    # the same value on every seed of both arms: no test, said in words
    flat = row_of(rows, SECOND, "vd-16")
    assert flat["diff"] == pytest.approx(0.0) and flat["p"] is None and "zero variance" in flat["note"]
    # a metric the baseline's objectives do not produce
    assert "not reported" in row_of(rows, "val/mvm_acc", "no-vd")["note"]
    mvm = row_of(rows, "val/mvm_acc", "vd-16")
    assert mvm["n"] == 3 and mvm["mean"] == pytest.approx(0.2) and mvm["p"] is None and "the baseline does not report" in mvm["note"]

    md = write_study_outputs(tmp_path, results)
    assert (tmp_path / "ablation.md").read_text() == md
    assert f"| vd-16 | 3 | 17 ± {h['std_a']:.3g} | +5 |" in md
    assert f"[{h['low']:+.4g}, {h['high']:+.4g}]" in md and f"{h['p']:.3g}" in md
    assert "vd-16, seed 3 (trial x): error: RuntimeError: boom" in md  # left out, and said so
    table = list(csv.DictReader(io.StringIO((tmp_path / "ablation.csv").read_text())))
    assert len(table) == len(rows)
    got = next(r for r in table if r["metric"] == METRIC and r["variant"] == "vd-16")
    assert float(got["p"]) == pytest.approx(h["p"]) and float(got["ci_low"]) == pytest.approx(h["low"])
    # the same Markdown as a TensorBoard text summary
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "ablation"), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("ablation/table/text_summary")]
    assert texts and texts[-1].strip() == md.strip()


def test_too_few_seeds_in_words():
    results = hand_results(base=[12.0], variant=[15.0, 16.0])
    rows = study_table(results)
    var = row_of(rows, METRIC, "vd-16")
    assert var["p"] is None and var["ci_low"] is None and var["diff"] == pytest.approx(3.5)
    assert "too few seeds to say anything" in var["note"]
    assert "no standard deviation" in row_of(rows, METRIC, "no-vd")["note"]
    md = format_markdown(results, rows)
    assert "too few seeds to say anything: 2 for this variant and 1 for the baseline" in md
    # no p-value column entry for that row
    section = md[md.index(f"## {METRIC} (primary") :]  # its own section (the summary above puts the metrics side by side)
    line = next(ln for ln in section.splitlines() if ln.startswith("| vd-16 |") and "+3.5" in ln)
    assert line.split("|")[6].strip() == ""


# ====================================================================== the file and its validation


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"variants": {"no-vd": {}, "vd": {"model.vd.size": -1}}}, ["variants.vd.model.vd.size: -1 is not allowed", ">= 0"]),
        ({"variants": {"no-vd": {}, "vd": {"model.vd.sise": 8}}}, ["variants.vd.model.vd.sise", "no field 'sise'"]),
        ({"variants": {"no-vd": {}, "vd": {"model.backbone.depth": 19}}}, ["variants.vd.model.backbone.depth: 19 is not allowed", "18, 34, 50, 101, 152"]),
        ({"variants": {"no-vd": {}, "vd": {"train.seed": 3}}}, ["variants.vd.train.seed: seeds are the study's"]),
        ({"variants": {"no-vd": {}, "vd": {"train.max_steps": 3}}}, ["variants.vd.train.max_steps", "fixed:"]),
        ({"variants": {"no-vd": {}, "vd": {"resources.workers": 2}}}, ["variants.vd.resources.workers: resources are per study"]),
        ({"variants": {"no-vd": {}, "vd": {"model.vd.size": 0, "objectives.mvm.weight": 1.0}}}, ["variants.vd:", "model.vd.size=0 switches it off"]),
        ({"variants": {"no-vd": {}, "vd": {"objectives.itm.weight": 0.0}}}, ["variants.vd: the primary metric 'retrieval/rsum' would not be reported"]),
        ({"variants": {"no-vd": {}, "bad name!": {}}}, ["variants.bad name!: a variant name is"]),
        ({"variants": {"no-vd": {}}}, ["at least one other variant"]),
        ({"baseline": "nope"}, ["baseline: 'nope' is not one of the variants"]),
        ({"seeds": 0}, ["seeds", "greater than or equal to 1"]),
        ({"mode": "up"}, ["mode"]),
        ({"colour": "red"}, ["colour: unknown field"]),
        ({"fixed": {"train.max_step": 4}}, ["fixed.train.max_step", "no field 'max_step'"]),
        ({"metrics": [METRIC, METRIC]}, ["metrics: listed twice"]),
    ],
)
def test_invalid_study_refused_with_clear_message(tmp_path, changes, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study_doc(**changes), sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_study(path)
    text = str(info.value)
    assert text.startswith(f"{path}: invalid ablation study:"), text
    for piece in expected:
        assert piece in text, text


def test_every_problem_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study_doc(baseline="nope", variants={"a": {"model.vd.size": -1}, "b": {"train.seed": 1}}), sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_study(path)
    text = str(info.value)
    assert "variants.a.model.vd.size" in text and "variants.b.train.seed" in text and "baseline: 'nope'" in text


def test_missing_base_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_doc(base="nowhere.yaml")))
    with pytest.raises(ConfigError, match=r"base: recipe file not found: .*nowhere.yaml"):
        load_study(path)


def test_study_overrides_and_resolution(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_doc()))
    spec = load_study(path, ["seeds=2", "seed_base=5", "train.max_steps=6", "variants.vd-64={model.vd.size: 64}"])
    assert spec.seeds == 2 and spec.seed_values == [5, 6] and spec.max_fidelity == 6
    assert spec.variant_names == ["no-vd", "vd-16", "vd-64"]
    assert spec.metrics[0] == METRIC
    recipe = spec.variant_recipe("vd-64", 6)
    assert recipe.model.vd.size == 64 and recipe.train.seed == 6 and recipe.train.max_steps == 6
    assert spec.variant_recipe("no-vd").model.vd.size == 0
    # the base is untouched by the overlays, and a spec survives a JSON round trip (resume reads it)
    assert spec.base_recipe.model.vd.size == yaml.safe_load(DEMO_LIGHT.read_text())["model"]["vd"]["size"]
    again = type(spec).model_validate_json(spec.model_dump_json())
    assert again == spec


def test_shipped_studies_validate():
    files = sorted(ABLATIONS.glob("*.yaml"))
    names = {f.stem for f in files}
    expected = {f"{study}_{base}" for study in ("soho_vd", "soho_mvm", "kdvlp", "semantic_losses") for base in ("demo", "light")}
    assert expected <= names, sorted(expected - names)
    for f in files:
        spec = load_study(f)
        assert spec.seeds >= stats.MIN_SEEDS, f  # every shipped study can compute intervals
        assert len(spec.variants) >= 2 and spec.metric == spec.metrics[0]
        for name in spec.variant_names:
            spec.variant_recipe(name)
    kd = load_study(ABLATIONS / "kdvlp_demo.yaml")
    assert kd.variant_recipe("random-mvm").objectives["omvm"].sampling == "random"
    assert kd.variant_recipe("omvm-pra").objectives["pra"].weight > 0
    assert kd.variant_recipe("itm-mlm").active_objectives().keys() == {"mlm", "itm"}
    sem = load_study(ABLATIONS / "semantic_losses_light.yaml")
    assert sem.variant_recipe("spl-100").objectives["spl"].queries == 100
    vd = load_study(ABLATIONS / "soho_vd_light.yaml")
    assert [vd.variant_recipe(v).model.vd.size for v in vd.variant_names] == [0, 1024, 2048, 4096, 8192]


def test_cli_check_and_errors(capsys, tmp_path):
    from vlptune.cli import main

    assert main(["ablate", "--check", str(ABLATIONS / "soho_mvm_demo.yaml"), "-o", "seeds=2"]) == 0
    out = capsys.readouterr().out
    assert "2 variants x 2 seeds = 4" in out and "val/mvm_acc will be missing" in out and out.strip().endswith("OK")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(study_doc(baseline="nope")))
    assert main(["ablate", "--check", str(bad)]) == 2
    assert "baseline: 'nope'" in capsys.readouterr().err
    assert main(["ablate", "--table", str(tmp_path)]) == 2
    assert "not a vlptune ablation study" in capsys.readouterr().err


# ====================================================================== a real study (slow)


@pytest.mark.slow
def test_tiny_study_with_the_real_loop(tmp_path):
    """2 variants x 2 seeds of the real loop through run_study on a local cluster; the table
    checked against numbers computed by hand from the trials' own results."""
    root = tmp_path
    study = root / "tiny.yaml"
    doc = {
        "name": "tiny",
        "base": str(DEMO_LIGHT),
        "baseline": "no-vd",
        "variants": {"no-vd": {"model.vd.size": 0, "objectives.mvm.weight": 0.0}, "vd-16": {"model.vd.size": 16}},
        "seeds": 2,
        "metrics": [METRIC, SECOND, "val/mlm_acc"],
        "metric": METRIC,
        "mode": "max",
        "max_concurrent": 2,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "fixed": tiny_loop_fixed(root / "synth"),
    }
    study.write_text(yaml.safe_dump(doc, sort_keys=False))
    start = time.time()
    exp_dir = run_study(load_study(study), storage=root / "runs", name="tiny", verbose=0)
    seconds = time.time() - start
    assert exp_dir == (root / "runs" / "tiny").resolve()
    results = collect_study(exp_dir)
    assert len(results.trials) == 4 and all(t.status == "completed" for t in results.trials), results.trials
    assert {(t.variant, t.seed) for t in results.trials} == {(v, s) for v in ("no-vd", "vd-16") for s in (0, 1)}
    # each trial trained its variant with its seed
    for t in results.trials:
        recipe = yaml.safe_load((exp_dir / "tb" / t.trial_id / "recipe.yaml").read_text())
        assert recipe["train"]["seed"] == t.seed and recipe["model"]["vd"]["size"] == (0 if t.variant == "no-vd" else 16)
        last = [json.loads(line) for line in next(exp_dir.glob(f"*{t.trial_id}*/result.json")).read_text().splitlines() if line.strip()][-1]
        assert last["step"] == 4 and t.metrics[METRIC] == pytest.approx(last[METRIC])
    rows = study_table(results)
    for metric in (METRIC, SECOND, "val/mlm_acc"):
        a = [t.metrics[metric] for t in results.trials if t.variant == "vd-16"]
        b = [t.metrics[metric] for t in results.trials if t.variant == "no-vd"]
        r = row_of(rows, metric, "vd-16")
        assert r["mean"] == pytest.approx(statistics.mean(a)) and r["std"] == pytest.approx(statistics.stdev(a))
        assert r["diff"] == pytest.approx(statistics.mean(a) - statistics.mean(b))
        if statistics.variance(a) + statistics.variance(b) > 0:
            h = by_hand(a, b)
            assert (r["ci_low"], r["ci_high"], r["p"]) == (pytest.approx(h["low"]), pytest.approx(h["high"]), pytest.approx(h["p"]))
        else:
            assert r["p"] is None and "zero variance" in r["note"]
    # the files, and the search tools on the same directory
    md = (exp_dir / "ablation.md").read_text()
    assert "# Ablation: tiny" in md and "4 of 4 trials finished" in md
    assert (exp_dir / "ablation.csv").is_file() and any((exp_dir / "tb" / "ablation").iterdir())
    from vlptune.cli import main
    from vlptune.search import results as search_results

    collected = search_results.collect(exp_dir)
    assert sorted(r.status for r in collected.rows) == ["completed"] * 4
    assert main(["results", str(exp_dir), "--no-recipe"]) == 0
    assert main(["ablate", "--table", str(exp_dir)]) == 0
    # resuming a finished study runs nothing again and keeps the table
    run_study(None, exp_dir=exp_dir, resume=True, verbose=0)
    assert len(collect_study(exp_dir).trials) == 4
    print(f"tiny study: {seconds:.0f} s")


def test_a_table_7_shaped_summary_of_downstream_metrics(tmp_path):
    """The study ranked by downstream metrics (trials that pretrain then finetune): one row per
    variant, one column per task metric, mean ± std and the difference to the baseline with its interval."""
    doc = study_doc()
    doc.update(metric="downstream/vqa/score", metrics=["downstream/vqa/score", "downstream/nlvr2/acc", "downstream/retrieval/tr_r1"])
    spec = study_from_dict(doc, source="unit.yaml", base_dir=REPO)
    assert spec.metrics[0] == "downstream/vqa/score"
    trials = []
    for seed, (b, v) in enumerate(zip(BASE, VARIANT)):
        trials.append(
            StudyTrial(
                f"b{seed}", "no-vd", seed, "completed", 4, {"downstream/vqa/score": b, "downstream/nlvr2/acc": 50.0 + seed, "downstream/retrieval/tr_r1": 5.0}
            )
        )
        trials.append(
            StudyTrial(
                f"v{seed}", "vd-16", seed, "completed", 4, {"downstream/vqa/score": v, "downstream/nlvr2/acc": 55.0 + seed, "downstream/retrieval/tr_r1": 5.0}
            )
        )
    results = StudyResults.for_spec(spec, trials, "/tmp/unit")
    md = write_study_outputs(tmp_path, results)
    h = by_hand(VARIANT, BASE)
    lines = md.splitlines()
    header = lines[lines.index("## Summary") + 2]
    assert header == "| variant | vqa/score | nlvr2/acc | retrieval/tr_r1 |"
    base_line = next(ln for ln in lines if ln.startswith("| no-vd (baseline) | 12 ± 2 |"))
    assert base_line == "| no-vd (baseline) | 12 ± 2 | 51 ± 1 | 5 ± 0 |"
    var_line = next(ln for ln in lines if ln.startswith("| vd-16 | 17 ± "))
    assert f"Δ +5 [{h['low']:+.3g}, {h['high']:+.3g}]" in var_line and "56 ± 1; Δ +5 [" in var_line
    assert "## downstream/vqa/score (primary, higher is better)" in md  # the per-metric sections stay
