"""Downstream task implementations by name (``@register("vqa")``), built-ins imported on first lookup.

The config of a task (:mod:`vlptune.config.downstream`) registers under the
same name; adding a task touches its module, its test and
:data:`BUILTIN_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from vlptune.config import downstream as configs

BUILTIN_MODULES = ("vlptune.downstream.vqa", "vlptune.downstream.classify", "vlptune.downstream.retrieval", "vlptune.downstream.captioning")

T = TypeVar("T", bound=type)

_REGISTRY: dict[str, type] = {}
_LOADED = False


def register(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register("vqa") class VQATask(RecordTask): ...``; a config registered as ``name`` must exist."""
    configs.config_class(name)  # ConfigError naming the known tasks when there is none

    def deco(impl: T) -> T:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != impl.__qualname__:
            raise ValueError(f"downstream task {name!r} is registered twice ({existing} and {impl})")
        _REGISTRY[name] = impl
        impl.name = name  # type: ignore[attr-defined]  # DownstreamTask.name, set here for every implementation
        return impl

    return deco


def get(name: str) -> type:
    """The implementation registered under ``name``."""
    global _LOADED
    if not _LOADED:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _LOADED = True
    if name not in _REGISTRY:
        configs.config_class(name)  # an unknown name: ConfigError with the known ones
        raise NotImplementedError(f"downstream task {name!r} has a config but no implementation registered")
    return _REGISTRY[name]
