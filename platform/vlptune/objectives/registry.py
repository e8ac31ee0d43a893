"""Objective implementations by name.

An objective has two halves registered under one name: its config, defined in
:mod:`vlptune.config.objectives` (torch-free, so recipes validate without
building anything), and its ``nn.Module`` here, registered with
``@register("mlm")``, which finds its config class by the same name. The
built-in implementations are imported on first lookup from
:data:`BUILTIN_MODULES`, so asking for a name never needs an explicit import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vlptune.config import objectives as configs
from vlptune.config.objectives import ObjectiveConfig

BUILTIN_MODULES = (
    "vlptune.objectives.mlm",
    "vlptune.objectives.itm",
    "vlptune.objectives.mvm",
    "vlptune.objectives.omvm",
    "vlptune.objectives.pra",
    "vlptune.objectives.ssul",
    "vlptune.objectives.segl",
    "vlptune.objectives.spl",
    "vlptune.objectives.detection",
    "vlptune.objectives.captioning",
    "vlptune.objectives.vsc",
    "vlptune.objectives.wpg",
    "vlptune.objectives.backbone_cls",
)

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Registered:
    name: str
    config_cls: type[ObjectiveConfig]
    impl: type


_REGISTRY: dict[str, Registered] = {}
_LOADED = False


def register(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register("mlm") class MLM(Objective): ...``; the config class registered as ``"mlm"`` must exist."""
    config_cls = configs.config_class(name)  # ConfigError naming the known configs when there is none

    def deco(impl: T) -> T:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.impl.__qualname__ != impl.__qualname__:
            raise ValueError(f"objective {name!r} is registered twice ({existing.impl} and {impl})")
        _REGISTRY[name] = Registered(name, config_cls, impl)
        impl.name = name  # type: ignore[attr-defined]  # Objective.name, set here for every implementation
        return impl

    return deco


def load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    _LOADED = True


def names() -> list[str]:
    """Every objective name (those with a config; built-in implementations loaded)."""
    load_builtin()
    return configs.names()


def get(name: str) -> Registered:
    """The implementation registered under ``name``."""
    load_builtin()
    if name not in _REGISTRY:
        configs.config_class(name)  # an unknown name: ConfigError with the known ones
        raise NotImplementedError(f"objective {name!r} has a config but no implementation registered")
    return _REGISTRY[name]
