"""Objective registry: pretext tasks by name.

An objective is a module that declares its config model (a subclass of
:class:`ObjectiveConfig`, so every objective has a ``weight``) and its
implementation class, registered under a name with :func:`register`. A recipe
lists objectives by that name. Built-in objectives are imported lazily from
:data:`BUILTIN_MODULES`, so looking up a name never needs an explicit import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pydantic import Field

from vlptune.config import ConfigError, Section
from vlptune.errors import did_you_mean

BUILTIN_MODULES = (
    "vlptune.objectives.mlm",
    "vlptune.objectives.itm",
    "vlptune.objectives.mvm",
    "vlptune.objectives.omvm", "vlptune.objectives.pra", "vlptune.objectives.ssul", "vlptune.objectives.segl", "vlptune.objectives.spl",
    "vlptune.objectives.detection", "vlptune.objectives.captioning", "vlptune.objectives.vsc", "vlptune.objectives.wpg",
)


class ObjectiveConfig(Section):
    """Fields every objective has.

    A subclass declared as ``class MLMConfig(ObjectiveConfig, objective="mlm")``
    registers its name at once, so recipes validate without building models.
    """

    def __init_subclass__(cls, objective: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if objective is not None:
            _CONFIGS[objective] = cls

    weight: float = Field(1.0, ge=0.0, le=100.0, description="weight of this loss in the total; 0 switches the objective off")


@dataclass(frozen=True)
class Registered:
    name: str
    config_cls: type[ObjectiveConfig]
    impl: type


_REGISTRY: dict[str, Registered] = {}
_CONFIGS: dict[str, type] = {}
_LOADED = False


def register(name: str, config_cls: type[ObjectiveConfig]) -> Callable[[type], type]:
    """Class decorator: ``@register("mlm", MLMConfig) class MLM(Objective): ...``."""
    if not issubclass(config_cls, ObjectiveConfig):
        raise TypeError(f"objective {name!r}: config class must subclass ObjectiveConfig")

    def deco(impl: type) -> type:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.impl.__qualname__ != impl.__qualname__:
            raise ValueError(f"objective {name!r} is registered twice ({existing.impl} and {impl})")
        _REGISTRY[name] = Registered(name, config_cls, impl)
        _CONFIGS[name] = config_cls
        impl.name = name
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
    load_builtin()
    return sorted(_CONFIGS)


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"objectives.{name}: unknown objective {name!r}{did_you_mean(name, _CONFIGS)}; registered: {', '.join(sorted(_CONFIGS))}")


def get(name: str) -> Registered:
    """The implementation registered under ``name``."""
    load_builtin()
    if name not in _REGISTRY:
        if name in _CONFIGS:
            raise NotImplementedError(f"objective {name!r} has a config but no implementation registered")
        raise _unknown(name)
    return _REGISTRY[name]


def config_class(name: str) -> type[ObjectiveConfig]:
    load_builtin()
    if name not in _CONFIGS:
        raise _unknown(name)
    return _CONFIGS[name]
