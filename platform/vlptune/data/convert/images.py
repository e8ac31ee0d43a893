"""Fix one image at conversion time, so training never decodes an awkward original.

:func:`fix_image` takes the raw bytes and returns JPEG bytes (or the original
JPEG, untouched, when nothing needed fixing) plus the geometry needed to move
boxes with the pixels (:func:`move_boxes`). Pure functions of their inputs:
the pipeline maps them over records, tests call them directly.

What is fixed, in order:

1. the format is sniffed from the bytes (:func:`sniff_format`), never taken
   from the file name: a PNG named ``.jpg`` is read as the PNG it is;
2. EXIF orientation is applied (the pixels are turned upright, the tag dropped);
3. modes: CMYK, greyscale (``L``, ``1``), palette (``P``, with or without
   transparency), alpha (``RGBA``, ``LA``, ``PA``: composited on white) and
   16-bit / 32-bit greyscale (``I;16``, ``I``, ``F``: scaled to 8 bits) become RGB;
4. an image whose shorter side is below ``min_side`` is refused (:class:`BadImage`);
5. the image is resized so the shorter side is at most ``max_short_side`` and
   the longer at most ``max_long_side`` (aspect kept; JPEG decoding uses PIL's
   draft mode to decode at a reduced scale when the image is much larger);
6. it is encoded as JPEG at ``jpeg_quality``; an RGB JPEG that needed none of
   the above is kept byte for byte (``keep_jpeg``).

Boxes: annotations are taken to be in the frame of the stored pixels (before
the EXIF rotation) unless the annotation file declares the image size and
that size is the upright one (COCO and VG declare ``width``/``height``; a
declared size equal to the upright size means the boxes were drawn upright).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlptune.data.schema import DataError

DEFAULT_MAX_SHORT_SIDE = 600  # the largest shorter side of the paper recipes (SOHO, KD-VLP: 600x1000)
DEFAULT_MAX_LONG_SIDE = 1000
DEFAULT_MIN_SIDE = 32  # smaller images are refused: a 32-stride CNN gets a single cell
DEFAULT_JPEG_QUALITY = 90
EXIF_ORIENTATION_TAG = 0x0112
WHITE = (255, 255, 255)
SIXTEEN_BIT_MAX = 65535
EIGHT_BIT_MAX = 255
DRAFT_MARGIN = 2  # draft decode only when the image is at least this many times the target

# Magic bytes -> PIL format name (the formats the datasets ship in).
MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"WEBP", 8, "WEBP"),  # RIFF....WEBP
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)

# Bad-image reasons (the report counts them by these names).
ZERO_BYTES = "zero_byte_image"
TRUNCATED = "truncated_image"
UNDECODABLE = "undecodable_image"
TOO_SMALL = "image_too_small"

TRUNCATION_WORDS = ("truncated", "broken data stream")  # what PIL's messages say for data cut short

# Fixes (counted, not bad).
FIX_EXIF = "exif_rotated"
FIX_MODE = "mode_converted"
FIX_16BIT = "sixteen_bit"
FIX_RESIZED = "resized"
FIX_FORMAT = "reencoded_from_other_format"
FIX_EXTENSION = "extension_mismatch"

# PIL's transposes of exif_transpose, per orientation.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_SIDES = {5, 6, 7, 8}
EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


class BadImage(DataError):
    """An image that cannot be used; ``reason`` is one of the bad-image reasons above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    """How images are fixed (the ``--max-short-side``, ``--max-long-side``, ``--min-side``, ``--jpeg-quality`` flags)."""

    max_short_side: int = DEFAULT_MAX_SHORT_SIDE
    max_long_side: int = DEFAULT_MAX_LONG_SIDE
    min_side: int = DEFAULT_MIN_SIDE
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    keep_jpeg: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_side <= self.max_short_side <= self.max_long_side:
            raise DataError(
                f"image sizes must satisfy 1 <= min_side ({self.min_side}) <= max_short_side ({self.max_short_side}) <= max_long_side ({self.max_long_side})"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class FixedImage:
    """The stored image and how to move annotations onto it."""

    data: bytes  # JPEG bytes
    width: int
    height: int
    source_format: str
    raw_size: tuple[int, int]  # (w, h) of the stored pixels of the original, before orientation
    orientation: int  # EXIF orientation applied (1: none)
    scale: tuple[float, float]  # (sx, sy): upright original -> stored image
    fixes: tuple[str, ...]


def sniff_format(data: bytes) -> str | None:
    """The image format of ``data`` from its magic bytes (PIL's names), None when unknown."""
    for magic, offset, name in MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def target_size(width: int, height: int, max_short: int, max_long: int) -> tuple[int, int]:
    """(w, h) after shrinking so the shorter side <= max_short and the longer <= max_long (never enlarged)."""
    short, long = min(width, height), max(width, height)
    scale = min(1.0, max_short / short, max_long / long)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image, fixes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image).astype(np.float64)
        top = SIXTEEN_BIT_MAX if mode.startswith("I;16") or arr.max(initial=0) > EIGHT_BIT_MAX else EIGHT_BIT_MAX
        grey = np.clip(np.rint(arr * (EIGHT_BIT_MAX / top)), 0, EIGHT_BIT_MAX).astype(np.uint8)
        fixes.append(FIX_16BIT)
        return Image.fromarray(grey, "L").convert("RGB")
    fixes.append(FIX_MODE)
    if mode == "P" and "transparency" in image.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def fix_image(data: bytes | None, options: ImageOptions, name: str = "") -> FixedImage:
    """The stored form of one image (see the module docstring); :class:`BadImage` when it cannot be used.

    ``name``: the file name the dataset gives it (only to count a misleading extension).
    """
    if not data:
        raise BadImage(ZERO_BYTES, "the file is empty")
    sniffed = sniff_format(data)
    fixes: list[str] = []
    ext = name[name.rfind(".") :].lower() if "." in name else ""
    if sniffed and ext in EXTENSION_FORMATS and EXTENSION_FORMATS[ext] != sniffed:
        fixes.append(FIX_EXTENSION)
    image: Image.Image
    try:
        image = Image.open(io.BytesIO(data), formats=[sniffed] if sniffed else None)
        raw_size = image.size
        source_format = image.format or sniffed or "?"
        orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
        if orientation not in ORIENTATION_TRANSPOSE:
            orientation = 1
        upright = (raw_size[1], raw_size[0]) if orientation in SWAPS_SIDES else raw_size
        want = target_size(*upright, options.max_short_side, options.max_long_side)
        if source_format == "JPEG" and want[0] * DRAFT_MARGIN <= upright[0]:
            draft = (want[1], want[0]) if orientation in SWAPS_SIDES else want
            image.draft("RGB", draft)  # decode at 1/2, 1/4 or 1/8 scale: never below `draft`
        image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        text = str(exc)
        reason = TRUNCATED if any(w in text.lower() for w in TRUNCATION_WORDS) else UNDECODABLE
        raise BadImage(reason, f"{len(data)} bytes ({sniffed or 'unknown format'}): {text}") from None
    if min(upright) < options.min_side:
        raise BadImage(TOO_SMALL, f"{upright[0]}x{upright[1]} pixels, shorter side below --min-side {options.min_side}")
    unchanged = source_format == "JPEG" and image.mode == "RGB" and orientation == 1 and want == upright
    if orientation != 1:
        image = image.transpose(ORIENTATION_TRANSPOSE[orientation])
        fixes.append(FIX_EXIF)
    image = _to_rgb(image, fixes)
    if image.size != want:
        image = image.resize(want, Image.Resampling.BICUBIC, reducing_gap=None)
        fixes.append(FIX_RESIZED)
    if unchanged and options.keep_jpeg:
        out = data
    else:
        if source_format != "JPEG":
            fixes.append(FIX_FORMAT)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
        out = buffer.getvalue()
    scale = (want[0] / upright[0], want[1] / upright[1])
    return FixedImage(out, want[0], want[1], source_format, raw_size, orientation, scale, tuple(fixes))


