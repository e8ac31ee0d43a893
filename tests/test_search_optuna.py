"""The Optuna searcher, without Ray: what Tune's calls turn into in the study."""

from __future__ import annotations

import json
import math
import pickle
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from vlptune.search.optuna_searcher import OptunaSearcher
from vlptune.search.space import load_space

METRIC = "retrieval/rsum"


def make_space(tmp_path: Path, extra: str = "", params: str | None = None):
    (tmp_path / "base.yaml").write_text(
        textwrap.dedent(
            """
            data: {root: data/none, synthesize: false}
            model: {vd: {size: 64}}
            objectives: {mlm: {weight: 1.0}, itm: {weight: 1.0}, mvm: {weight: 1.0}}
            train: {max_steps: 40, eval_every: 10}
            """
        )
    )
    params = (
        params
        or """
          model.vd.size: {categorical: [0, 32, 64]}
          objectives.mvm.weight: {uniform: [0.5, 1.5], when: model.vd.size > 0, else: 0.0}
          data.mlm_prob: {uniform: [0.1, 0.3], step: 0.05}
          optim.transformer.lr: {loguniform: [1.0e-5, 1.0e-3]}
        """
    )
    text = (
        textwrap.dedent(
            f"""
        base: base.yaml
        metric: {METRIC}
        mode: max
        num_samples: 6
        """
        )
        + textwrap.dedent(extra)
        + "parameters:"
        + textwrap.indent(textwrap.dedent(params), "  ")
    )
    (tmp_path / "space.yaml").write_text(text)
    return load_space(tmp_path / "space.yaml")


def make_searcher(tmp_path: Path, space=None, name: str = "exp") -> OptunaSearcher:
    space = space or make_space(tmp_path)
    return OptunaSearcher(space, f"sqlite:///{tmp_path / 'optuna.db'}", name)


def frozen(searcher: OptunaSearcher, trial_id: str):
    study = optuna.load_study(study_name=searcher.study_name, storage=searcher.storage_url)
    (t,) = [t for t in study.get_trials() if t.user_attrs.get("ray_trial_id") == trial_id]
    return t


def result(step: int, value: float, **extra):
    return {"step": step, METRIC: value, "training_iteration": step // 10, **extra}


def test_suggest_is_define_by_run_with_conditions(tmp_path):
    searcher = make_searcher(tmp_path)
    seen_off = seen_on = False
    for i in range(12):
        config = searcher.suggest(f"t{i}")
        t = frozen(searcher, f"t{i}")
        assert set(t.params) <= set(config)
        if config["model.vd.size"] == 0:
            seen_off = True
            # inactive: not sampled by Optuna, but set to its else: value for the trial
            assert "objectives.mvm.weight" not in t.params
            assert config["objectives.mvm.weight"] == 0.0
        else:
            seen_on = True
            assert 0.5 <= config["objectives.mvm.weight"] <= 1.5
            assert t.params["objectives.mvm.weight"] == config["objectives.mvm.weight"]
        assert config["data.mlm_prob"] in (0.1, 0.15, 0.2, 0.25, 0.3) or math.isclose(config["data.mlm_prob"] * 20, round(config["data.mlm_prob"] * 20))
        assert 1e-5 <= config["optim.transformer.lr"] <= 1e-3
        searcher.space.trial_recipe(config)  # every suggestion is a valid recipe
    assert seen_off and seen_on


def test_stopped_trial_is_pruned_with_its_intermediate_values(tmp_path):
    searcher = make_searcher(tmp_path)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(10, 50.0))
    searcher.on_trial_result("a", result(20, 60.0))
    # Tune does not pass the result that made the scheduler stop the trial to
    # on_trial_result; it arrives with on_trial_complete.
    searcher.on_trial_complete("a", result=result(30, 55.0, done=True))
    t = frozen(searcher, "a")
    assert t.state == TrialState.PRUNED
    assert t.intermediate_values == {10: 50.0, 20: 60.0, 30: 55.0}
    assert t.value == 55.0  # Optuna's value of a pruned trial: its last report
    assert t.user_attrs["outcome"] == "pruned" and t.user_attrs["fidelity"] == 30


def test_trial_at_max_fidelity_is_complete(tmp_path):
    searcher = make_searcher(tmp_path)
    searcher.suggest("b")
    for step in (10, 20, 30):
        searcher.on_trial_result("b", result(step, float(step)))
    searcher.on_trial_complete("b", result=result(40, 77.0))
    t = frozen(searcher, "b")
    assert t.state == TrialState.COMPLETE and t.value == 77.0
    assert t.intermediate_values == {10: 10.0, 20: 20.0, 30: 30.0, 40: 77.0}


