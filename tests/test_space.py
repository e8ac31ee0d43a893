"""Search-space files: parsing, validation against the recipe schema, when: expressions."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from vlptune.config import ConfigError
from vlptune.search.space import load_space
from vlptune.search.when import WhenError, eval_when, parse_when

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "search_spaces" / "demo.yaml"
SOHO = REPO / "search_spaces" / "soho_light.yaml"


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    """A space file in tmp_path on a small base recipe (no data needed to validate)."""
    (tmp_path / "base.yaml").write_text(
        textwrap.dedent(
            """
            name: base
            data: {root: data/none, synthesize: false, image_size: 96, max_long_side: 192}
            model: {vd: {size: 64}}
            train: {max_steps: 40, eval_every: 10}
            resources: {workers: 1, cpus_per_worker: 1}
            """
        )
    )
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


HEAD = """
        base: base.yaml
        metric: retrieval/rsum
        mode: max
"""


def problems_of(path: Path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_space(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------ shipped spaces


def test_demo_space_is_valid_and_sized_for_two_cores():
    space = load_space(DEMO)
    recipe = space.base_recipe
    assert recipe.name == "demo-light"
    assert space.num_samples >= 8
    assert space.scheduler.type == "asha"
    # two trials at once on 2 CPUs
    assert recipe.resources.workers * recipe.resources.cpus_per_worker * space.max_concurrent <= 2
    paths = [p.path for p in space.params]
    for wanted in ("model.vd.size", "objectives.mvm.prob", "data.mlm_prob", "model.backbone.init", "optim.balance"):
        assert wanted in paths
    # every trial shares the one cached backbone: nothing that shapes it is searched
    assert not {"data.image_size", "model.backbone.depth", "model.backbone.width_mult"} & set(paths)
    assert space.param("model.backbone.init").choices == ["pretrained", "random"]
    assert any(p.startswith("objectives.") and p.endswith(".weight") for p in paths)
    assert 0 in space.param("model.vd.size").choices  # VD off is part of the search
    assert space.asha_rungs() == [15, 30]


def test_soho_light_space_is_valid_for_a_gpu_cluster():
    space = load_space(SOHO)
    res = space.base_recipe.resources
    assert res.gpus_per_worker >= 1
    assert space.max_fidelity == 20000
    assert 0 in space.param("model.vd.size").choices


def test_describe_lists_every_parameter_and_the_plan():
    space = load_space(DEMO)
    text = space.describe()
    for p in space.params:
        assert p.path in text
    assert "asha" in text and "rungs at steps [15, 30]" in text
    assert "when model.vd.size > 0, else 0.0" in text


# ------------------------------------------------------------------ conditionals


def test_conditional_parameters_follow_their_condition(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        parameters:
          model.vd.size: {categorical: [0, 32]}
          objectives.mvm.weight: {uniform: [0.5, 1.5], when: model.vd.size > 0, else: 0.0}
          objectives.mvm.prob: {uniform: [0.2, 1.0], when: "model.vd.size > 0 and objectives.mvm.weight >= 1.0"}
        """,
    )
    space = load_space(path)
    off = space.active_values(lambda p: p.corners()[0])  # vd.size 0
    assert off == {"model.vd.size": 0, "objectives.mvm.weight": 0.0}
    on_low = space.active_values(lambda p: {"model.vd.size": 32}.get(p.path, p.low))
    assert on_low == {"model.vd.size": 32, "objectives.mvm.weight": 0.5}  # prob needs weight >= 1
    on_high = space.active_values(lambda p: {"model.vd.size": 32}.get(p.path, p.high))
    assert on_high == {"model.vd.size": 32, "objectives.mvm.weight": 1.5, "objectives.mvm.prob": 1.0}
    recipe = space.trial_recipe(off)
    assert recipe.model.vd.size == 0 and recipe.objectives["mvm"].weight == 0.0


