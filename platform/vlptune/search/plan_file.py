"""What a search-space file and an ablation-study file share.

Both name a ``base:`` recipe, ``resources:``, ``fixed:`` recipe values and
take ``-o`` overrides that are either settings of the file itself or recipe
fields: :func:`split_overrides` tells them apart, :func:`resolve_base` reads
the base recipe and applies the rest (:class:`ResolvedBase`). Their
``describe()`` texts start alike (:func:`describe_header`,
:func:`describe_failures`, :func:`describe_fixed`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlptune.config import ConfigError, Recipe, default_objectives, field_at, load_raw_with_sources, parse_override, set_dotted, validate_recipe
from vlptune.errors import did_you_mean
from vlptune.search.params import FailuresSpec

# ------------------------------------------------------------------ overrides


def split_overrides(overrides: list[str] | None, own_keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """``-o`` overrides split into those of the file itself (top-level key in ``own_keys``) and the recipe's.

    A key that is neither is refused here, with the closest of both as the suggestion.
    """
    keys = set(own_keys)
    own: list[str] = []
    recipe: list[str] = []
    for text in overrides or []:
        parts, _ = parse_override(text)
        if parts[0] not in keys and parts[0] not in Recipe.model_fields:
            hint = did_you_mean(parts[0], [*keys, *Recipe.model_fields])
            raise ConfigError(f"override {text!r}: {parts[0]!r} is neither a setting of this file ({', '.join(sorted(keys))}) nor a recipe section{hint}")
        (own if parts[0] in keys else recipe).append(text)
    return own, recipe


# ------------------------------------------------------------------ the base recipe of a file


@dataclass
class ResolvedBase:
    """The base recipe of a search space or an ablation study, with resources/fixed/overrides applied."""

    file: str  # the recipe file (absolute), or the label given with an already resolved base
    raw: dict[str, Any]
    fixed: dict[str, Any]  # dotted path -> value: resources.*, fixed:, then command-line overrides
    recipe: Recipe | None  # None when it does not validate (then ``problems`` says why)
    problems: list[str]


def resolve_base(
    src: str,
    base_dir: Path,
    base: str,
    resources: dict[str, Any],
    fixed: dict[str, Any],
    recipe_overrides: list[str],
    base_raw: dict[str, Any] | None = None,
) -> ResolvedBase:
    """Read ``base`` (relative to ``base_dir``) and apply ``resources``, ``fixed`` and overrides.

    Problems (unknown paths, a recipe that does not validate) are returned as
    indented lines, so the caller can report them with its own; a missing or
    unreadable base file raises :class:`ConfigError` naming ``src``.
    ``base_raw``: an already resolved base (resume) used as is.
    """
    problems: list[str] = []
    if base_raw is None:
        base_path = (Path(base_dir) / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{src}: base: recipe file not found: {base_path} (the path is relative to {src})")
        base_file = str(base_path)
        try:
            raw, _ = load_raw_with_sources(base_path)
        except ConfigError as exc:
            raise ConfigError(f"{src}: base: {exc}") from None
    else:
        base_file = base
        raw = copy.deepcopy(base_raw)
    if base_raw is None and "objectives" not in raw:
        # Setting objectives.X.* on a base that lists none must not drop the default
        # objectives (a partial dict would replace the schema default entirely).
        raw["objectives"] = default_objectives()
    entries: list[tuple[str, str, Any]] = [(f"resources.{key}", f"resources.{key}", value) for key, value in resources.items()]
    entries += [(f"fixed.{dotted}", dotted, value) for dotted, value in fixed.items()]
    for text in recipe_overrides:
        parts, value = parse_override(text)
        entries.append((f"override {text!r}", ".".join(parts), value))
    applied: dict[str, Any] = {}
    for label, dotted, value in entries:
        try:
            field_at(dotted)
        except ConfigError as exc:
            problems.append(f"  {label}: {exc}")
            continue
        applied[dotted] = value
        if base_raw is None:
            set_dotted(raw, dotted.split("."), value, f"{src}: {label}")
    recipe: Recipe | None = None
    try:
        recipe = validate_recipe(raw, f"base recipe {base_file} with resources/fixed/overrides")
    except ConfigError as exc:
        lines = str(exc).splitlines()
        problems.append(f"  {lines[0]}")
        problems += [f"  {line}" for line in lines[1:]]
    return ResolvedBase(base_file, raw, applied, recipe, problems)


# ------------------------------------------------------------------ describe()


def describe_header(kind: str, plan: Any, base: Recipe) -> list[str]:
    """First lines of a plan file's ``describe()`` (a search space or a study): file, description, name, base recipe (``base``, validated)."""
    lines = [f"{kind} {plan.file}"]
    if plan.description:
        lines.append(f"  {plan.description.strip()}")
    lines += [f"  experiment name: {plan.name}", f"  base recipe: {plan.base_file} (name {base.name!r})"]
    return lines


def describe_failures(failures: FailuresSpec) -> str:
    return f"  failures: {failures.max_failures} worker-group restart(s) per trial from its last checkpoint, {failures.trial_max_failures} trial restart(s)"


def describe_fixed(plan: Any) -> list[str]:
    """The ``fixed:`` block of a plan's ``describe()``: file-level fixed paths, then command-line overrides."""
    if not (plan.fixed or plan.overrides):
        return []
    lines = ["  fixed:"]
    lines += [f"    {path} = {value!r}" for path, value in plan.fixed.items()]
    lines += [f"    {text}   (command line)" for text in plan.overrides]
    return lines
