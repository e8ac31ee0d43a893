"""Image fixing at conversion (vlptune.data.convert.images): pure functions, no Ray, no files but the fixtures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from convert_fixtures import EXPECTED_BAD, GOOD_FILES, RED_BOX, ROTATED_RAW_SIZE, awkward_images, jpeg_bytes, png_bytes
from vlptune.data.convert.images import (
    FIX_16BIT,
    FIX_EXIF,
    FIX_EXTENSION,
    FIX_MODE,
    FIX_RESIZED,
    BadImage,
    ImageOptions,
    fix_image,
    move_boxes,
    sniff_format,
    target_size,
)
from vlptune.data.convert.tasks import ImageTask, process_task
from vlptune.data.schema import DataError

SMALL = ImageOptions(max_short_side=96, max_long_side=160)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("awkward")
    awkward_images(path)
    return path


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_every_good_file_becomes_an_rgb_jpeg_within_the_size_limits(folder):
    for name in GOOD_FILES:
        fixed = fix_image((folder / name).read_bytes(), SMALL, name)
        image = _decode(fixed.data)
        assert image.format == "JPEG" and image.mode == "RGB", name
        assert image.size == (fixed.width, fixed.height), name
        assert min(image.size) <= SMALL.max_short_side and max(image.size) <= SMALL.max_long_side, name


@pytest.mark.parametrize("name", sorted(set(EXPECTED_BAD) - {"missing.jpg"}))
def test_bad_files_are_refused_with_their_reason(folder, name):
    with pytest.raises(BadImage) as info:
        fix_image((folder / name).read_bytes(), SMALL, name)
    assert info.value.reason == EXPECTED_BAD[name]


@pytest.mark.parametrize("data", [b"<html>404 Not Found</html>", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_bytes_no_decoder_reads_are_undecodable(data):  # a web server's error page saved as .jpg; a PNG header with garbage
    with pytest.raises(BadImage) as info:
        fix_image(data, SMALL, "x.jpg")
    assert info.value.reason == "undecodable_image"


def test_the_fixes_are_named(folder):
    def fixes(name):
        return set(fix_image((folder / name).read_bytes(), SMALL, name).fixes)

    assert fixes("plain_0.jpg") == set()
    assert fixes("big.jpg") == {FIX_RESIZED}
    assert FIX_MODE in fixes("cmyk.jpg")
    assert FIX_EXIF in fixes("rotated.jpg")
    assert FIX_EXTENSION in fixes("png_named.jpg")
    assert FIX_MODE in fixes("palette_alpha.png")
    assert FIX_16BIT in fixes("grey16.png")


def test_an_rgb_jpeg_that_needs_nothing_is_kept_byte_for_byte_unless_reencoding_is_asked(folder):
    data = (folder / "plain_0.jpg").read_bytes()
    assert fix_image(data, SMALL).data == data
    again = fix_image(data, ImageOptions(max_short_side=96, max_long_side=160, keep_jpeg=False, jpeg_quality=50))
    assert again.data != data and _decode(again.data).size == (96, 64)


def test_the_format_is_sniffed_from_the_bytes_not_the_name(folder):
    assert sniff_format((folder / "png_named.jpg").read_bytes()) == "PNG"
    assert sniff_format((folder / "plain_0.jpg").read_bytes()) == "JPEG"
    assert sniff_format(b"not an image") is None
    assert fix_image((folder / "png_named.jpg").read_bytes(), SMALL, "png_named.jpg").source_format == "PNG"


def test_resizing_caps_the_shorter_and_the_longer_side():
    assert target_size(320, 240, 96, 160) == (128, 96)
    assert target_size(2000, 500, 600, 1000) == (1000, 250)  # the long side binds
    assert target_size(64, 80, 96, 160) == (64, 80)  # never enlarged
    fixed = fix_image(jpeg_bytes(Image.new("RGB", (4000, 3000), (9, 99, 199))), ImageOptions())
    assert (fixed.width, fixed.height) == (800, 600)  # the paper size, through PIL's draft decode
    assert np.abs(np.asarray(_decode(fixed.data), dtype=int) - (9, 99, 199)).max() <= 6


def test_alpha_is_composited_on_white_and_16_bit_is_scaled_to_8_bits():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    out = np.asarray(_decode(fix_image(png_bytes(rgba), SMALL).data), dtype=int)
    assert (np.abs(out[20, 35] - 255) <= 8).all()  # transparent -> white, not red
    assert out[20, 5, 2] > 200 and out[20, 5, 0] < 60  # opaque blue stays blue
    grey16 = Image.fromarray(np.full((40, 40), 65535 // 2, dtype=np.uint16))
    value = np.asarray(_decode(fix_image(png_bytes(grey16), SMALL).data), dtype=int)
    assert abs(value.mean() - 127.5) < 3


def test_the_boxes_of_an_exif_rotated_jpeg_land_on_the_object(folder):
    fixed = fix_image((folder / "rotated.jpg").read_bytes(), SMALL, "rotated.jpg")
    assert (fixed.width, fixed.height) == (ROTATED_RAW_SIZE[1], ROTATED_RAW_SIZE[0])  # upright: 80 x 120
    (box,) = move_boxes([list(RED_BOX)], fixed)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    pixels = np.asarray(_decode(fixed.data), dtype=int)
    inside = pixels[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]
    assert inside.size and (inside[..., 0] > 180).all() and (inside[..., 2] < 80).all()  # red where the box says
    assert pixels[min(y1 + 4, fixed.height - 1), x0 + 2, 2] > 150  # blue just outside
    # annotations that declare the upright size were drawn upright: only scaled
    (same,) = move_boxes([list(RED_BOX)], fixed, declared_size=(ROTATED_RAW_SIZE[1], ROTATED_RAW_SIZE[0]))
    assert same == [float(v) for v in RED_BOX]


def test_boxes_are_scaled_with_the_image_and_clipped(folder):
    fixed = fix_image((folder / "big.jpg").read_bytes(), SMALL)  # 320x240 -> 128x96
    assert move_boxes([[32, 24, 320, 300]], fixed) == [[12.800000190734863, 9.600000381469727, 128.0, 96.0]]


def test_process_task_reports_a_missing_file_and_moves_objects(folder):
    row = process_task(ImageTask("x", "train", {"path": str(folder / "nope.jpg")}), SMALL)
    assert not row["ok"] and '"missing_file"' in row["meta"]
    task = ImageTask(
        "y",
        "train",
        {"path": str(folder / "big.jpg")},
        objects=[{"box": [0, 0, 160, 120], "label": 0, "name": "a", "attributes": []}, {"box": [5, 5, 5, 9], "label": 0, "name": "flat", "attributes": []}],
    )
    row = process_task(task, SMALL)
    assert row["ok"] and (row["width"], row["height"]) == (128, 96)
    assert '"bad_boxes": 1' in row["meta"] and "[0.0, 0.0, 64.0, 48.0]" in row["meta"]


def test_inconsistent_options_are_refused():
    with pytest.raises(DataError, match="max_short_side"):
        ImageOptions(max_short_side=1000, max_long_side=600)