def test_errors_nan_and_loop_stops_fail(tmp_path):
    searcher = make_searcher(tmp_path)
    for tid in ("err", "nan", "stop", "none"):
        searcher.suggest(tid)
    searcher.on_trial_result("err", result(10, 5.0))
    searcher.on_trial_complete("err", error=True)
    searcher.on_trial_complete("nan", result=result(10, float("nan")))
    searcher.on_trial_result("stop", result(10, 5.0))
    searcher.on_trial_complete("stop", result=result(13, 5.0, stop_reason="non-finite loss for 3 consecutive steps"))
    searcher.on_trial_complete("none", result=None)
    states = {tid: frozen(searcher, tid) for tid in ("err", "nan", "stop", "none")}
    assert all(t.state == TrialState.FAIL for t in states.values())
    assert states["err"].user_attrs["outcome"] == "error"
    assert states["err"].intermediate_values == {10: 5.0}
    assert states["nan"].user_attrs["outcome"] == "nan"
    assert states["stop"].user_attrs["outcome"].startswith("stopped: non-finite loss")
    assert states["stop"].user_attrs["stop_reason"] == "non-finite loss for 3 consecutive steps"


def test_repeated_reports_after_a_restart_are_not_duplicated(tmp_path):
    searcher = make_searcher(tmp_path)
    searcher.suggest("r")
    searcher.on_trial_result("r", result(10, 1.0))
    searcher.on_trial_result("r", result(20, 2.0))
    searcher.on_trial_result("r", result(20, 2.5))  # the restarted worker group re-reports step 20
    searcher.on_trial_result("r", result(30, 3.0))
    assert frozen(searcher, "r").intermediate_values == {10: 1.0, 20: 2.0, 30: 3.0}


def test_minimise_mode_and_tune_metric_mismatch(tmp_path):
    space = make_space(tmp_path)
    space.mode = "min"
    searcher = OptunaSearcher(space, f"sqlite:///{tmp_path / 'min.db'}", "m")
    assert searcher.study.direction == optuna.study.StudyDirection.MINIMIZE
    assert searcher.set_search_properties(METRIC, "min", {}) is True
    with pytest.raises(ValueError, match="optimises retrieval/rsum"):
        searcher.set_search_properties("val/loss", "min", {})


def test_save_restore_keeps_history_and_running_trials(tmp_path):
    searcher = make_searcher(tmp_path)
    for tid in ("a", "b", "c"):
        searcher.suggest(tid)
    searcher.on_trial_result("a", result(10, 10.0))
    searcher.on_trial_complete("a", result=result(40, 40.0))
    searcher.on_trial_result("b", result(10, 12.0))
    ckpt = tmp_path / "searcher.pkl"
    searcher.save(str(ckpt))
    saved = json.loads(ckpt.read_text())  # plain JSON (Tune's file name says .pkl): nothing pickled, no sampler
    assert saved["live"].keys() == {"b", "c"} and "sampler" not in saved and "space" not in saved
    # after the save the driver asked one more trial, then died: Tune never recorded it
    searcher.suggest("lost")

    # what Tuner.restore does: unpickle the searcher object, then restore its saved state
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(ckpt))
    restored.on_trial_result("b", result(10, 12.0))  # re-reported after resume: ignored
    restored.on_trial_result("b", result(20, 14.0))
    restored.on_trial_complete("b", result=result(20, 14.0))
    restored.on_trial_complete("c", result=result(40, 3.0))
    new = restored.suggest("d")
    assert set(new) >= {"model.vd.size", "data.mlm_prob"}

    study = optuna.load_study(study_name="exp", storage=searcher.storage_url)
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.get_trials()}
    assert by_id["a"].state == TrialState.COMPLETE and by_id["a"].value == 40.0
    assert by_id["b"].state == TrialState.PRUNED and by_id["b"].intermediate_values == {10: 12.0, 20: 14.0}
    assert by_id["c"].state == TrialState.COMPLETE
    assert by_id["lost"].state == TrialState.FAIL and by_id["lost"].user_attrs["outcome"] == "lost"
    assert by_id["d"].state == TrialState.RUNNING
    assert [t.number for t in study.get_trials()] == [0, 1, 2, 3, 4]


def test_a_pickled_searcher_state_is_refused_not_unpickled(tmp_path):
    searcher = make_searcher(tmp_path)
    mark = tmp_path / "ran"
    ckpt = tmp_path / "searcher-state.pkl"
    ckpt.write_bytes(pickle.dumps({"x": _Payload(mark)}))
    with pytest.raises(ValueError):
        searcher.restore(str(ckpt))
    assert not mark.exists()


def test_a_restored_sampler_does_not_repeat_the_first_samples(tmp_path):
    """The sampler is rebuilt from the space, its seed advanced by the study's trials: no repeat of trial 0's values."""
    searcher = make_searcher(tmp_path)
    first = [searcher.suggest(f"t{i}") for i in range(3)]
    ckpt = tmp_path / "s.json"
    searcher.save(str(ckpt))
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(ckpt))
    again = restored.suggest("t3")
    assert again not in first


class _Payload:
    def __init__(self, mark):
        self.mark = mark

    def __reduce__(self):
        return (exec, (f"open({str(self.mark)!r}, 'w').write('ran')",))


