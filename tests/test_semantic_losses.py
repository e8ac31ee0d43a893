"""Semantic visual losses: SSUL (masked patch colour), SEGL (per-cell segmentation), SPL (set prediction)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import WORLD_SIZE, build_with_data, similarity_world, small_recipe
from vlptune.config import ConfigError
from vlptune.config.objectives import patch_geometry
from vlptune.data.collate import SEG_IGNORE, SOHOCollate, seg_to_grid
from vlptune.data.dataset import ShardDataset, build_loader, decode_record
from vlptune.data.shards import read_manifest, read_shard
from vlptune.data.synth import make_world
from vlptune.data.text import load_tokenizer
from vlptune.data.transforms import ImageTransform
from vlptune.objectives.base import StepContext
from vlptune.objectives.ssul import (
    cells_to_patches,
    choose_patches,
    mask_pixels,
    patch_means,
    pool_cells,
)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return similarity_world(tmp_path_factory)


def recipe_for(root, objectives, pool=1, size=WORLD_SIZE, **data):
    return small_recipe("semantic-test", root, objectives, pool=pool, size=size, **data)


ALL = {"ssul": {"weight": 1.0}, "segl": {"weight": 1.0}, "spl": {"weight": 1.0}}


@pytest.fixture(scope="module")
def recipe(world):
    return recipe_for(world, ALL)


@pytest.fixture(scope="module")
def pretrainer(recipe):
    torch.manual_seed(0)
    return build_with_data(recipe)


@pytest.fixture(scope="module")
def batch(recipe):
    return next(iter(build_loader(recipe, "train")))


# --------------------------------------------------------------------------- SSUL geometry


def test_patch_geometry_nests_patches_and_cells():
    assert patch_geometry(32, 32) == (1, 1)
    assert patch_geometry(32, 64) == (2, 1)  # pool 2: a cell holds 2x2 patches
    assert patch_geometry(64, 32) == (1, 2)  # a patch covers 2x2 cells
    with pytest.raises(ConfigError, match=r"objectives\.ssul\.patch_size=48 .*model\.backbone\.pool"):
        patch_geometry(48, 32)


def test_patch_means_average_real_pixels_only():
    images = torch.zeros(1, 3, 4, 6)
    images[0, 0, :, :2] = 1.0
    images[0, 1, :2, 2:4] = 4.0
    pixel_mask = torch.ones(1, 4, 6, dtype=torch.bool)
    pixel_mask[0, :, 5:] = False  # last column is padding
    images[0, :, :, 5:] = 100.0  # never counted
    means, valid = patch_means(images, pixel_mask, 2)
    assert means.shape == (1, 2, 3, 3) and valid.all()
    torch.testing.assert_close(means[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(means[0, 0, 1], torch.tensor([0.0, 4.0, 0.0]))
    torch.testing.assert_close(means[0, 1, 1], torch.zeros(3))
    torch.testing.assert_close(means[0, 0, 2], torch.zeros(3))  # half padding: mean of the real column
    pixel_mask[0, :, 4:] = False
    _, valid = patch_means(images, pixel_mask, 2)
    assert valid[0, :, 2].tolist() == [False, False]


def test_choose_patches_masks_the_ratio_of_real_patches():
    valid = torch.ones(3, 4, 5, dtype=torch.bool)
    valid[1, :, 3:] = False  # 12 real patches
    valid[2] = False
    valid[2, 0, 0] = True  # one real patch: still one masked
    g = torch.Generator().manual_seed(0)
    masked = choose_patches(valid, 0.15, g)
    assert masked.sum((1, 2)).tolist() == [round(0.15 * 20), round(0.15 * 12), 1]
    assert not (masked & ~valid).any()
    again = choose_patches(valid, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)


def test_mask_pixels_and_cell_patch_mappings():
    images = torch.randn(2, 3, 5, 7)
    patches = torch.zeros(2, 3, 4, dtype=torch.bool)
    patches[0, 1, 2] = True
    out = mask_pixels(images, patches, 2)
    assert (out[0, :, 2:4, 4:6] == 0).all()
    keep = torch.ones(2, 5, 7, dtype=torch.bool)
    keep[0, 2:4, 4:6] = False
    assert torch.equal(out.permute(1, 0, 2, 3)[:, keep], images.permute(1, 0, 2, 3)[:, keep])
    # cells_to_patches: cell (i, j), sub-patch (a, b) -> patch (2i + a, 2j + b)
    gh, gw, sub = 2, 3, 2
    values = torch.arange(gh * gw * sub * sub * 3, dtype=torch.float32).view(1, gh * gw, sub * sub * 3)
    patches = cells_to_patches(values, gh, gw, sub)
    assert patches.shape == (1, 4, 6, 3)
    for i, j, a, b in [(0, 0, 0, 0), (1, 2, 1, 0), (0, 1, 1, 1)]:
        torch.testing.assert_close(patches[0, 2 * i + a, 2 * j + b], values[0, i * gw + j].view(sub, sub, 3)[a, b])
    # pool_cells: mean of the real cells of each 2x2 block (ceil mode)
    states = torch.arange(3 * 3, dtype=torch.float32).view(1, 9, 1)
    valid = torch.ones(1, 9, dtype=torch.bool)
    valid[0, 4] = False
    pooled = pool_cells(states, valid, 3, 3, 2)
    assert pooled.shape == (1, 2, 2, 1)
    assert float(pooled[0, 0, 0, 0]) == pytest.approx((0 + 1 + 3) / 3)
    assert float(pooled[0, 1, 1, 0]) == pytest.approx(8.0)


# --------------------------------------------------------------------------- SSUL forward


def test_ssul_runs_the_masked_images_without_moving_the_dictionary(pretrainer, batch):
    model = pretrainer.model
    ssul = pretrainer.objectives["ssul"]
    ctx = StepContext(model, batch, torch.Generator().manual_seed(2))
    _ = ctx.images  # the clean pass (updates the VD in train mode)
    codes = model.vd.codes.clone()
    calls = []
    original = model.encode_images

    def spy(images, pixel_mask=None):
        calls.append(images.detach().clone())
        return original(images, pixel_mask)

    model.encode_images = spy
    try:
        out = ssul(batch, ctx)
    finally:
        del model.encode_images
    assert torch.equal(model.vd.codes, codes) and model.vd.training
    assert len(calls) == 1
    masked = calls[0]
    changed = (masked != batch["images"]).any(1)  # pixels the mask touched
    _, valid = patch_means(batch["images"], batch["pixel_mask"], 32)
    patches = choose_patches(valid, 0.15, torch.Generator().manual_seed(2))
    expected = mask_pixels(batch["images"], patches, 32)
    assert torch.equal(masked, expected)
    assert changed.any()
    assert set(out.metrics) == {"ssul_loss", "ssul_baseline", "ssul_r2"}
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.backbone.resnet.embedder.embedder.convolution.weight.grad is not None  # through the masked pass
    pretrainer.zero_grad()


@pytest.mark.parametrize("pool, patch, source", [(2, 32, "fusion"), (1, 64, "grid")])
def test_ssul_other_geometries(world, pool, patch, source):
    recipe = recipe_for(world, {"ssul": {"weight": 1.0, "patch_size": patch, "source": source}}, pool=pool, size=128)
    torch.manual_seed(0)
    pt = build_with_data(recipe)
    b = next(iter(build_loader(recipe, "train")))
    out = pt.objectives["ssul"](b, StepContext(pt.model, b, torch.Generator().manual_seed(0)))
    assert torch.isfinite(out.loss)
    head_out = pt.objectives["ssul"].head[-1].out_features
    assert head_out == (12 if pool == 2 else 3)


def test_ssul_refuses_patches_that_do_not_nest(world):
    with pytest.raises(ConfigError, match="objectives.ssul.patch_size=48"):
        build_with_data(recipe_for(world, {"ssul": {"weight": 1.0, "patch_size": 48}}))


# --------------------------------------------------------------------------- SEGL / SPL forward


def test_segl_targets_and_metrics(pretrainer, batch):
    segl = pretrainer.objectives["segl"]
    assert segl.num_classes == 9  # background + 8 shapes
    with torch.no_grad():
        out = segl(batch, StepContext(pretrainer.model, batch))
    m = out.metrics
    assert torch.isfinite(out.loss)
    assert 0 < float(m["segl_chance"]) <= 1 and 0 < m["segl_class_chance"] <= 1
    unlabelled = dict(batch, seg=torch.full_like(batch["seg"], SEG_IGNORE))
    with torch.no_grad():
        skipped = segl(unlabelled, StepContext(pretrainer.model, unlabelled))
    assert skipped.metrics == {"segl_skipped": 1.0}
    bad = dict(batch, seg=batch["seg"].masked_fill(batch["seg"] == 0, 40))
    with pytest.raises(ValueError, match="batch key 'seg' holds class 40"):
        segl(bad, StepContext(pretrainer.model, bad))


def test_segl_grid_source_reads_one_row_per_image(world, batch):
    recipe = recipe_for(world, {"segl": {"weight": 1.0, "source": "grid"}})
    torch.manual_seed(0)
    pt = build_with_data(recipe)
    seen = []
    head = pt.objectives["segl"].head
    handle = head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    with torch.no_grad():
        pt.objectives["segl"](batch, StepContext(pt.model, batch))
    handle.remove()
    labelled = ((batch["seg"] != SEG_IGNORE) & batch["grid_mask"]).sum()
    assert seen == [int(labelled)]  # every labelled cell of every image, once


def test_spl_matches_every_object_once(pretrainer, batch):
    spl = pretrainer.objectives["spl"]
    assert spl.queries.shape[0] == 36
    captured = {}
    from vlptune.objectives import spl as spl_module

    original = spl_module.match_targets

    def spy(probs, labels, no_object):
        captured["out"] = original(probs, labels, no_object)
        captured["labels"] = labels
        return captured["out"]

    spl_module.match_targets = spy
    try:
        with torch.no_grad():
            out = spl(batch, StepContext(pretrainer.model, batch))
    finally:
        spl_module.match_targets = original
    targets, matched = captured["out"]
    labels = captured["labels"]
    for r in range(labels.shape[0]):
        real = labels[r][labels[r] >= 0]
        assert int(matched[r].sum()) == real.numel()
        assert sorted(targets[r][matched[r]].tolist()) == sorted(real.tolist())
        assert (targets[r][~matched[r]] == spl.no_object).all()
    assert torch.isfinite(out.loss)
    assert {"spl_loss", "spl_acc", "spl_chance", "spl_noobj_acc"} <= set(out.metrics)


def test_spl_refuses_heads_that_do_not_divide_the_width(world):
    with pytest.raises(ConfigError, match=r"objectives\.spl\.heads=5 does not divide the hidden size 384"):
        build_with_data(recipe_for(world, {"spl": {"weight": 1.0, "heads": 5}}))


# --------------------------------------------------------------------------- flip composes


def test_description_aware_flip_carries_segmentation_and_boxes(world, recipe):
    """A flipped sample's seg grid, object masks and SSUL patch colours are the mirror of the unflipped ones."""
    vocab = ShardDataset(recipe, "train").vocab
    flip_data = recipe.data.model_copy(update={"hflip_prob": 1.0})
    no_flip = recipe.data.model_copy(update={"hflip_prob": 0.0})
    for row in read_shard(next((world / "image_text").glob("train-*.parquet")), "image_text").to_pylist():
        if row["width"] != WORLD_SIZE or row["height"] != WORLD_SIZE or len(row["objects"]) < 2:
            continue
        plain_row = dict(row, captions=["a picture of shapes"], phrases=[[]], phrase_label_sim=[[]])
        straight = decode_record(plain_row, ImageTransform(no_flip, True), vocab, 8, 0)
        if (seg_to_grid(straight["seg"], 3, 3, 32, WORLD_SIZE, WORLD_SIZE) > 0).any():
            break  # a square image whose objects win some cells
    flipped = decode_record(plain_row, ImageTransform(flip_data, True), vocab, 8, 0)
    assert flipped["flipped"] and not straight["flipped"]
    torch.testing.assert_close(flipped["image"], straight["image"].flip(-1))
    np.testing.assert_array_equal(flipped["seg"], straight["seg"][:, ::-1])
    # a caption that says left or right is never flipped
    sided = decode_record(dict(plain_row, captions=["a star on the left"]), ImageTransform(flip_data, True), vocab, 8, 0)
    assert not sided["flipped"]

    collate = SOHOCollate(
        recipe.model_copy(update={"data": recipe.data.model_copy(update={"itm_negatives": 0})}), load_tokenizer("minilm"), manifest=read_manifest(world)
    )
    a, b = collate([flipped]), collate([straight])
    assert torch.equal(a["seg"], b["seg"].flip(-1))  # 96 px = 3 whole cells: the grid mirrors exactly
    assert torch.equal(a["obj_masks"], b["obj_masks"].flip(-1))
    assert torch.equal(a["obj_labels"], b["obj_labels"])
    torch.testing.assert_close(a["obj_boxes"][..., 0], 1.0 - b["obj_boxes"][..., 0])
    fg = a["seg"] != 0
    assert fg.any()  # objects do show up in the cells' majority classes
    for o in range(a["obj_labels"].shape[1]):  # a cell labelled with a class lies inside a box of that class
        cls = int(a["obj_labels"][0, o]) + 1
        cells = a["seg"][0] == cls
        boxes = a["obj_masks"][0][a["obj_labels"][0] + 1 == cls].any(0)
        assert not (cells & ~boxes).any()
    ma, _ = patch_means(a["images"], a["pixel_mask"], 32)
    mb, _ = patch_means(b["images"], b["pixel_mask"], 32)
    torch.testing.assert_close(ma, mb.flip(2))  # SSUL targets flip with the image


