"""Image transforms that carry boxes and segmentation maps along exactly.

Order (train): optional random resized crop -> resize -> description-aware
horizontal flip -> normalise. Evaluation: resize -> normalise.

* Resize (``data.resize_mode``): ``shorter_side`` scales the shorter side to
  ``data.image_size`` and caps the longer side at ``data.max_long_side``
  (aspect preserved, the paper's 600x1000); ``square`` resizes both sides to
  ``data.image_size``.
* Random resized crop (``data.random_resized_crop``, train only): a crop of
  ``[crop_scale_min, 1]`` of the area with aspect ratio in
  :data:`CROP_RATIO`, then the resize above. Boxes are shifted, clipped to the
  crop and dropped when less than :data:`MIN_BOX_SIDE` pixels survive on a side.
* Horizontal flip (``data.hflip_prob``, train only) is skipped whenever any
  caption of the sample mentions left or right (whole words, see
  :func:`mentions_left_right`); boxes are mirrored, the map flipped.

The same transform runs on a PIL image (CPU decoding) or on a uint8
``[3, H, W]`` tensor (``data.decode: gpu``); a JPEG may be decoded at a
reduced size first (``data.jpeg_draft``, :meth:`ImageTransform.draft_size`)
when the resize shrinks it anyway.

Boxes are float arrays ``[n, 4]`` of ``(x0, y0, x1, y1)`` in pixels of the
current image; segmentation maps are uint8 ``[h, w]`` resized with nearest
neighbour so class ids never blend.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlptune.config import DataConfig

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of random resized crops (torchvision's default)
CROP_ATTEMPTS = 10  # tries to draw a crop that fits before falling back to the whole image
MIN_BOX_SIDE = 1.0  # pixels: a box clipped thinner than this by a crop is dropped

# Words that make a caption direction-sensitive. Whole-word match, so
# "bright", "copyright" or "alright" do not block a flip.
LEFT_RIGHT_WORDS = frozenset(
    {
        "left", "right", "leftmost", "rightmost", "lefthand", "righthand",
        "leftward", "rightward", "leftwards", "rightwards",
    }
)
_WORD_RE = re.compile(r"[a-z]+")


def mentions_left_right(texts: Sequence[str]) -> bool:
    """True when any text contains a left/right word (case-insensitive, whole words)."""
    for text in texts:
        for word in _WORD_RE.findall(text.lower()):
            if word in LEFT_RIGHT_WORDS:
                return True
    return False


def resized_hw(height: int, width: int, data: DataConfig) -> tuple[int, int]:
    """Output (h, w) of the resize for an input of ``height x width``."""
    if data.resize_mode == "square":
        return data.image_size, data.image_size
    scale = data.image_size / min(height, width)
    if max(height, width) * scale > data.max_long_side:
        scale = data.max_long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


# ------------------------------------------------------------------ box helpers


def clean_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Order the corners and clip to the image; shape [n, 4] float32."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    x0 = np.minimum(b[:, 0], b[:, 2]).clip(0, width)
    x1 = np.maximum(b[:, 0], b[:, 2]).clip(0, width)
    y0 = np.minimum(b[:, 1], b[:, 3]).clip(0, height)
    y1 = np.maximum(b[:, 1], b[:, 3]).clip(0, height)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def crop_boxes(boxes: np.ndarray, top: int, left: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes in the crop's coordinates, clipped; returns (boxes, indices kept)."""
    b = boxes.astype(np.float32).copy()
    b[:, [0, 2]] = (b[:, [0, 2]] - left).clip(0, width)
    b[:, [1, 3]] = (b[:, [1, 3]] - top).clip(0, height)
    keep = np.nonzero(((b[:, 2] - b[:, 0]) >= MIN_BOX_SIDE) & ((b[:, 3] - b[:, 1]) >= MIN_BOX_SIDE))[0]
    return b[keep], keep


