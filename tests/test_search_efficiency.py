"""bench/search_efficiency.py's pure parts on hand-made trial records: the grid plan, ASHA's expected
compute and the search's sample count, the spaces it writes (validated by the platform's own
``load_space``), the compute accounting, the comparison and the report. No trial is trained here
(the benchmark itself is run by hand: bench/README.md)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import yaml

from vlptune.search.space import load_space

BENCH = Path(__file__).resolve().parents[1] / "bench" / "search_efficiency.py"


@pytest.fixture(scope="module")
def se():
    spec = importlib.util.spec_from_file_location("search_efficiency", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_plan_counts_the_grid_and_sizes_the_search_by_asha_expected_cost(se):
    opts = se.Options(vd_sizes=[16, 32, 64], mvm_weights=[0.0, 0.5, 1.0], seeds=2, max_steps=24, grace_period=8, reduction_factor=3)
    assert se.grid_points(opts)[:4] == [(16, 0.0), (16, 0.5), (16, 1.0), (32, 0.0)]
    assert len(se.grid_points(opts)) == 9
    assert se.grid_trial_steps(opts) == 9 * 2 * 24 == 432
    assert se.rungs(24, 8, 3) == [8]
    assert se.rungs(40, 5, 2) == [5, 10, 20]
    # every trial runs to 8; a third of them on to 24: 8 + 16 / 3
    assert se.expected_asha_steps(24, 8, 3) == pytest.approx(8 + 16 / 3)
    # 5 + 5/2 + 10/4 + 20/8 = 12.5
    assert se.expected_asha_steps(40, 5, 2) == pytest.approx(12.5)
    # 0.3 * 432 = 129.6 trial-steps at 13.33 each: 9 samples (9.72 rounded down, never over budget)
    assert se.search_samples(opts) == 9
    assert se.search_samples(opts.model_copy(update={"budget_fraction": 0.01})) == 1


def test_the_spaces_it_writes_pass_the_platforms_own_checks(se, tmp_path):
    opts = se.Options(vd_sizes=[16, 32], mvm_weights=[0.0, 1.0], seeds=3, seed_base=5, max_steps=12, grace_period=4)
    specs = se.space_specs(opts, tmp_path / "data")
    loaded = {}
    for name, spec in specs.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        loaded[name] = load_space(path)
    grid, search = loaded[se.GRID_NAME], loaded[se.SEARCH_NAME]
    assert grid.searcher.type == "grid" and grid.scheduler.type == "fifo"
    assert grid.num_samples == 2 * 2 * 3
    assert [p.path for p in grid.params] == [se.VD_PATH, se.MVM_PATH, se.SEED_PATH]
    assert search.searcher.type == "tpe" and search.scheduler.type == "asha"
    assert search.grace_period == 4 and search.max_fidelity == 12 == grid.max_fidelity
    assert [p.path for p in search.params] == [se.VD_PATH, se.MVM_PATH]
    assert search.base_recipe.train.seed == 5  # the search trains with the first grid seed
    assert search.base_recipe.data.image_size == opts.image_size
    assert search.num_samples == se.search_samples(opts)


def _grid(se, values: dict[tuple[int, float], tuple[float, float]], steps: int = 24, wall: float = 60.0):
    """Two seeds (0, 1) per point, every trial to ``steps``."""
    return [se.TrialRecord(vd, w, seed, steps, m, wall, "completed") for (vd, w), pair in values.items() for seed, m in enumerate(pair)]


GRID_VALUES = {(16, 0.0): (5.0, 5.2), (16, 1.0): (4.8, 5.0), (32, 0.0): (4.0, 4.4), (32, 1.0): (4.1, 4.2)}  # means 5.1, 4.9, 4.2, 4.15


def test_compare_min_mode_judges_the_pick_by_its_grid_mean(se):
    grid = _grid(se, GRID_VALUES)
    search = [
        se.TrialRecord(32, 0.0, 0, 24, 4.0, 50.0, "completed"),  # the search's best trial (a lucky seed) ...
        se.TrialRecord(32, 1.0, 0, 24, 4.1, 50.0, "completed"),
        se.TrialRecord(16, 0.0, 0, 8, 6.0, 20.0, "pruned"),
        se.TrialRecord(16, 1.0, 0, 8, None, 20.0, "error"),
    ]
    c = se.compare(
        grid, search, metric="val/mlm_loss", mode="min", max_steps=24, search_seed=0, grid_wall_s=300.0, search_wall_s=90.0, tolerance=0.01, compute_target=0.3
    )
    assert c.grid_best_point == (32, 1.0) and c.grid_best == pytest.approx(4.15)
    assert c.search_pick == (32, 0.0)
    assert c.search_pick_value == pytest.approx(4.2)  # ... is worth its point's grid mean
    assert c.search_best_trial == 4.0 and c.grid_best_trial_same_seed == 4.0
    assert c.quality_ratio == pytest.approx(4.15 / 4.2)  # 0.988: 1.2% worse
    assert not c.quality_met
    assert c.grid.trial_steps == 8 * 24 == 192 and c.search.trial_steps == 24 + 24 + 8 + 8 == 64
    assert c.compute_ratio == pytest.approx(64 / 192)
    assert not c.compute_met  # 33% > 30%
    assert c.grid.trial_wall_s == 480.0 and c.search.trial_wall_s == 140.0
    assert c.trial_wall_ratio == pytest.approx(140 / 480) and c.wall_ratio == pytest.approx(0.3)
    assert c.point_means == {"16/0": pytest.approx(5.1), "16/1": pytest.approx(4.9), "32/0": pytest.approx(4.2), "32/1": pytest.approx(4.15)}
    # with a 2% tolerance and a 40% compute target both are met
    loose = se.compare(
        grid, search, metric="val/mlm_loss", mode="min", max_steps=24, search_seed=0, grid_wall_s=300.0, search_wall_s=90.0, tolerance=0.02, compute_target=0.4
    )
    assert loose.quality_met and loose.compute_met


def test_compare_max_mode_and_unfinished_grid_trials(se):
    grid = _grid(se, {(16, 0.0): (0.20, 0.30), (32, 0.0): (0.24, 0.24)})
    grid.append(se.TrialRecord(64, 0.0, 0, 16, 0.9, 30.0, "error"))  # did not reach the last step: not a grid value
    search = [se.TrialRecord(16, 0.0, 0, 24, 0.20, 40.0, "completed"), se.TrialRecord(32, 0.0, 0, 8, 0.5, 10.0, "pruned")]
    c = se.compare(
        grid, search, metric="val/mlm_acc", mode="max", max_steps=24, search_seed=0, grid_wall_s=100.0, search_wall_s=40.0, tolerance=0.01, compute_target=0.3
    )
    assert c.grid_best_point == (16, 0.0) and c.grid_best == pytest.approx(0.25)
    assert c.search_pick == (16, 0.0) and c.quality_ratio == pytest.approx(1.0) and c.quality_met
    assert c.grid_best_trial_same_seed == pytest.approx(0.24)  # seed 0's best grid trial, the error excluded
    assert c.grid.trial_steps == 4 * 24 + 16 and c.search.trial_steps == 32
    assert c.compute_ratio == pytest.approx(32 / 112) and c.compute_met
    assert c.grid_points == 3 and c.search_points == 2
    # a search with no completed trial has no pick; a grid with no completed point cannot be compared
    none_done = se.compare(
        grid, search[1:], metric="m", mode="max", max_steps=24, search_seed=0, grid_wall_s=1.0, search_wall_s=1.0, tolerance=0.01, compute_target=0.3
    )
    assert none_done.search_pick is None and none_done.quality_ratio is None and not none_done.quality_met
    with pytest.raises(ValueError, match="no grid point completed"):
        se.compare(
            grid[-1:], search, metric="m", mode="max", max_steps=24, search_seed=0, grid_wall_s=1.0, search_wall_s=1.0, tolerance=0.01, compute_target=0.3
        )


def test_report_and_results_payload(se):
    grid = _grid(se, GRID_VALUES)
    search = [se.TrialRecord(32, 1.0, 0, 24, 4.1, 50.0, "completed"), se.TrialRecord(16, 0.0, 0, 8, 6.0, 20.0, "pruned")]
    c = se.compare(
        grid, search, metric="val/mlm_loss", mode="min", max_steps=24, search_seed=0, grid_wall_s=300.0, search_wall_s=60.0, tolerance=0.01, compute_target=0.3
    )
    text = se.format_report(c, 0.01, 0.3)
    lines = text.splitlines()
    assert lines[0].split() == ["grid", "ASHA+TPE", "ratio"]
    assert lines[3].split() == ["distinct", "points", "4", "2"]
    assert lines[4].split() == ["trial-steps", "192", "32", "0.167"]
    assert "vd 32, mvm 1" in lines[7]
    assert lines[8].split()[-3:] == ["4.15", "4.15", "1"]
    assert lines[-1] == "target: pick within 1% of the grid's best (met), at most 30% of its trial-steps (met)"
    payload = se.results_payload(se.Options(), c, grid, search)
    assert payload["comparison"]["compute_ratio"] == pytest.approx(32 / 192)
    assert payload["options"]["metric"] == "val/mlm_loss" and len(payload["grid_trials"]) == 8
    assert not math.isnan(payload["comparison"]["quality_ratio"])


def test_cli_options_are_typed_and_checked(se):
    opts = se.parse_options(["--vd-sizes", "8", "128", "--mvm-weights", "0.25", "--seeds", "3", "--mode", "max", "--out", "/tmp/x"])
    assert opts.vd_sizes == [8, 128] and opts.mvm_weights == [0.25] and opts.seeds == 3 and opts.mode == "max"
    assert opts.out == Path("/tmp/x") and opts.budget_fraction == 0.3
    for bad in (["--seeds", "0"], ["--mode", "best"], ["--budget-fraction", "1.5"], ["--vd-sizes", "0", "16"], ["--grace-period", "24"]):
        with pytest.raises(SystemExit):
            se.parse_options(bad)


def test_a_reused_grid_must_have_been_trained_with_the_same_grid_options(se):
    first = se.Options(vd_sizes=[16, 32], seeds=2)
    previous = se.results_payload(first, _any_comparison(se), [], [])["options"]
    # the search's own choices may differ; the grid's may not
    assert se.grid_mismatch(first.model_copy(update={"budget_fraction": 0.2, "searcher_seed": 3, "out": Path("/tmp/y")}), previous) == []
    assert se.grid_mismatch(first.model_copy(update={"seeds": 3, "vd_sizes": [16, 64]}), previous) == [
        "vd_sizes: [16, 32] there, [16, 64] here",
        "seeds: 2 there, 3 here",
    ]


def _any_comparison(se):
    grid = _grid(se, GRID_VALUES)
    return se.compare(grid, grid, metric="m", mode="min", max_steps=24, search_seed=0, grid_wall_s=1.0, search_wall_s=1.0, tolerance=0.01, compute_target=0.3)
