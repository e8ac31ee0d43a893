"""Fidelity maps: how a light trial's searched values become a full recipe's values.

A fidelity map is a YAML file (format in docs/promotion.md)::

    description: light (ResNet-18 + 3 layers) -> full (ResNet-101 + 12 layers)
    rules:
      model.vd.size: carry              # the value carries over unchanged
      objectives.*.weight: carry        # globs match dotted paths (fnmatch)
      optim.*.lr: lr_sqrt               # scaled by sqrt(global batch target / source)
      optim.warmup_steps: steps         # scaled by max_steps target / source
      data.image_size: target           # the target recipe's value stays

Every searched parameter of the source experiment must be covered by a rule:
a parameter the map does not name is refused (a silent carry-over is how
promotions go wrong). An exact path wins over a glob; among globs the first in
file order wins.

Rules (:data:`RULES`):

* ``carry``: the trial's value, unchanged;
* ``target``: the target recipe's value stays (the trial's value is dropped);
* ``lr_linear``: value x (global batch of the target / of the source);
* ``lr_sqrt``: value x sqrt(global batch of the target / of the source);
* ``steps``: value x (train.max_steps of the target / of the source), rounded
  to the nearest integer on integer fields.

The global batch of a recipe is ``optim.global_batch``, or, when that is 0,
``data.batch_images x resources.workers`` (images per optimizer step).
"""

from __future__ import annotations

import fnmatch
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlptune.config import ConfigError, Recipe, field_at, format_validation_error, read_yaml_mapping
from vlptune.search.space import find_recipe_value

Rule = Literal["carry", "target", "lr_linear", "lr_sqrt", "steps"]
RULES: tuple[str, ...] = typing.get_args(Rule)
SCALED_RULES = ("lr_linear", "lr_sqrt", "steps")
RULE_WORDS = {
    "carry": "carried over unchanged",
    "target": "the target recipe's value kept",
    "lr_linear": "scaled linearly with the global batch (target / source)",
    "lr_sqrt": "scaled with the square root of the global batch ratio (target / source)",
    "steps": "scaled with the ratio of train.max_steps (target / source)",
}
GLOB_CHARS = "*?["


class FidelityMapError(ConfigError):
    """A fidelity map that cannot be read, or that cannot map a trial (names the file and the path)."""