def test_when_may_read_recipe_fields_that_are_not_searched(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        fixed: {data.image_size: 128}
        parameters:
          objectives.mvm.prob: {uniform: [0.2, 1.0], when: data.image_size >= 128}
        """,
    )
    space = load_space(path)
    assert space.active_values(lambda p: p.low) == {"objectives.mvm.prob": 0.2}


@pytest.mark.parametrize(
    "text, values, expected",
    [
        ("a.b > 0", {"a.b": 1}, True),
        ("a.b > 0", {"a.b": 0}, False),
        ("a in (1, 2) and not c", {"a": 2, "c": False}, True),
        ("a == 'x' or b <= -1.5", {"a": "y", "b": -2}, True),
        ("0 < a < 3", {"a": 3}, False),
        ("a != null", {"a": None}, False),
    ],
)
def test_when_expressions_evaluate_without_eval(text, values, expected):
    tree, names = parse_when(text)
    assert set(names) <= set(values)
    assert bool(eval_when(tree, values.__getitem__)) is expected


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "a.b()",
        "a + 1 > 2",
        "lambda: 1",
        "a[0] > 1",
        "(x := 1)",
        "a is None",
        "[i for i in a]",
        "f'{a}'",
    ],
)
def test_when_refuses_anything_but_comparisons(text):
    with pytest.raises(WhenError):
        parse_when(text)


def test_when_never_executes_code(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr("builtins.eval", lambda *a, **k: called.append(a))
    tree, _ = parse_when("x.y >= 2 and z == 'a'")
    assert eval_when(tree, {"x.y": 3, "z": "a"}.__getitem__) is True
    assert not called
    assert isinstance(tree, ast.Expression)


# ------------------------------------------------------------------ invalid files


def test_every_problem_is_reported_with_file_parameter_and_what_is_allowed(tmp_path):
    path = write(
        tmp_path,
        """
        base: base.yaml
        metric: retrieval/rsum
        mode: maxx
        scheduler: {type: median, brackets: 2}
        parameters:
          model.vd.sise: {categorical: [0, 64]}
          model.vd.momentum: {uniform: [0.5, 1.0]}
          model.backbone.depth: {categorical: [18, 20]}
          model.backbone.width_mult: {int: [1, 2]}
          model.backbone.pool: {uniform: [1, 2]}
          data.mlm_prob: {uniform: [0.1, 0.3], when: "__import__('os').system('ls')"}
          objectives.mvm.weight: {uniform: [0.25, 2.0], when: data.image_size > 64}
          data.image_size: {int: [16, 128], step: 32}
          train.max_steps: {int: [10, 20]}
          optim.transformer.lr: {loguniform: [0.0, 1.0e-3]}
          data.hflip_prob: {gaussian: [0, 1]}
        """,
    )
    text = problems_of(path)
    assert text.startswith(f"{path}: invalid search space")
    expected = [
        "mode: Input should be 'min' or 'max'",
        "scheduler: brackets do(es) not apply to scheduler type 'median'",
        "parameters.model.vd.sise: model.vd.sise: no field 'sise' in model.vd",
        "parameters.model.vd.momentum: high 1.0 must be below 1.0; allowed: float >= 0.0 and < 1.0",
        "parameters.model.backbone.depth: choice 20 is not allowed",
        "one of 18, 34, 50, 101, 152",
        "parameters.model.backbone.width_mult: int distribution on a float field; use uniform or loguniform",
        "parameters.model.backbone.pool: uniform distribution on a int field; use int",
        "parameters.data.mlm_prob: when:",
        "is not allowed; use comparisons",
        "parameters.objectives.mvm.weight: when: 'data.image_size > 64' refers to data.image_size, which is defined after it",
        "parameters.data.image_size: step 32 does not divide [16, 128]",
        "parameters.train.max_steps: the fidelity (train.max_steps) cannot be searched",
        "parameters.optim.transformer.lr: loguniform: low must be positive",
        "parameters.data.hflip_prob: give exactly one distribution of categorical, int, uniform, loguniform",
    ]
    for piece in expected:
        assert piece in text, f"missing {piece!r} in:\n{text}"


def test_bounds_are_checked_against_the_field(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        parameters:
          data.mlm_prob: {uniform: [-0.1, 1.5]}
          model.vd.size: {int: [0, 100000]}
          data.image_size: {int: [8, 64]}
        """,
    )
    text = problems_of(path)
    assert "parameters.data.mlm_prob: low -0.1 is below the field's minimum; allowed: float >= 0.0 and <= 1.0" in text
    assert "parameters.data.mlm_prob: high 1.5 is above the field's maximum" in text
    assert "parameters.model.vd.size: high 100000 is above the field's maximum; allowed: int >= 0 and <= 65536" in text
    assert "parameters.data.image_size: low 8 is below the field's minimum; allowed: int >= 16" in text


def test_corners_that_make_an_invalid_recipe_are_refused(tmp_path):
    # VD off with MVM still weighted: the MVM objective refuses the recipe.
    path = write(
        tmp_path,
        HEAD
        + """
        parameters:
          model.vd.size: {categorical: [0, 32]}
          objectives.mvm.weight: {uniform: [0.5, 1.5], when: model.vd.size > 0}
        """,
    )
    text = problems_of(path)
    assert "these combinations of values give an invalid recipe" in text
    assert "corner {'model.vd.size': 0}" in text
    assert "needs the visual dictionary" in text


def test_metric_must_be_reported_at_every_corner(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        parameters:
          objectives.itm.weight: {uniform: [0.0, 1.0]}
        """,
    )
    text = problems_of(path)
    assert "metric 'retrieval/rsum'" in text and "objectives.itm.weight is 0" in text


def test_cross_field_recipe_errors_name_the_field(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        fixed: {optim.step_milestones: [0.9, 0.5]}
        parameters:
          data.mlm_prob: {uniform: [0.1, 0.2]}
        """,
    )
    text = problems_of(path)
    assert "optim.step_milestones" in text and "increasing fractions" in text


