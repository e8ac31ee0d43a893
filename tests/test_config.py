"""Recipes: inheritance, overrides, and the errors a user sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlptune import cli
from vlptune.config import ConfigError, Recipe, field_at, json_schema, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("name", ["demo-light", "demo-full", "light", "full"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(ROOT / "trials" / f"{name}.yaml")
    assert isinstance(recipe, Recipe)
    assert recipe.active_objectives(), "every shipped recipe trains at least one objective"


def test_paper_recipes_describe_the_paper_settings():
    light = load_recipe(ROOT / "trials/light.yaml")
    full = load_recipe(ROOT / "trials/full.yaml")
    assert (light.model.backbone.depth, light.model.fusion.layers) == (18, 3)
    assert (light.data.image_size, light.data.max_long_side) == (600, 1000)
    assert light.model.fusion.init == "bert-base-uncased"
    assert (full.model.backbone.depth, full.model.fusion.layers) == (101, 12)
    assert full.model.vd.size == light.model.vd.size  # inherited through base:
    assert [(s.root, s.weight) for s in full.data.sources] == [("data/coco", 1.0), ("data/vg", 1.0)]  # SOHO: COCO + VG


def test_base_inheritance_deep_merges(tmp_path):
    write(tmp_path / "a.yaml", {"name": "a", "model": {"vd": {"size": 16, "momentum": 0.5}}})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "model": {"vd": {"size": 32}}})
    recipe = load_recipe(tmp_path / "b.yaml")
    assert recipe.name == "a"
    assert recipe.model.vd.size == 32
    assert recipe.model.vd.momentum == 0.5


def test_dotted_overrides_parse_yaml_values(tmp_path):
    write(tmp_path / "a.yaml", {"name": "a"})
    recipe = load_recipe(
        tmp_path / "a.yaml",
        ["model.vd.size=4096", "objectives.mvm.prob=0.25", "data.mean=[0.5, 0.5, 0.5]", "model.backbone.frozen_bn=true"],
    )
    assert recipe.model.vd.size == 4096
    assert recipe.objectives["mvm"].prob == 0.25
    assert recipe.data.mean == (0.5, 0.5, 0.5)
    assert recipe.model.backbone.frozen_bn is True


def test_unknown_key_names_file_and_path(tmp_path):
    path = write(tmp_path / "a.yaml", {"model": {"vd": {"sise": 8}}})
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "model.vd.sise" in msg and "unknown field" in msg and str(path) in msg


def test_wrong_type_names_value_and_expectation(tmp_path):
    path = write(tmp_path / "a.yaml", {"train": {"max_steps": "many"}})
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "train.max_steps" in msg and "'many'" in msg and "integer" in msg


def test_out_of_range_states_the_allowed_range(tmp_path):
    path = write(tmp_path / "a.yaml", {"name": "x"})
    with pytest.raises(ConfigError) as err:
        load_recipe(path, ["data.mlm_prob=1.5"])
    msg = str(err.value)
    assert "data.mlm_prob" in msg and "1.5" in msg and "<= 1.0" in msg
    assert "override 'data.mlm_prob=1.5'" in msg


def test_error_names_the_base_file_that_set_the_bad_value(tmp_path):
    base = write(tmp_path / "base.yaml", {"model": {"vd": {"momentum": 2.0}}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml"})
    with pytest.raises(ConfigError) as err:
        load_recipe(child)
    assert f"set in {base}" in str(err.value)


def test_objective_fields_are_validated_by_their_own_config(tmp_path):
    path = write(tmp_path / "a.yaml", {"objectives": {"mvm": {"weight": 1, "prob": 2}, "nope": {}}})
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "objectives.mvm.prob" in msg
    assert "unknown objective 'nope'" in msg and "mlm" in msg


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml")
    path = write(tmp_path / "a.yaml", {"base": "gone.yaml"})
    with pytest.raises(ConfigError, match=r"a.yaml: base: file not found"):
        load_recipe(path)


def test_base_cycle_is_refused(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_bad_override_syntax(tmp_path):
    path = write(tmp_path / "a.yaml", {"name": "a"})
    with pytest.raises(ConfigError, match="expected dotted.path=value"):
        load_recipe(path, ["model.vd.size"])
    with pytest.raises(ConfigError, match="is a value"):
        load_recipe(path, ["name.x=1"])


def test_every_field_has_a_description():
    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, prefix + name + ".")

    walk(Recipe, "")
    from vlptune.config import objectives as objective_configs
    from vlptune.objectives import registry

    for name in registry.names():
        walk(objective_configs.config_class(name), f"objectives.{name}.")
    assert not missing, f"fields without a description: {missing}"


def test_json_schema_covers_objectives():
    schema = json_schema()
    props = schema["properties"]["objectives"]["properties"]
    assert {"mlm", "itm", "mvm"} <= set(props)
    assert props["mvm"]["properties"]["prob"]["maximum"] == 1.0
    json.dumps(schema)  # serialisable


def test_field_at_resolves_paths():
    model, name = field_at("model.vd.size")
    assert name == "size" and model.model_fields[name].annotation is int
    model, name = field_at("objectives.mvm.prob")
    assert name == "prob"
    with pytest.raises(ConfigError, match="no field 'sise'"):
        field_at("model.vd.sise")


def test_cli_config_show_and_schema(capsys):
    assert cli.main(["config", "show", str(ROOT / "trials/light.yaml"), "-o", "model.vd.size=4096"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["vd"]["size"] == 4096
    assert cli.main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Recipe"
    assert cli.main(["config", "show", str(ROOT / "trials/light.yaml"), "-o", "model.vd.size=-4"]) == 2
    assert "model.vd.size" in capsys.readouterr().err