class FidelityMapFile(BaseModel):
    """The top level of a fidelity-map file."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field("", description="free text: which source and target recipes this map is for")
    rules: dict[str, Rule] = Field(..., description="dotted recipe path or glob (fnmatch: *, ?, [..]) -> rule: carry, target, lr_linear, lr_sqrt or steps")


@dataclass(frozen=True)
class FidelityMap:
    """A validated fidelity map."""

    file: str
    description: str
    rules: dict[str, str]  # path or glob -> rule, in file order

    def rule_for(self, path: str) -> tuple[str, str] | None:
        """(the map key that matched, its rule) for a dotted path; None when no entry covers it."""
        if path in self.rules:
            return path, self.rules[path]
        for key, rule in self.rules.items():
            if any(ch in key for ch in GLOB_CHARS) and fnmatch.fnmatchcase(path, key):
                return key, rule
        return None

    def uncovered(self, paths: typing.Iterable[str]) -> list[str]:
        return [p for p in paths if self.rule_for(p) is None]


def _numeric_kind(path: str) -> str | None:
    """'int' or 'float' for a numeric recipe field, else None."""
    model, name = field_at(path)
    ann = model.model_fields[name].annotation
    if ann is int:
        return "int"
    if ann is float:
        return "float"
    return None


def load_fidelity_map(path: str | Path) -> FidelityMap:
    """Read and check a fidelity-map file; every problem at once, each naming the key."""
    path = Path(path)
    src = str(path)
    doc = read_yaml_mapping(path)
    try:
        spec = FidelityMapFile.model_validate(doc)
    except ValidationError as exc:
        text = format_validation_error(exc, src, FidelityMapFile)
        text = text.replace("invalid configuration:", f"invalid fidelity map (each rule is one of {', '.join(RULES)}):", 1)
        raise FidelityMapError(text) from None
    problems: list[str] = []
    if not spec.rules:
        problems.append("  rules: empty; give at least one dotted path (or glob) with a rule")
    for key, rule in spec.rules.items():
        if not key or any(not part for part in key.split(".")):
            problems.append(f"  rules.{key}: not a dotted path (empty component)")
            continue
        if any(ch in key for ch in GLOB_CHARS):
            head = key.split(".", 1)[0]
            if not any(ch in head for ch in GLOB_CHARS) and head not in Recipe.model_fields:
                problems.append(f"  rules.{key}: the glob starts with {head!r}, which is not a recipe section; sections: {sorted(Recipe.model_fields)}")
            continue
        try:
            field_at(key)
        except ConfigError as exc:
            problems.append(f"  rules.{key}: {exc}")
            continue
        if rule in SCALED_RULES and _numeric_kind(key) is None:
            problems.append(f"  rules.{key}: rule {rule!r} scales a number, and {key} is not a numeric field; use carry or target")
    if problems:
        raise FidelityMapError("\n".join([f"{src}: invalid fidelity map:", *problems]))
    return FidelityMap(file=src, description=spec.description, rules=dict(spec.rules))


# ------------------------------------------------------------------ scaling


def global_batch(recipe: Recipe) -> int:
    """Images per optimizer step over all workers."""
    return int(recipe.optim.global_batch or recipe.data.batch_images * recipe.resources.workers)


@dataclass(frozen=True)
class Ratios:
    """Target / source ratios the scaling rules use."""

    source_batch: int
    target_batch: int
    source_steps: int
    target_steps: int

    @classmethod
    def between(cls, source: Recipe, target: Recipe) -> Ratios:
        return cls(global_batch(source), global_batch(target), int(source.train.max_steps), int(target.train.max_steps))

    @property
    def batch(self) -> float:
        return self.target_batch / self.source_batch

    @property
    def steps(self) -> float:
        return self.target_steps / self.source_steps

    def factor(self, rule: str) -> float:
        if rule == "lr_linear":
            return self.batch
        if rule == "lr_sqrt":
            return math.sqrt(self.batch)
        if rule == "steps":
            return self.steps
        return 1.0

    def explain(self, rule: str) -> str:
        if rule == "lr_linear":
            return f"x {self.batch:.6g} (global batch {self.target_batch} / {self.source_batch})"
        if rule == "lr_sqrt":
            return f"x sqrt({self.target_batch} / {self.source_batch}) = x {math.sqrt(self.batch):.6g}"
        if rule == "steps":
            return f"x {self.steps:.6g} (max_steps {self.target_steps} / {self.source_steps})"
        return ""


@dataclass(frozen=True)
class MappedValue:
    """One searched value of a trial, through the map."""

    path: str
    rule: str
    matched: str  # the map key that covered the path
    source: Any  # the trial's value
    value: Any  # the value written into the promoted recipe (the target's own for rule 'target')
    applied: bool  # False for 'target': nothing is written, the target's value stays
    factor: float  # 1.0 unless scaled
    note: str  # the rule in words, with the numbers

    def as_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "rule": self.rule, "trial": self.source, "promoted": self.value}
        if self.rule in SCALED_RULES:
            out["factor"] = self.factor
        out["note"] = self.note
        if self.matched != self.path:
            out["map_entry"] = self.matched
        return out


def map_values(
    fmap: FidelityMap,
    searched: dict[str, Any],
    source: Recipe,
    target: Recipe,
    target_raw: dict[str, Any],
    context: str,
) -> list[MappedValue]:
    """Map one trial's searched values onto the target recipe.

    ``searched``: dotted path -> the trial's value. ``source``: the trial's
    resolved recipe (for its global batch and max_steps); ``target`` and
    ``target_raw``: the target recipe, validated and as a resolved dict.
    ``context`` names the trial in errors. A path the map does not cover, or a
    scaled rule on a value that is not a number, is a :class:`FidelityMapError`.
    """
    missing = fmap.uncovered(searched)
    if missing:
        raise FidelityMapError(
            f"{fmap.file}: no rule for the searched parameter(s) {', '.join(missing)} of {context}; "
            f"add each to rules: with carry, target, lr_linear, lr_sqrt or steps (a silent carry-over is refused)"
        )
    ratios = Ratios.between(source, target)
    out: list[MappedValue] = []
    for path, value in searched.items():
        matched, rule = fmap.rule_for(path)  # type: ignore[misc]
        if rule == "carry":
            out.append(MappedValue(path, rule, matched, value, value, True, 1.0, RULE_WORDS[rule]))
            continue
        if rule == "target":
            kept = find_recipe_value(target_raw, path)
            out.append(MappedValue(path, rule, matched, value, kept, False, 1.0, f"{RULE_WORDS[rule]} ({kept!r})"))
            continue
        kind = _numeric_kind(path)
        if kind is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FidelityMapError(f"{fmap.file}: rules.{matched}: rule {rule!r} scales a number; {path} of {context} is {value!r}; use carry or target for it")
        factor = ratios.factor(rule)
        scaled: int | float = value * factor
        note = f"{value!r} {ratios.explain(rule)} = {scaled:.6g}"
        if kind == "int":
            rounded = int(round(scaled))
            if rounded != scaled:
                note += f", rounded to {rounded}"
            scaled = rounded
        out.append(MappedValue(path, rule, matched, value, scaled, True, factor, note))
    return out


def overrides_of(mapped: list[MappedValue]) -> dict[str, Any]:
    """Dotted path -> value of the mapped values that change the target recipe (not 'target')."""
    return {m.path: m.value for m in mapped if m.applied}