def scale_boxes(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    return (boxes * np.array([sx, sy, sx, sy], dtype=np.float32)).astype(np.float32)


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror boxes in an image ``width`` pixels wide: x0' = W - x1, x1' = W - x0."""
    b = boxes.copy()
    b[:, 0] = width - boxes[:, 2]
    b[:, 2] = width - boxes[:, 0]
    return b


def random_crop_window(height: int, width: int, scale_min: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop; the whole image when nothing fits."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return 0, 0, height, width


def normalise(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 [3, h, w], (x/255 - mean) / std.

    One pass converts the (h, w, 3) bytes into a contiguous float tensor, two
    in-place passes scale and shift it (the fastest of the orders measured in
    bench/loader.py's profile)."""
    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    with warnings.catch_warnings():  # a read-only view of PIL's pixels (no copy): only read, into a new tensor
        warnings.simplefilter("ignore", UserWarning)
        arr = torch.from_numpy(pixels).permute(2, 0, 1)  # [3, h, w]
    out = torch.empty(arr.shape, dtype=torch.float32)
    out.copy_(arr)
    scale, shift = _affine(mean, std, out.device)
    return out.mul_(scale).add_(shift)  # (x/255 - mean)/std = x/(255 std) - mean/std


def normalise_tensor(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or float (0..255) [3, h, w] tensor, on any device -> float32 [3, h, w], (x/255 - mean) / std."""
    scale, shift = _affine(mean, std, image.device)
    return image.to(torch.float32).mul(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def _affine_cached(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)[:, None, None]
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device)[:, None, None]
    return scale, shift


def _affine(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` [3, 1, 1] with ``x * scale + shift = (x/255 - mean) / std`` (made once per device)."""
    return _affine_cached(tuple(float(m) for m in mean), tuple(float(s) for s in std), device)


# ------------------------------------------------------------------ image operations (PIL or tensor)
#
# The transform runs on a PIL image (the CPU path) or on a uint8 [3, H, W]
# tensor (data.decode: gpu, where torchvision decodes the JPEG on the GPU):
# crop, resize (bilinear, antialiased when shrinking: PIL's filter), flip and
# normalise, the same geometry either way.


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """(width, height)."""
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


def _crop(image: Image.Image | torch.Tensor, top: int, left: int, h: int, w: int) -> Image.Image | torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image[:, top : top + h, left : left + w]
    return image.crop((left, top, left + w, top + h))


def _resize(image: Image.Image | torch.Tensor, h: int, w: int) -> Image.Image | torch.Tensor:
    if isinstance(image, torch.Tensor):
        x = image.to(torch.float32).unsqueeze(0)
        return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
    return image.resize((w, h), Image.Resampling.BILINEAR)


def _flip(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.flip(-1)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


# ------------------------------------------------------------------ the transform


@dataclass
class Transformed:
    image: torch.Tensor  # float32 [3, h, w], normalised
    boxes: np.ndarray  # float32 [n, 4] (x0, y0, x1, y1) pixels of the output image
    keep: np.ndarray  # int64 [n]: index in the input boxes of each output box
    seg: np.ndarray | None  # uint8 [h, w]
    flipped: bool
    crop: tuple[int, int, int, int] | None  # (top, left, h, w) in input pixels


class ImageTransform:
    """The per-sample geometric + photometric transform of ``data`` (train or eval)."""

    def __init__(self, data: DataConfig, train: bool):
        self.data = data
        self.train = train

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(w, h) the image of ``width x height`` may be decoded at (JPEG draft mode) without changing
        the output: the resize target, or None when the image is not shrunk (or a random crop comes first)."""
        if not self.data.jpeg_draft or (self.train and self.data.random_resized_crop):
            return None
        nh, nw = resized_hw(height, width, self.data)
        return (nw, nh) if nw < width and nh < height else None

    def __call__(
        self,
        image: Image.Image | torch.Tensor,
        boxes: np.ndarray,
        seg: np.ndarray | None,
        captions: Sequence[str],
        rng: np.random.Generator,
        source_size: tuple[int, int] | None = None,
    ) -> Transformed:
        """``source_size``: (w, h) of the stored image when ``image`` was decoded smaller (draft mode);
        boxes and the map are in those pixels, the output is what the full-size image would give."""
        data = self.data
        width, height = source_size or image_size(image)
        if seg is not None and seg.shape != (height, width):
            raise ValueError(f"segmentation map is {seg.shape[1]}x{seg.shape[0]} but the image is {width}x{height}")
        boxes = clean_boxes(boxes, height, width)
        keep = np.arange(len(boxes), dtype=np.int64)
        if source_size is not None and source_size != image_size(image):  # decoded smaller: boxes and map follow
            dw, dh = image_size(image)
            boxes = scale_boxes(boxes, dw / width, dh / height)
            if seg is not None:
                seg = np.asarray(Image.fromarray(np.ascontiguousarray(seg)).resize((dw, dh), Image.Resampling.NEAREST), dtype=np.uint8)
            width, height = dw, dh
        crop = None
        if self.train and data.random_resized_crop:
            top, left, ch, cw = random_crop_window(height, width, data.crop_scale_min, rng)
            crop = (top, left, ch, cw)
            image = _crop(image, top, left, ch, cw)
            if seg is not None:
                seg = seg[top : top + ch, left : left + cw]
            boxes, keep = crop_boxes(boxes, top, left, ch, cw)
            height, width = ch, cw
        nh, nw = resized_hw(height, width, data)
        if (nh, nw) != (height, width):
            image = _resize(image, nh, nw)
            if seg is not None:
                seg = np.asarray(Image.fromarray(np.ascontiguousarray(seg)).resize((nw, nh), Image.Resampling.NEAREST), dtype=np.uint8)
            boxes = scale_boxes(boxes, nw / width, nh / height)
        flipped = False
        # Draw the coin even when the flip is vetoed, so the stream of random
        # numbers (and so every later choice) does not depend on the captions.
        coin = rng.random() if self.train else 1.0
        if self.train and coin < data.hflip_prob and not mentions_left_right(captions):
            flipped = True
            image = _flip(image)
            if seg is not None:
                seg = np.ascontiguousarray(seg[:, ::-1])
            boxes = hflip_boxes(boxes, nw)
        tensor = normalise_tensor(image, data.mean, data.std) if isinstance(image, torch.Tensor) else normalise(image, data.mean, data.std)
        return Transformed(image=tensor, boxes=boxes.astype(np.float32), keep=keep, seg=seg, flipped=flipped, crop=crop)
