"""Typed configuration, importable without torch: recipes, their sections and the objectives' own configs.

* :mod:`vlptune.config.base` — :class:`ConfigError` and the strict :class:`Section` model.
* :mod:`vlptune.config.objectives` — every objective's config, registered by name.
* :mod:`vlptune.config.recipe` — the recipe sections, loading (``base:`` chains, ``-o`` overrides), validation and the JSON schema.
* :mod:`vlptune.config.fields` — field introspection: bounds and what a field allows, in words.
* :mod:`vlptune.config.paths` — dotted recipe paths to fields (``field_at``, ``check_field_value``).

The names below are the public surface; import them from ``vlptune.config``.
"""

from __future__ import annotations

from vlptune.config.base import ConfigError, Section
from vlptune.config.fields import (
    bounds_text,
    describe_field,
    field_adapter,
    field_bounds,
)
from vlptune.config.objectives import ObjectiveConfig
from vlptune.config.paths import check_field_value, field_at
from vlptune.config.recipe import (
    RECIPE_SUFFIXES,
    BackboneConfig,
    DataConfig,
    EvalConfig,
    FusionConfig,
    GroupOptimConfig,
    ModelConfig,
    OptimConfig,
    Recipe,
    ResourcesConfig,
    SourceConfig,
    SynthConfig,
    TrainConfig,
    VDConfig,
    apply_overrides,
    deep_merge,
    default_objectives,
    dump_recipe,
    format_validation_error,
    json_schema,
    load_raw,
    load_raw_with_sources,
    load_recipe,
    parse_override,
    read_yaml_mapping,
    recipe_to_dict,
    set_dotted,
    validate_recipe,
)

__all__ = [
    "ConfigError",
    "Section",
    "ObjectiveConfig",
    "RECIPE_SUFFIXES",
    "SourceConfig",
    "SynthConfig",
    "DataConfig",
    "BackboneConfig",
    "VDConfig",
    "FusionConfig",
    "ModelConfig",
    "GroupOptimConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "ResourcesConfig",
    "Recipe",
    "read_yaml_mapping",
    "deep_merge",
    "default_objectives",
    "load_raw_with_sources",
    "load_raw",
    "parse_override",
    "set_dotted",
    "apply_overrides",
    "format_validation_error",
    "validate_recipe",
    "load_recipe",
    "recipe_to_dict",
    "dump_recipe",
    "json_schema",
    "field_at",
    "field_bounds",
    "bounds_text",
    "describe_field",
    "field_adapter",
    "check_field_value",
]
