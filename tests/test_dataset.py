"""The shard dataset: DDP sharding, corrupt records, transforms, eval helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlptune.config import DataConfig, Recipe
from vlptune.data.dataset import (
    ShardDataset,
    build_loader,
    collate_images,
    load_retrieval_set,
    rank_positions,
)
from vlptune.data.prepare import ensure_data
from vlptune.data.schema import TABLE_IMAGE_TEXT, DataError
from vlptune.data.shards import ShardWriter, read_manifest, read_table
from vlptune.data.text import TokenizerError, load_tokenizer, tokenize_texts
from vlptune.data.transforms import (
    ImageTransform,
    crop_boxes,
    hflip_boxes,
    mentions_left_right,
    resized_hw,
)

WORLD = {"train": 24, "val": 8, "image_size": 64, "seed": 0, "shard_size": 10}


def recipe_for(root: Path, **data) -> Recipe:
    base = {"root": str(root), "image_size": 64, "max_long_side": 128, "batch_images": 4, "synth": WORLD}
    base.update(data)
    return Recipe(data=base, train={"seed": 3})


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small synthetic world, generated once per session (shared with test_collate)."""
    root = tmp_path_factory.getbasetemp() / "synth-world"
    return ensure_data(recipe_for(root))


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("minilm")


# ------------------------------------------------------------------ sharding


@pytest.mark.parametrize("n,world_size", [(24, 2), (23, 2), (10, 3), (2, 4)])
def test_rank_positions_equal_sizes_without_overlap(n, world_size):
    for train in (True, False):
        parts = [rank_positions(n, r, world_size, seed=5, epoch=1, shuffle=train, drop_last=train) for r in range(world_size)]
        assert len({len(p) for p in parts}) == 1, "every rank must get the same number of samples"
        flat = np.concatenate(parts)
        if train and n >= world_size:
            assert len(set(flat.tolist())) == len(flat), "training ranks overlap"
            assert len(flat) == n - n % world_size
        else:  # evaluation pads, so every record is seen
            assert set(flat.tolist()) == set(range(n))
            assert len(flat) - n < world_size


def test_rank_positions_shuffle_is_per_epoch_and_deterministic():
    a0 = rank_positions(100, 0, 1, seed=7, epoch=0, shuffle=True, drop_last=True)
    assert np.array_equal(a0, rank_positions(100, 0, 1, seed=7, epoch=0, shuffle=True, drop_last=True))
    assert not np.array_equal(a0, rank_positions(100, 0, 1, seed=7, epoch=1, shuffle=True, drop_last=True))
    assert sorted(a0.tolist()) == list(range(100))
    with pytest.raises(ValueError):
        rank_positions(10, 2, 2, seed=0, epoch=0, shuffle=False, drop_last=False)


