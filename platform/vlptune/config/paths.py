"""Dotted recipe paths: ``model.vd.size`` or ``objectives.mvm.weight`` to its section model and field.

* :func:`field_at` resolves a path to (section model, field name), ConfigError naming what exists otherwise;
* :func:`check_field_value` says why a value is not allowed at a path.

Search spaces, studies and fidelity maps check every path they name through these. Torch-free.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from vlptune.config import objectives as objective_configs
from vlptune.config.base import ConfigError
from vlptune.config.fields import describe_field, field_adapter
from vlptune.config.recipe import Recipe
from vlptune.errors import did_you_mean


def field_at(path: str) -> tuple[type[BaseModel], str]:
    """Resolve a dotted recipe path to (section model, field name); ConfigError if absent."""
    parts = path.split(".")
    model: type[BaseModel] = Recipe
    for i, part in enumerate(parts):
        if model is Recipe and part == "objectives":
            if i + 2 >= len(parts):
                raise ConfigError(f"{path}: name an objective and its field, e.g. objectives.mvm.weight")
            model = objective_configs.config_class(parts[i + 1])
            rest = parts[i + 2 :]
            if len(rest) != 1 or rest[0] not in model.model_fields:
                hint = did_you_mean(rest[0], model.model_fields) if len(rest) == 1 else ""
                raise ConfigError(f"{path}: objective {parts[i + 1]!r} has no field {'.'.join(rest)!r}{hint}; fields: {sorted(model.model_fields)}")
            return model, rest[0]
        if part not in model.model_fields:
            hint = did_you_mean(part, model.model_fields)
            raise ConfigError(f"{path}: no field {part!r} in {'.'.join(parts[:i]) or 'the recipe'}{hint}; fields: {sorted(model.model_fields)}")
        if i == len(parts) - 1:
            return model, part
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"{path}: {'.'.join(parts[: i + 1])} is a value, not a section")
        model = annotation
    raise ConfigError(f"{path}: empty path")


def check_field_value(path: str, value: Any) -> str | None:
    """Why ``value`` is not allowed at the recipe field ``path`` (None: allowed).

    Whole sections (``data.synth``) are not checked here; they are when the
    recipe they end up in is validated.
    """
    model, name = field_at(path)
    ann = model.model_fields[name].annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return None
    try:
        field_adapter(model, name).validate_python(value)
    except ValidationError as exc:
        return f"{value!r} is not allowed ({exc.errors()[0]['msg']}); allowed: {describe_field(model, name)}"
    return None
