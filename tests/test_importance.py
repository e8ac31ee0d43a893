"""Hyperparameter importance from a stored Optuna study (fANOVA and PED-ANOVA)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from vlptune.cli import main as vlptune_main
from vlptune.search.layout import META_FILE, OPTUNA_DB
from vlptune.study import importance as imp

N_TRIALS = 40
PRUNE_EVERY = 5  # every 5th trial is pruned (no final value): neither evaluator may use it
IMPORTANT = 0.5  # the parameter that decides the metric outweighs all the others together


def make_search_dir(root: Path, n_trials: int = N_TRIALS, name: str = "exp", prune_every: int = PRUNE_EVERY, metric: str = "retrieval/rsum") -> Path:
    """A search experiment's meta and SQLite study: the metric depends on model.vd.size only."""
    exp = root / name
    exp.mkdir(parents=True)
    url = f"sqlite:///{exp / OPTUNA_DB}"
    params = ["model.vd.size", "data.mlm_prob"]
    (exp / META_FILE).write_text(
        json.dumps({"metric": metric, "mode": "max", "parameters": params, "storage_url": url, "study_name": name, "max_fidelity": 40})
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=url, study_name=name, direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        size = trial.suggest_categorical("model.vd.size", [0, 32, 128])
        prob = trial.suggest_float("data.mlm_prob", 0.1, 0.3)
        if trial.number % prune_every == prune_every - 1:
            raise optuna.TrialPruned()
        assert 0.1 <= prob <= 0.3  # sampled, and without any effect on the metric
        return {0: 100.0, 32: 150.0, 128: 200.0}[size]

    study.optimize(objective, n_trials=n_trials)
    return exp


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return make_search_dir(tmp_path_factory.mktemp("imp"))


def test_the_parameter_that_matters_ranks_first(exp):
    results = imp.importances(exp, "both")
    assert [r.evaluator for r in results] == ["fanova", "ped-anova"]
    complete = N_TRIALS - N_TRIALS // PRUNE_EVERY
    for r in results:
        assert list(r.values) == ["model.vd.size", "data.mlm_prob"], r.evaluator
        assert r.values["model.vd.size"] > IMPORTANT > r.values["data.mlm_prob"], r.evaluator
        assert sum(r.values.values()) == pytest.approx(1.0)
        assert r.used == complete
        assert f"used {complete} completed trial(s); not used: {N_TRIALS // PRUNE_EVERY} pruned" in r.notes[0]


def test_outputs_table_csv_and_tensorboard_text(exp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = imp.importances(exp, "ped-anova")
    written = imp.write_outputs(exp, results, "retrieval/rsum")
    md = (exp / imp.MARKDOWN_FILE).read_text()
    assert "| parameter | ped-anova |" in md and "| model.vd.size |" in md
    rows = (exp / imp.CSV_FILE).read_text().splitlines()
    assert rows[0] == "parameter,ped-anova" and rows[1].startswith("model.vd.size,")
    acc = EventAccumulator(str(written[2]), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors(f"{imp.TB_TAG}/text_summary")
    assert "model.vd.size" in event.tensor_proto.string_val[0].decode()


def test_too_few_completed_trials_are_refused(tmp_path):
    small = make_search_dir(tmp_path, n_trials=3, name="small", prune_every=3)  # 2 completed, 1 pruned
    with pytest.raises(imp.ImportanceError, match=r"2 completed trial\(s\).*needs at least 3 \(--min-trials\).*1 pruned"):
        imp.importances(small, "fanova")
    with pytest.raises(imp.ImportanceError, match="at least 2"):
        imp.importances(small, "fanova", min_trials=1)


def test_equal_values_are_refused_not_crashed(tmp_path):
    exp = tmp_path / "flat"
    exp.mkdir()
    url = f"sqlite:///{exp / OPTUNA_DB}"
    (exp / META_FILE).write_text(json.dumps({"metric": "m", "mode": "max", "parameters": ["a"], "storage_url": url, "study_name": "flat", "max_fidelity": 1}))
    study = optuna.create_study(storage=url, study_name="flat", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 0.0 * t.suggest_float("a", 0.0, 1.0) + 1.0, n_trials=4)
    with pytest.raises(imp.ImportanceError, match="same value"):
        imp.importances(exp, "fanova")


def test_conditional_parameters_are_left_out_of_fanova_only(tmp_path):
    exp = tmp_path / "cond"
    exp.mkdir()
    url = f"sqlite:///{exp / OPTUNA_DB}"
    (exp / META_FILE).write_text(
        json.dumps({"metric": "m", "mode": "min", "parameters": ["a", "b"], "storage_url": url, "study_name": "cond", "max_fidelity": 1})
    )
    study = optuna.create_study(storage=url, study_name="cond", sampler=optuna.samplers.RandomSampler(seed=1))

    def objective(trial: optuna.Trial) -> float:
        a = trial.suggest_float("a", 0.0, 1.0)
        b = trial.suggest_float("b", 0.0, 1.0) if a > 0.5 else 0.0
        return a + b

    study.optimize(objective, n_trials=20)
    fanova, ped = imp.importances(exp, "both")
    assert list(fanova.values) == ["a"] and fanova.left_out == ["b"]
    assert any("conditional" in n and "b" in n for n in fanova.notes)
    assert set(ped.values) == {"a", "b"}


def test_importance_command(exp, capsys):
    assert vlptune_main(["importance", str(exp), "--evaluator", "fanova"]) == 0
    out = capsys.readouterr().out
    assert "| model.vd.size |" in out and "written:" in out
    assert vlptune_main(["importance", str(exp.parent / "nowhere")]) == 2
    assert f"{exp.parent / 'nowhere'} does not exist" in capsys.readouterr().err


def test_importance_of_a_search_ranked_by_a_downstream_metric(tmp_path, capsys):
    """A search ranked by downstream/vqa/score (its completed trials told with their VQA score): the same analysis."""
    exp = make_search_dir(tmp_path, n_trials=20, metric="downstream/vqa/score")
    assert vlptune_main(["importance", str(exp), "--evaluator", "ped-anova"]) == 0
    out = capsys.readouterr().out
    assert "hyperparameter importance for downstream/vqa/score" in out
    (result,) = imp.importances(exp, "ped-anova")
    assert result.values["model.vd.size"] > IMPORTANT > result.values["data.mlm_prob"]