def _orient_points(xs: np.ndarray, ys: np.ndarray, orientation: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Points of the raw (w x h) frame in the upright frame (what ``exif_transpose`` does to pixels)."""
    if orientation == 2:
        return w - xs, ys
    if orientation == 3:
        return w - xs, h - ys
    if orientation == 4:
        return xs, h - ys
    if orientation == 5:
        return ys, xs
    if orientation == 6:
        return h - ys, xs
    if orientation == 7:
        return h - ys, w - xs
    if orientation == 8:
        return ys, w - xs
    return xs, ys


def move_boxes(boxes: Sequence[Sequence[float]], fixed: FixedImage, declared_size: tuple[int, int] | None = None) -> list[list[float]]:
    """``[x0, y0, x1, y1]`` boxes of the original image, in pixels of the stored image (clipped to it).

    Boxes are rotated with the EXIF orientation unless ``declared_size`` (the
    size the annotation file gives) is the upright size, i.e. the boxes were
    drawn on the upright image already.
    """
    if len(boxes) == 0:
        return []
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w, h = fixed.raw_size
    upright = (h, w) if fixed.orientation in SWAPS_SIDES else (w, h)
    drawn_upright = declared_size is not None and tuple(declared_size) == upright and upright != (w, h)
    if fixed.orientation != 1 and not drawn_upright:
        xs0, ys0 = _orient_points(arr[:, 0], arr[:, 1], fixed.orientation, w, h)
        xs1, ys1 = _orient_points(arr[:, 2], arr[:, 3], fixed.orientation, w, h)
        arr = np.stack([np.minimum(xs0, xs1), np.minimum(ys0, ys1), np.maximum(xs0, xs1), np.maximum(ys0, ys1)], axis=1)
    sx, sy = fixed.scale
    arr = arr * np.asarray([sx, sy, sx, sy])
    arr[:, [0, 2]] = np.clip(arr[:, [0, 2]], 0, fixed.width)
    arr[:, [1, 3]] = np.clip(arr[:, [1, 3]], 0, fixed.height)
    return [[float(v) for v in row] for row in arr.astype(np.float32)]


def xywh_to_xyxy(box: Sequence[float]) -> list[float]:
    """COCO / VG ``[x, y, w, h]`` as ``[x0, y0, x1, y1]``."""
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]