# --------------------------------------------------------------------------- a short run
# (train / evaluate / quarter_means come from test_kdvlp, on sys.path as pytest's rootdir-relative module)


def test_semantic_losses_fall_in_a_short_run(world):
    from test_kdvlp import quarter_means, train

    recipe = recipe_for(world, ALL, itm_negatives=0)
    torch.manual_seed(0)
    history = train(build_with_data(recipe), recipe, steps=24)
    for key in ("ssul_loss", "segl_loss", "spl_loss"):
        first, last = quarter_means(history[key])
        assert last < first, (key, first, last)


@pytest.fixture(scope="module")
def world160(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("semantic-160")
    make_world(root, train=64, val=8, image_size=160, seed=3)
    return root


@pytest.mark.slow
def test_ssul_and_spl_learn_above_chance(world160):
    from test_kdvlp import evaluate, quarter_means, train

    recipe = recipe_for(world160, {"ssul": {"weight": 1.0}, "spl": {"weight": 1.0}}, size=160, itm_negatives=0)
    torch.manual_seed(0)
    pretrainer = build_with_data(recipe)
    before = evaluate(pretrainer, recipe)
    history = train(pretrainer, recipe, steps=150)
    after = evaluate(pretrainer, recipe)
    print({k: (round(before.get(k, math.nan), 3), round(v, 3)) for k, v in after.items() if not k.startswith("vd")})
    for key in ("ssul_loss", "spl_loss"):
        first, last = quarter_means(history[key])
        assert last < 0.8 * first, (key, first, last)
    assert after["ssul_r2"] > 0.1  # better than the batch's mean colour of the masked patches
    assert after["spl_acc"] > after["spl_chance"] + 0.2


@pytest.mark.slow
def test_segl_learns_above_chance(world160):
    """SEGL alone: on 5x5 grids ~90% of the cells are background, so the class-balanced accuracy is the telling metric."""
    from test_kdvlp import evaluate, quarter_means, train

    recipe = recipe_for(world160, {"segl": {"weight": 1.0}}, size=160, itm_negatives=0)
    torch.manual_seed(0)
    pretrainer = build_with_data(recipe)
    before = evaluate(pretrainer, recipe)
    history = train(pretrainer, recipe, steps=150)
    after = evaluate(pretrainer, recipe)
    print({k: (round(before.get(k, math.nan), 3), round(v, 3)) for k, v in after.items() if not k.startswith("vd")})
    first, last = quarter_means(history["segl_loss"])
    assert last < 0.8 * first
    assert after["segl_acc"] >= after["segl_chance"] - 0.01
    assert after["segl_class_acc"] > after["segl_class_chance"] + 0.03
