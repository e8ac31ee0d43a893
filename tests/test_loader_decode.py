"""The loader's decoding paths give the same batches (issue 17): JPEG draft mode vs a full decode,
the tensor transform (data.decode: gpu's) vs PIL's, one decode per image, and the loader options."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlptune.config import ConfigError, DataConfig, Recipe
from vlptune.data import dataset as dataset_module
from vlptune.data.dataset import build_loader, loader_options
from vlptune.data.gpu_decode import check_gpu_decoding
from vlptune.data.prepare import ensure_data
from vlptune.data.schema import TABLE_IMAGE_TEXT
from vlptune.data.shards import ShardWriter, decode_image_draft, read_manifest, read_table
from vlptune.data.transforms import ImageTransform

WORLD = {"train": 24, "val": 8, "image_size": 64, "seed": 0, "shard_size": 10}  # same world as test_dataset
PHOTO = (400, 300)  # stored JPEG size; the transform below shrinks it to 128x96: draft mode decodes it at 1/2 (200x150)
IMAGES = 8


def recipe_for(root: Path, **data) -> Recipe:
    base = {"root": str(root), "image_size": 96, "max_long_side": 160, "batch_images": 4, "synth": WORLD, "synthesize": False}
    base.update(data)
    return Recipe(data=base, train={"seed": 3})


@pytest.fixture(scope="module")
def jpeg_world(tmp_path_factory) -> Path:
    """The first IMAGES records of the shared synthetic world with smooth photo-like 400x300 JPEGs (boxes scaled, no maps)."""
    world = ensure_data(Recipe(data={"root": str(tmp_path_factory.getbasetemp() / "synth-world"), "image_size": 64, "max_long_side": 128, "synth": WORLD}))
    records = read_table(world, TABLE_IMAGE_TEXT, "train").slice(0, IMAGES).to_pylist()
    rng = np.random.default_rng(0)
    for r in records:
        coarse = rng.integers(0, 256, size=(PHOTO[1] // 16, PHOTO[0] // 16, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(coarse).resize(PHOTO, Image.Resampling.BICUBIC).save(out, format="JPEG", quality=90)
        sx, sy = PHOTO[0] / r["width"], PHOTO[1] / r["height"]
        for o in r["objects"]:
            x0, y0, x1, y1 = o["box"]
            o["box"] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        r.update(image=out.getvalue(), width=PHOTO[0], height=PHOTO[1], segmentation=None)
    root = tmp_path_factory.mktemp("jpeg-world")
    with ShardWriter(root, vocabularies=read_manifest(world)["vocabularies"], created_by="test", shard_size=IMAGES) as w:
        w.add_many(TABLE_IMAGE_TEXT, records)
    return root


def first_batch(recipe: Recipe) -> dict:
    return next(iter(build_loader(recipe, train=True)))


def test_draft_decoding_gives_the_full_decodes_batch(jpeg_world):
    record = read_table(jpeg_world, TABLE_IMAGE_TEXT, "train").slice(0, 1).to_pylist()[0]
    transform = ImageTransform(recipe_for(jpeg_world).data, train=True)
    image, stored = decode_image_draft(record["image"], "r", transform.draft_size)
    assert stored == PHOTO and image.size == (200, 150)  # decoded at 1/2 scale, still above the 128x96 target
    full, drafted = first_batch(recipe_for(jpeg_world, jpeg_draft=False)), first_batch(recipe_for(jpeg_world))
    assert full["images"].shape == drafted["images"].shape == (4, 3, 96, 128)
    diff = (full["images"] - drafted["images"]).abs()
    # measured: mean 0.0125, max 0.105 (normalised units; one grey level is ~0.017): libjpeg's DCT scaling vs a bilinear resize
    assert float(diff.mean()) < 0.03 and float(diff.max()) < 0.3
    for key in ("obj_boxes", "obj_masks", "text_ids", "mlm_ids", "itm_labels", "grid_mask"):
        assert torch.equal(full[key], drafted[key]), key  # the same geometry, captions and randomness


def test_tensor_transform_matches_the_pil_transform(jpeg_world):
    """data.decode: gpu runs the transform on a uint8 tensor; here on CPU from PIL's pixels, against the PIL path."""
    recipe = recipe_for(jpeg_world, jpeg_draft=False, random_resized_crop=True)
    record = read_table(jpeg_world, TABLE_IMAGE_TEXT, "train").slice(0, 1).to_pylist()[0]
    image, _ = decode_image_draft(record["image"], "r")
    boxes = np.asarray([o["box"] for o in record["objects"]], dtype=np.float32).reshape(-1, 4)
    transform = ImageTransform(recipe.data, train=True)
    for seed in range(4):  # crops, flips
        pil = transform(image, boxes, None, ["a cat"], np.random.default_rng(seed))
        tensor = transform(torch.from_numpy(np.array(image)).permute(2, 0, 1), boxes, None, ["a cat"], np.random.default_rng(seed))
        assert pil.crop == tensor.crop and pil.flipped == tensor.flipped
        np.testing.assert_allclose(pil.boxes, tensor.boxes)
        assert pil.image.shape == tensor.image.shape
        diff = (pil.image - tensor.image).abs()
        # measured over these seeds: mean 0.0047-0.0048, max 0.015-0.016 (PIL rounds to uint8 after resizing, the tensor path does not)
        assert float(diff.mean()) < 0.012 and float(diff.max()) < 0.05


def test_each_image_is_decoded_once_per_batch(jpeg_world, monkeypatch):
    calls: list[int] = []
    original = dataset_module.decode_image_draft

    def counted(data, rid, draft=None):
        calls.append(1)
        return original(data, rid, draft)

    monkeypatch.setattr(dataset_module, "decode_image_draft", counted)
    batch = first_batch(recipe_for(jpeg_world, itm_positives=2, itm_negatives=2))
    assert len(batch["captions"]) == 16  # 4 images x (2 positives + 2 negatives)
    assert len(calls) == batch["images"].shape[0] == 4


def test_gpu_decoding_without_torchvision_or_cuda_says_what_is_missing(jpeg_world):
    with pytest.raises(ConfigError, match="data.decode=gpu needs (torchvision|a CUDA device)"):
        check_gpu_decoding(0)
    with pytest.raises(ConfigError, match="data.decode=gpu"):
        build_loader(recipe_for(jpeg_world, decode="gpu"), train=True)


def test_loader_options_pin_and_prefetch_on_cuda_only():
    data = DataConfig(num_workers=2, prefetch_factor=4)
    assert loader_options(data, "cuda")["pin_memory"] and loader_options(data, "cuda")["prefetch_factor"] == 4
    assert not loader_options(data, "cpu")["pin_memory"]
    assert loader_options(DataConfig(pin_memory="always"), "cpu")["pin_memory"]
    assert not loader_options(DataConfig(decode="gpu"), "cuda")["pin_memory"]  # GPU-decoded images are already on the device
    assert "prefetch_factor" not in loader_options(DataConfig(num_workers=0), "cuda")