def test_restored_searcher_finds_trials_by_their_tune_id(tmp_path):
    # a trial known to the study but missing from the restored map (e.g. saved by an older state)
    searcher = make_searcher(tmp_path)
    searcher.suggest("x")
    fresh = make_searcher(tmp_path)
    fresh.on_trial_result("x", result(10, 1.0))
    fresh.on_trial_complete("x", result=result(10, 1.0))
    t = frozen(fresh, "x")
    assert t.state == TrialState.PRUNED and t.intermediate_values == {10: 1.0}


def test_tpe_is_seeded(tmp_path):
    a = make_searcher(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = make_searcher(b_dir)
    assert [a.suggest(f"t{i}") for i in range(5)] == [b.suggest(f"t{i}") for i in range(5)]


@pytest.mark.parametrize("kind", ["random", "cmaes"])
def test_other_samplers(tmp_path, kind):
    if kind == "cmaes":
        pytest.importorskip("cmaes", reason="Optuna's CMA-ES sampler needs the cmaes package")
    space = make_space(tmp_path, extra=f"searcher: {{type: {kind}, seed: 3}}\n")
    searcher = make_searcher(tmp_path, space)
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result=result(40, float(i)))
        space.trial_recipe(config)
    study = searcher.study
    assert type(study.sampler).__name__ == {"random": "RandomSampler", "cmaes": "CmaEsSampler"}[kind]
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials())


def test_grid_enumerates_each_point_once_then_finishes(tmp_path):
    space = make_space(
        tmp_path,
        extra="searcher: {type: grid, seed: 1}\n",
        params="""
        model.vd.size: {categorical: [0, 32]}
        objectives.mvm.weight: {categorical: [0.5, 1.0], when: model.vd.size > 0, else: 0.0}
        data.mlm_prob: {uniform: [0.1, 0.2], step: 0.1}
        """,
    )
    space.num_samples = 100  # more than the grid: the searcher stops at the grid's end
    searcher = make_searcher(tmp_path, space)
    configs = []
    while True:
        config = searcher.suggest(f"g{len(configs)}")
        if config == OptunaSearcher.FINISHED:
            break
        configs.append(config)
        searcher.on_trial_complete(f"g{len(configs) - 1}", result=result(40, 1.0))
    keys = {repr(sorted(c.items())) for c in configs}
    assert len(configs) == len(keys) == 6  # (1 off + 2 on) x 2 mlm_prob


def test_a_repeat_of_a_finished_trial_is_told_its_outcome_and_sampled_again(tmp_path):
    """Two points only: the third suggestion would repeat one; it is told the earlier outcome and never trained."""
    params = """
      model.vd.size: {categorical: [32, 64]}
    """
    space = make_space(tmp_path, params=params, extra="searcher: {type: random, seed: 0, max_resamples: 5}\n")
    searcher = make_searcher(tmp_path, space)
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", result=result(40, 70.0))
    second = searcher.suggest("b")  # a sample repeating "a" is told a's outcome and drawn again
    assert second != first
    searcher.on_trial_complete("b", result=result(40, 60.0))
    study = optuna.load_study(study_name=searcher.study_name, storage=searcher.storage_url)
    trained = [t for t in study.get_trials() if "repeat_of" not in t.user_attrs]
    repeats = [t for t in study.get_trials() if "repeat_of" in t.user_attrs]
    third = searcher.suggest("c")  # both points are taken: 5 samples in a row repeat, so the last is trained
    assert third in (first, second)
    study = optuna.load_study(study_name=searcher.study_name, storage=searcher.storage_url)
    told = [t for t in study.get_trials() if "repeat_of" in t.user_attrs and t not in repeats]
    assert len(told) == 4  # max_resamples 5: four repeats told, the fifth handed to Tune
    by_number = {t.number: t for t in trained}
    for t in told:
        earlier = by_number[t.user_attrs["repeat_of"]]
        assert t.params == earlier.params and t.state == earlier.state == TrialState.COMPLETE and t.value == earlier.value
        assert t.user_attrs["outcome"] == f"repeat of {earlier.number}" and "ray_trial_id" not in t.user_attrs
    (running,) = [t for t in study.get_trials() if t.user_attrs.get("ray_trial_id") == "c"]
    assert running.state == TrialState.RUNNING and "repeat_of" not in running.user_attrs


def test_repeats_train_keeps_optunas_own_behaviour(tmp_path):
    params = """
      model.vd.size: {categorical: [32]}
    """
    space = make_space(tmp_path, params=params, extra="searcher: {type: random, seed: 0, repeats: train}\n")
    searcher = make_searcher(tmp_path, space)
    assert searcher.suggest("a") == searcher.suggest("b") == {"model.vd.size": 32}  # one point: trained twice
    study = optuna.load_study(study_name=searcher.study_name, storage=searcher.storage_url)
    assert not any("repeat_of" in t.user_attrs for t in study.get_trials())