def test_fixed_paths_and_resources_are_checked(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        resources: {workers: 0, gpu: 1}
        fixed: {train.max_stepz: 3}
        parameters:
          data.mlm_prob: {uniform: [0.1, 0.2]}
          resources.cpus_per_worker: {categorical: [1, 2]}
        """,
    )
    text = problems_of(path)
    assert "fixed.train.max_stepz: train.max_stepz: no field 'max_stepz' in train" in text
    assert "resources.gpu: resources.gpu: no field 'gpu' in resources" in text
    assert "resources.workers: Input should be greater than or equal to 1" in text
    assert "parameters.resources.cpus_per_worker: resources are per search, not searched" in text


def test_unreadable_and_incomplete_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("base: [unclosed\n")
    assert "not valid YAML" in problems_of(bad_yaml)
    missing_base = write(tmp_path, "base: nowhere.yaml\nmetric: m\nmode: min\nparameters: {data.mlm_prob: {uniform: [0.1, 0.2]}}\n", "mb.yaml")
    text = problems_of(missing_base)
    assert str(missing_base) in text and "recipe file not found" in text and "nowhere.yaml" in text
    no_params = write(tmp_path, HEAD, "np.yaml")
    assert "parameters: Field required" in problems_of(no_params)
    assert "file not found" in problems_of(tmp_path / "absent.yaml")


def test_else_needs_when_and_a_legal_value(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        parameters:
          model.vd.size: {categorical: [0, 32]}
          objectives.mvm.weight: {uniform: [0.5, 1.5], when: model.vd.size > 0, else: -1.0}
          data.mlm_prob: {uniform: [0.1, 0.2], else: 0.1}
        """,
    )
    text = problems_of(path)
    assert "parameters.objectives.mvm.weight: else: -1.0 is not allowed" in text
    assert "parameters.data.mlm_prob: else: only with when:" in text


def test_grid_needs_finite_values_and_counts_distinct_points(tmp_path):
    bad = write(
        tmp_path,
        HEAD
        + """
        searcher: {type: grid}
        parameters:
          optim.transformer.lr: {loguniform: [1.0e-5, 1.0e-3]}
        """,
        "bad.yaml",
    )
    assert "the grid searcher needs a finite set of values" in problems_of(bad)
    good = write(
        tmp_path,
        HEAD
        + """
        searcher: {type: grid}
        parameters:
          model.vd.size: {categorical: [0, 32]}
          objectives.mvm.weight: {categorical: [0.5, 1.0], when: model.vd.size > 0, else: 0.0}
          data.image_size: {int: [64, 128], step: 32}
        """,
        "good.yaml",
    )
    space = load_space(good)
    from vlptune.search.optuna_searcher import grid_points

    points = grid_points(space)
    # vd off: 1 weight x 3 sizes; vd on: 2 weights x 3 sizes
    assert len(points) == 9 and space.num_samples == space.grid_size() == 12
    assert len({repr(sorted(p.items())) for p in points}) == 9


def test_overrides_change_the_space_or_the_recipe(tmp_path):
    path = write(
        tmp_path,
        HEAD
        + """
        num_samples: 8
        parameters:
          data.mlm_prob: {uniform: [0.1, 0.2]}
        """,
    )
    space = load_space(path, ["num_samples=3", "scheduler.grace_period=20", "train.max_steps=60", "searcher.seed=7"])
    assert space.num_samples == 3 and space.grace_period == 20 and space.searcher.seed == 7
    assert space.max_fidelity == 60
    assert "train.max_steps=60" in space.describe()
    text = problems_of(path, ["scheduler.grace_period=100"])
    assert "scheduler.grace_period: 100 is beyond train.max_steps = 40" in text
    text = problems_of(path, ["model.vd.size=-1"])
    assert "model.vd.size" in text and "greater than or equal to 0" in text


def test_yaml_scientific_notation_is_accepted(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string: bounds accept it as a number.
    path = write(tmp_path, HEAD + "        parameters:\n          optim.transformer.lr: {loguniform: [1e-5, 1e-3]}\n")
    p = load_space(path).param("optim.transformer.lr")
    assert (p.low, p.high) == (1e-5, 1e-3)


def test_space_check_command(tmp_path, capsys):
    import argparse

    from vlptune.search.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["space", "check", str(DEMO)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "model.vd.size" in out and out.rstrip().endswith("OK")
    bad = write(tmp_path, HEAD + "        parameters:\n          model.vd.size: {categorical: [-3]}\n")
    from vlptune.search.cli import main

    assert main(["space", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "parameters.model.vd.size: choice -3 is not allowed" in err
