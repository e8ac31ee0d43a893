"""Backbone, visual dictionary, fusion Transformer and the assembled VLP model.

Names are imported lazily: ``import vlptune.grid`` (used by the data
pipeline) must not pay for importing ``transformers``.

Public API::

    from vlptune.model import VLPModel, ImageFeatures, FusionOutput
    from vlptune.model import ResNetBackbone, GridProjection, VisualDictionary, FusionTransformer
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VLPModel": "vlptune.model.vlp",
    "ImageFeatures": "vlptune.model.vlp",
    "FusionOutput": "vlptune.model.fusion",
    "FusionTransformer": "vlptune.model.fusion",
    "ResNetBackbone": "vlptune.model.backbone",
    "GridProjection": "vlptune.model.backbone",
    "grid_mask_from_pixels": "vlptune.model.backbone",
    "resnet_config": "vlptune.model.backbone",
    "VisualDictionary": "vlptune.model.visual_dictionary",
    "VDOutput": "vlptune.model.visual_dictionary",
    "grid_shape": "vlptune.grid",
    "grid_stride": "vlptune.grid",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlptune.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
