"""Upstream-format fixtures for the converter tests: real JPEG/PNG files with every awkward case.

``awkward_images(dir)`` writes a dozen files and returns {name: what it is};
the COCO / Karpathy / web fixtures refer to them. Sizes are small so the
tests stay fast; the tests convert with small ``--max-short-side`` /
``--max-long-side`` so resizing is exercised too.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from vlptune.data.convert.images import EXIF_ORIENTATION_TAG

RED_BOX = (10, 20, 40, 35)  # x0, y0, x1, y1 in the raw (stored) pixels of the EXIF-rotated image
ROTATED_RAW_SIZE = (120, 80)  # (w, h) stored; upright it is 80 x 120


def _noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(1, 1, 3))
    arr = np.clip(base + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def rotated_jpeg() -> bytes:
    """A 120x80 JPEG with EXIF orientation 6 (display: rotate 90 clockwise) and a red box at RED_BOX."""
    image = Image.new("RGB", ROTATED_RAW_SIZE, (40, 40, 200))
    image.paste((230, 20, 20), RED_BOX)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    return jpeg_bytes(image, exif=exif.tobytes())


def awkward_images(folder: Path) -> dict[str, str]:
    """Write the fixture images into ``folder``; {file name: kind}."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes | None] = {
        "plain_0.jpg": jpeg_bytes(_noise(96, 64, 0)),
        "plain_1.jpg": jpeg_bytes(_noise(64, 80, 1)),
        "big.jpg": jpeg_bytes(_noise(320, 240, 2)),  # resized to 128x96 by the tests' --max-short-side 96
        "cmyk.jpg": jpeg_bytes(_noise(72, 72, 3).convert("CMYK")),
        "rotated.jpg": rotated_jpeg(),
        "png_named.jpg": png_bytes(_noise(80, 64, 4)),  # PNG bytes behind a .jpg name
        "palette_alpha.png": png_bytes(_noise(64, 64, 5).convert("P", palette=Image.Palette.ADAPTIVE), transparency=0),
        "grey16.png": png_bytes(Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)),  # 16-bit greyscale
        "truncated.jpg": jpeg_bytes(_noise(96, 96, 6))[:400],
        "zero.jpg": b"",
        "tiny.jpg": jpeg_bytes(_noise(16, 16, 7)),  # below --min-side
        # "missing.jpg" is listed by the annotations but never written
    }
    for name, data in files.items():
        (folder / name).write_bytes(data or b"")
    return {name: name.split(".")[0] for name in files}


# The fixture's expected outcome, per file: stored, or the reason it is dropped.
EXPECTED_BAD = {
    "truncated.jpg": "truncated_image",
    "zero.jpg": "zero_byte_image",
    "tiny.jpg": "image_too_small",
    "missing.jpg": "missing_file",
}
GOOD_FILES = ["plain_0.jpg", "plain_1.jpg", "big.jpg", "cmyk.jpg", "rotated.jpg", "png_named.jpg", "palette_alpha.png", "grey16.png"]
ALL_FILES = GOOD_FILES + list(EXPECTED_BAD)


def coco_official(root: Path) -> tuple[list[Path], Path]:
    """captions_train2014.json + captions_val2014.json over the awkward images (images in root/images/{train2014,val2014})."""
    images = root / "images"
    awkward_images(images / "train2014")
    val_names = ["plain_1.jpg", "cmyk.jpg", "zero.jpg"]
    (images / "val2014").mkdir(parents=True, exist_ok=True)
    for name in val_names:
        (images / "train2014" / name).rename(images / "val2014" / name)
    train = [n for n in ALL_FILES if n not in val_names]
    out = []
    for split, names in (("train", train), ("val", val_names)):
        ids = {n: 100 + ALL_FILES.index(n) for n in names}
        images_json = [{"id": ids[n], "file_name": n, "width": 0, "height": 0} for n in names]
        anns = []
        for n in names:
            anns += [
                {"image_id": ids[n], "caption": f"a photo of {n.split('.')[0]} number one"},
                {"image_id": ids[n], "caption": f"another view of {n.split('.')[0]}"},
            ]
        if split == "train":
            anns.append({"image_id": ids["plain_0.jpg"], "caption": "   "})  # whitespace caption
            anns.append({"image_id": ids["plain_0.jpg"], "caption": "un café à Zürich, très ☕ bon"})  # unicode
            anns.append({"image_id": 999, "caption": "a caption of an image nobody lists"})
            images_json.append({"id": ids["plain_0.jpg"], "file_name": "plain_0.jpg", "width": 96, "height": 64})  # duplicate id
        path = root / f"captions_{split}2014.json"
        path.write_text(json.dumps({"images": images_json, "annotations": anns}, ensure_ascii=False))
        out.append(path)
    return out, images


