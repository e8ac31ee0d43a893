"""``data.decode: gpu``: JPEG decoding on the GPU with ``torchvision.io.decode_jpeg`` (nvJPEG).

torchvision is an optional dependency (the ``gpu`` extra of pyproject.toml,
installed only on GPU machines; it is not in requirements.lock). It is
imported only when a recipe asks for GPU decoding; without it, or without
CUDA, :func:`check_gpu_decoding` stops the run with a clear error and the
default CPU path (PIL, data.decode: cpu) is the fallback.

The decoded uint8 ``[3, H, W]`` tensor goes through the same transform as a
PIL image (vlptune.data.transforms, on the GPU). Non-JPEG bytes (PNG) are
decoded by PIL and moved to the device.
"""

from __future__ import annotations

import importlib
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlptune.config import ConfigError
from vlptune.data.schema import DataError

JPEG_MAGIC = b"\xff\xd8\xff"
EXTRA_HINT = "install the optional 'gpu' extra (pip install 'vlptune[gpu]', torchvision matching the installed torch) or set data.decode: cpu"


def _torchvision_io() -> Any:
    try:
        return importlib.import_module("torchvision.io")
    except ImportError as exc:
        raise ConfigError(f"data.decode=gpu needs torchvision, which is not installed here ({exc}); {EXTRA_HINT}") from exc


def check_gpu_decoding(num_workers: int) -> torch.device:
    """The CUDA device GPU decoding runs on, or a ConfigError saying what is missing."""
    _torchvision_io()
    if not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu needs a CUDA device, and none is visible; set data.decode: cpu")
    if num_workers > 0:
        raise ConfigError(
            f"data.decode=gpu decodes in the training process (CUDA cannot run in forked DataLoader workers): set data.num_workers: 0 (it is {num_workers})"
        )
    return torch.device("cuda", torch.cuda.current_device())


def decode_image_tensor(data: bytes | None, record_id: str, device: torch.device) -> torch.Tensor:
    """Image bytes -> uint8 RGB ``[3, H, W]`` on ``device`` (JPEG: nvJPEG; others: PIL). DataError when undecodable."""
    if data is None or len(data) == 0:
        raise DataError(f"record {record_id}: field 'image' is empty")
    try:
        if bytes(data[:3]) == JPEG_MAGIC:
            tvio = _torchvision_io()
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return tvio.decode_jpeg(raw, mode=tvio.ImageReadMode.RGB, device=device)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().to(device)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(f"record {record_id}: field 'image' ({len(data)} bytes) cannot be decoded: {exc}") from exc
