"""Geometry of the backbone's output grid, shared by the config checks, the data pipeline and the model (torch-free).

ResNets downsample by 32 (every strided layer rounds up), then the projection
is max-pooled with kernel = stride = ``pool`` in ceil mode, so an image of
``h x w`` pixels gives a grid of ``ceil(h / s) x ceil(w / s)`` cells with
``s = 32 * pool``.
"""

from __future__ import annotations

import math

RESNET_STRIDE = 32


def grid_stride(pool: int) -> int:
    """Pixels per grid cell for a ResNet followed by a ``pool`` x ``pool`` max-pool."""
    return RESNET_STRIDE * pool


def grid_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    return math.ceil(height / stride), math.ceil(width / stride)