def test_two_ranks_read_disjoint_halves_of_the_split(world, tokenizer):
    recipe = recipe_for(world)
    all_ids = set(read_table(world, TABLE_IMAGE_TEXT, "train").column("image_id").to_pylist())
    assert len(all_ids) == WORLD["train"]
    ranks = [ShardDataset(recipe, "train", rank=r, world_size=2, train=True, epoch=0, root=world) for r in range(2)]
    ids = [ds.image_ids for ds in ranks]
    assert len(ids[0]) == len(ids[1]) == WORLD["train"] // 2
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) == all_ids
    # and the rows they hold are those records, in the epoch's order
    assert [ranks[0][i]["image_id"] for i in range(3)] == ids[0][:3]
    # the loaders have the same number of steps
    loaders = [build_loader(recipe, "train", rank=r, world_size=2, tokenizer=tokenizer) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (WORLD["train"] // 2) // recipe.data.batch_images
    seen = [{i for b in loader for i in b["image_ids"]} for loader in loaders]
    assert not seen[0] & seen[1]
    # five ranks: 24 is not divisible; still equal and disjoint
    five = [ShardDataset(recipe, "train", rank=r, world_size=5, train=True, epoch=2, root=world).image_ids for r in range(5)]
    assert {len(x) for x in five} == {WORLD["train"] // 5}
    assert len(set().union(*map(set, five))) == 5 * (WORLD["train"] // 5)


def test_epochs_reshuffle_and_eval_keeps_stored_order(world):
    recipe = recipe_for(world)
    ds = ShardDataset(recipe, "train", train=True, epoch=0, root=world)
    first = list(ds.image_ids)
    assert ShardDataset(recipe, "train", train=True, epoch=0, root=world).image_ids == first
    ds.set_epoch(1)
    assert ds.image_ids != first and sorted(ds.image_ids) == sorted(first)
    ev = ShardDataset(recipe, "val", train=False, root=world)
    stored = read_table(world, TABLE_IMAGE_TEXT, "val").column("image_id").to_pylist()
    assert ev.image_ids == stored


# ------------------------------------------------------------------ corrupt records


def write_corrupt_copy(world: Path, out: Path, bad: dict[int, str], n: int = 12) -> list[str]:
    """Copy the first n train records into a new dataset, breaking some; ids of the broken ones."""
    manifest = read_manifest(world)
    records = read_table(world, TABLE_IMAGE_TEXT, "train").slice(0, n).to_pylist()
    broken = []
    for i, what in bad.items():
        if what == "image":
            records[i]["image"] = b"\x89PNG garbage, not an image"
        elif what == "segmentation":
            records[i]["segmentation"] = b"truncated"
        elif what == "label":
            records[i]["objects"][0]["label"] = 999
        broken.append(records[i]["image_id"])
    with ShardWriter(out, vocabularies=manifest["vocabularies"], created_by="test", shard_size=5) as w:
        w.add_many(TABLE_IMAGE_TEXT, records)
    return broken


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_records_are_skipped_and_counted(world, tokenizer, tmp_path, num_workers):
    root = tmp_path / "corrupt"
    broken = write_corrupt_copy(world, root, {3: "image", 4: "segmentation", 9: "label"})
    recipe = recipe_for(root, num_workers=num_workers, synthesize=False)
    loader = build_loader(recipe, "train", train=True, tokenizer=tokenizer)
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    assert all(len(b["image_ids"]) == 4 for b in batches), "corrupt records are replaced, batches stay full"
    assert batches[-1]["skipped"] == 3 == loader.skipped
    assert [b["skipped"] for b in batches] == sorted(b["skipped"] for b in batches), "a running count"
    used = {i for b in batches for i in b["image_ids"]}
    assert not used & set(broken)


def test_split_where_everything_is_corrupt_fails_clearly(world, tokenizer, tmp_path):
    root = tmp_path / "all-bad"
    write_corrupt_copy(world, root, dict.fromkeys(range(4), "image"), n=4)
    recipe = recipe_for(root, synthesize=False)
    ds = ShardDataset(recipe, "train", root=root)
    marker = ds[0]
    assert marker["corrupt"] is True and ds.skipped == 4
    loader = build_loader(recipe, "train", tokenizer=tokenizer)
    with pytest.raises(DataError, match="corrupt"):
        next(iter(loader))


def test_missing_data_without_synthesis_names_the_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest"):
        build_loader(recipe_for(tmp_path / "nothing", synthesize=False), "train")


# ------------------------------------------------------------------ transforms


def test_left_right_is_a_word_match():
    assert mentions_left_right(["a red circle on the LEFT"])
    assert mentions_left_right(["the rightmost star"])
    assert mentions_left_right(["a left-hand cross"])
    assert mentions_left_right(["a star", "a square to the right of a disc"])
    assert not mentions_left_right(["a bright star", "copyright 2021", "alright then", "a leftover block"])
    assert not mentions_left_right([])


def test_resize_modes():
    d = DataConfig(image_size=600, max_long_side=1000)
    assert resized_hw(300, 400, d) == (600, 800)
    assert resized_hw(100, 400, d) == (250, 1000)  # long side capped
    assert resized_hw(400, 100, d) == (1000, 250)
    assert resized_hw(123, 77, DataConfig(image_size=96, resize_mode="square")) == (96, 96)


def test_box_helpers():
    boxes = np.array([[10, 10, 30, 20], [0, 0, 5, 5], [45, 5, 80, 25]], dtype=np.float32)
    out, keep = crop_boxes(boxes, top=0, left=8, height=30, width=50)
    assert keep.tolist() == [0, 2]  # the second box lies outside the crop
    np.testing.assert_allclose(out, [[2, 10, 22, 20], [37, 5, 50, 25]])
    np.testing.assert_allclose(hflip_boxes(boxes[:1], 100), [[70, 10, 90, 20]])


def scene(width=120, height=80):
    """An image with two coloured rectangles, boxes and a segmentation map."""
    img = np.full((height, width, 3), 128, dtype=np.uint8)
    seg = np.zeros((height, width), dtype=np.uint8)
    boxes = np.array([[10, 20, 40, 60], [70, 5, 110, 30]], dtype=np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        img[y0:y1, x0:x1] = (255, 0, 0) if k == 0 else (0, 0, 255)
        seg[y0:y1, x0:x1] = k + 1
    return Image.fromarray(img), boxes, seg


def region_of(seg: np.ndarray, cls: int) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(seg == cls)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def colour_box(image: torch.Tensor, data: DataConfig, channel: int) -> tuple[float, float, float, float]:
    """Bounding box of the pixels whose ``channel`` dominates (de-normalised)."""
    mean = torch.tensor(data.mean)[:, None, None]
    std = torch.tensor(data.std)[:, None, None]
    rgb = (image * std + mean).numpy()
    others = [c for c in range(3) if c != channel]
    mask = (rgb[channel] > 0.7) & (rgb[others[0]] < 0.3) & (rgb[others[1]] < 0.3)
    return region_of(mask.astype(np.uint8), 1)


@pytest.mark.parametrize("crop", [False, True])
def test_geometry_follows_the_pixels(crop):
    data = DataConfig(image_size=40, max_long_side=200, hflip_prob=0.5, random_resized_crop=crop, crop_scale_min=0.6)
    tf = ImageTransform(data, train=True)
    flips = 0
    for seed in range(12):
        image, boxes, seg = scene()
        t = tf(image, boxes, seg, ["two shapes"], np.random.default_rng(seed))
        flips += t.flipped
        assert t.seg.shape == tuple(t.image.shape[1:])
        assert min(t.image.shape[1:]) == 40 or crop
        for box, k in zip(t.boxes, t.keep):
            # the box, the map and the pixels agree (within resampling error)
            np.testing.assert_allclose(box, region_of(t.seg, k + 1), atol=1.5)
            np.testing.assert_allclose(box, colour_box(t.image, data, channel=0 if k == 0 else 2), atol=1.5)
        if not crop:
            assert t.keep.tolist() == [0, 1]
            # left/right order of the two objects reveals the flip
            assert (t.boxes[0, 0] > t.boxes[1, 0]) == t.flipped
    assert 0 < flips < 12


def test_flip_is_never_applied_to_left_right_captions():
    data = DataConfig(image_size=40, max_long_side=200, hflip_prob=1.0)
    tf = ImageTransform(data, train=True)
    for seed in range(5):
        image, boxes, seg = scene()
        kept = tf(image, boxes, seg, ["a blue block", "a red square to the left of a blue block"], np.random.default_rng(seed))
        assert not kept.flipped
        assert kept.boxes[0, 0] < kept.boxes[1, 0]
        flipped = tf(image, boxes, seg, ["a blue block", "a bright red square"], np.random.default_rng(seed))
        assert flipped.flipped
        w = flipped.image.shape[2]
        np.testing.assert_allclose(flipped.boxes, hflip_boxes(kept.boxes, w), atol=1e-4)
        assert torch.equal(flipped.image, kept.image.flip(-1))
        assert np.array_equal(flipped.seg, kept.seg[:, ::-1])
    ev = ImageTransform(data, train=False)(image, boxes, seg, ["a star"], np.random.default_rng(0))
    assert not ev.flipped, "evaluation never flips"


def test_train_samples_never_flip_left_right_records(world):
    recipe = recipe_for(world, hflip_prob=1.0)
    ds = ShardDataset(recipe, "train", root=world)
    flips = [(ds[i]["flipped"], mentions_left_right(ds[i]["captions"])) for i in range(len(ds))]
    assert not any(f and lr for f, lr in flips)
    assert any(f for f, _ in flips) and any(lr for _, lr in flips)


# ------------------------------------------------------------------ evaluation helpers


def test_retrieval_set(world, tokenizer):
    recipe = recipe_for(world, image_size=48)
    rs = load_retrieval_set(recipe, "val", max_images=5, captions_per_image=2)
    records = read_table(world, TABLE_IMAGE_TEXT, "val").slice(0, 5).to_pylist()
    assert rs.image_ids == [r["image_id"] for r in records]
    assert rs.captions == [c for r in records for c in r["captions"][:2]]
    assert rs.caption_image.tolist() == [i for i in range(5) for _ in range(2)]
    assert rs.image_captions[1] == [2, 3]
    for item, r in zip(rs.images, records):
        assert min(item["image"].shape[1:]) == 48
        assert item["image"].shape[1:] == resized_hw(r["height"], r["width"], recipe.data)
    again = load_retrieval_set(recipe, "val", max_images=5, captions_per_image=2)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rs.images, again.images)), "no augmentation"
    images, pixel_mask, grid_mask = collate_images(rs.images[:3])
    assert images.dtype == torch.float32 and images.shape[:2] == (3, 3)
    for b, item in enumerate(rs.images[:3]):
        h, w = item["image"].shape[1:]
        assert pixel_mask[b].sum() == h * w and pixel_mask[b, :h, :w].all()
        assert torch.equal(images[b, :, :h, :w], item["image"])
    assert grid_mask.dtype == torch.bool and grid_mask.shape[0] == 3
    ids, mask = tokenize_texts(tokenizer, rs.captions, 12)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == 10
    assert ids.shape[1] <= 12 and (ids[:, 0] == tokenizer.cls_token_id).all()
    with pytest.raises(ValueError, match="stride"):
        collate_images([item["image"] for item in rs.images[:2]])


def test_tokenizer_specs(tmp_path):
    tok = load_tokenizer("minilm")
    assert tok.is_fast and tok.mask_token_id is not None
    with pytest.raises(TokenizerError, match="no-such-tokenizer-dir"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer-dir"))
    tok.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(str(tmp_path / "tok")).get_vocab() == tok.get_vocab()


def test_batches_do_not_depend_on_the_number_of_workers(world, tokenizer):
    runs = []
    for workers in (0, 2):
        loader = build_loader(recipe_for(world, num_workers=workers, random_resized_crop=True), "train", epoch=1, tokenizer=tokenizer)
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == WORLD["train"] // 4
    for a, b in zip(*runs):
        for key, value in a.items():
            assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key


def test_a_world_generated_with_other_synth_settings_is_refused(world):
    from vlptune.data.schema import DataError

    assert ensure_data(recipe_for(world)) == world  # same settings: reused as is
    other = recipe_for(world, synth={**WORLD, "caption_style": "descriptive", "train": WORLD["train"] + 1})
    with pytest.raises(DataError) as err:
        ensure_data(other)
    message = str(err.value)
    assert "manifest.json" in message and "data.synth.caption_style='descriptive' but the world has 'varied'" in message
    assert f"data.synth.train={WORLD['train'] + 1}" in message and "delete" in message
    assert ensure_data(recipe_for(world, synth={**WORLD, "caption_style": "descriptive"}, synthesize=False)) == world  # no synthesis: no check
