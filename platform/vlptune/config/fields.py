"""Recipe-field introspection: dotted paths to fields, their bounds, what they allow, in words.

* :func:`field_at` resolves a dotted recipe path (``model.vd.size``,
  ``objectives.mvm.weight``) to its section model and field name.
* :func:`field_bounds` gives a field's pydantic bounds (``ge``/``gt``/``le``/``lt``)
  as numbers, :func:`bounds_text` writes them as text (``>= 0 and <= 1``); the
  one wording of bounds used by recipe errors (:func:`describe_allowed`) and
  search spaces (:func:`describe_field`).
* :func:`field_adapter` validates a single value as the field would;
  :func:`check_field_value` says why a value is not allowed at a path.

Torch-free, like the rest of :mod:`vlptune.config`.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from vlptune.config import objectives as objective_configs
from vlptune.config.base import ConfigError
from vlptune.errors import did_you_mean

BOUND_SYMBOLS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def field_bounds(info: FieldInfo) -> dict[str, float]:
    """A field's bounds as numbers: ``{"ge": 0, "le": 1}`` (only those it has)."""
    out = {}
    for meta in info.metadata:
        for attr in BOUND_SYMBOLS:
            value = getattr(meta, attr, None)
            if value is not None:
                out[attr] = value
    return out


def bounds_text(bounds: dict[str, float]) -> str:
    """Bounds from :func:`field_bounds` in words: ``>= 0 and <= 1`` ("" for none)."""
    return " and ".join(f"{BOUND_SYMBOLS[attr]} {value}" for attr, value in bounds.items())


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds (``X`` or ``X | None``); None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def section_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that the field path ``loc`` leads to from ``model`` (None: not a section)."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = section_model(model.model_fields[part].annotation)
    return model


def describe_allowed(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """What the schema allows at ``loc`` (a validation error's location): the field's bounds and description."""
    if model is None:
        return ""
    field = None
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return ""
            current = field.annotation
        else:
            return ""
    if field is None:
        return ""
    bounds = bounds_text(field_bounds(field))
    text = f"allowed: {bounds}" if bounds else ""
    if field.description:
        text = f"{text}; " if text else ""
        text += f"field: {field.description}"
    return text


def unknown_field_hint(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """``did you mean 'x'?`` for an unknown key at ``loc``, else a pointer to the schema."""
    section = section_at(model, loc[:-1])
    hint = did_you_mean(str(loc[-1]), section.model_fields, aside=False) if section is not None and loc else ""
    return hint or "check the spelling against `vlptune config schema`"


def describe_field(model: type[BaseModel], name: str) -> str:
    """What a recipe field allows, in words: its type and bounds (or its Literal choices) and description."""
    info = model.model_fields[name]
    ann = info.annotation
    if typing.get_origin(ann) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    bounds = bounds_text(field_bounds(info))
    type_name = getattr(ann, "__name__", str(ann))
    text = f"{type_name}" + (f" {bounds}" if bounds else "")
    if info.description:
        text += f" ({info.description})"
    return text


def field_adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    """Validates one value as the field ``name`` of ``model`` would (type and bounds)."""
    info = model.model_fields[name]
    return TypeAdapter(Annotated[info.annotation, *info.metadata]) if info.metadata else TypeAdapter(info.annotation)


def field_at(path: str) -> tuple[type[BaseModel], str]:
    """Resolve a dotted recipe path to (section model, field name); ConfigError if absent."""
    from vlptune.config.recipe import Recipe  # circular: recipe.py words its validation errors with this module

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