VG_COCO_TEST_ID = 9001  # the COCO id of a VG image that is in COCO's Karpathy test split
VG_NAMES = ["dog", "tree", "dog", "cat"]  # object names cycled over the images; "zebra" once (outside a 3-class vocabulary)


def vg_id(name: str) -> int:
    return 1 + ALL_FILES.index(name)


def visual_genome(root: Path) -> dict[str, Path]:
    """VG's image_data / region_descriptions / objects / attributes over the awkward images, plus a Karpathy COCO file.

    Image ``vg_id(name)`` is the awkward file ``name`` (half in VG_100K, half in VG_100K_2); image 50 is a copy of
    plain_0 whose ``coco_id`` is in COCO test. Each image: two regions, one object (the rotated image's on RED_BOX,
    with the attribute "red"); plus an empty phrase on image 1, a region and an object of the unknown image 777,
    and a "zebra" on image 2.
    """
    folder = root / "awkward"
    awkward_images(folder)
    images_dir = root / "images"
    for d in ("VG_100K", "VG_100K_2"):
        (images_dir / d).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(ALL_FILES):
        if (folder / name).exists():
            (folder / name).rename(images_dir / ("VG_100K" if i % 2 == 0 else "VG_100K_2") / f"{vg_id(name)}.jpg")
    (images_dir / "VG_100K" / "50.jpg").write_bytes((images_dir / "VG_100K" / f"{vg_id('plain_0.jpg')}.jpg").read_bytes())
    ids = [vg_id(n) for n in ALL_FILES] + [50]
    image_data = [{"image_id": i, "width": 0, "height": 0, "coco_id": VG_COCO_TEST_ID if i == 50 else None, "flickr_id": None} for i in ids]
    rotated = vg_id("rotated.jpg")
    image_data[ids.index(rotated)].update(width=ROTATED_RAW_SIZE[0], height=ROTATED_RAW_SIZE[1])
    regions = []
    objects = []
    attributes = []
    red = [RED_BOX[0], RED_BOX[1], RED_BOX[2] - RED_BOX[0], RED_BOX[3] - RED_BOX[1]]
    for k, i in enumerate(ids + [777]):
        box = red if i == rotated else [2, 3, 20, 10]
        regs = [
            {"region_id": 10 * i + r, "image_id": i, "phrase": f"region {r} of image {i}", "x": box[0], "y": box[1], "width": box[2], "height": box[3]}
            for r in range(2)
        ]
        if i == 1:
            regs.append({"region_id": 19, "image_id": 1, "phrase": "  ", "x": 0, "y": 0, "width": 5, "height": 5})
        regions.append({"id": i, "regions": regs})
        objs = [{"object_id": 100 * i, "x": box[0], "y": box[1], "w": box[2], "h": box[3], "names": [VG_NAMES[k % len(VG_NAMES)].upper()]}]
        if i == 2:
            objs.append({"object_id": 100 * i + 1, "x": 1, "y": 1, "w": 4, "h": 4, "names": ["zebra"]})
        objects.append({"image_id": i, "objects": objs})
        attributes.append({"image_id": i, "attributes": [{"object_id": 100 * i, "attributes": ["red"] if i == rotated else ["small", " "]}]})
    paths = {
        "image_data": root / "image_data.json",
        "regions": root / "region_descriptions.json",
        "objects": root / "objects.json",
        "attributes": root / "attributes.json",
    }
    for key, data in (("image_data", image_data), ("regions", regions), ("objects", objects), ("attributes", attributes)):
        paths[key].write_text(json.dumps(data))
    karpathy = [
        {"filepath": "val2014", "filename": "x.jpg", "cocoid": VG_COCO_TEST_ID, "split": "test", "sentences": []},
        {"filepath": "train2014", "filename": "y.jpg", "cocoid": 1234, "split": "train", "sentences": []},
    ]
    paths["karpathy"] = root / "dataset_coco.json"
    paths["karpathy"].write_text(json.dumps({"images": karpathy}))
    paths["images"] = images_dir
    return paths
