"""Field introspection: a field's bounds and what it allows, in words (one wording for recipe errors and search spaces).

* :func:`field_bounds` gives a field's pydantic bounds (``ge``/``gt``/``le``/``lt``)
  as numbers, :func:`bounds_text` writes them as text (``>= 0 and <= 1``); the
  one wording of bounds used by recipe errors (:func:`describe_allowed`) and
  search spaces (:func:`describe_field`).
* :func:`field_adapter` validates a single value as the field would.

Dotted recipe paths (``field_at``, ``check_field_value``) walk from the
``Recipe`` and live in :mod:`vlptune.config.paths`, above the recipe that
words its errors with this module.

Torch-free, like the rest of :mod:`vlptune.config`.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

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


def field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """Validates one value as the field ``name`` of ``model`` would (type and bounds)."""
    info = model.model_fields[name]
    annotation: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
    return TypeAdapter(annotation)
