"""SOHOCollate: the training batch of docs/contracts.md, SOHO pairs, MLM, grids, phrases."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vlptune.config import Recipe
from vlptune.data.collate import SOHOCollate, box_cells, seg_to_grid
from vlptune.data.dataset import ShardDataset
from vlptune.data.prepare import ensure_data
from vlptune.data.schema import DataError
from vlptune.data.shards import read_manifest
from vlptune.data.text import IGNORE_INDEX, MLMMasker, char_to_token_spans, encode, load_tokenizer
from vlptune.grid import grid_shape, grid_stride

ROOT = Path(__file__).resolve().parents[1]
WORLD = {"train": 24, "val": 8, "image_size": 64, "seed": 0, "shard_size": 10}  # same world as test_dataset


def recipe_for(root: Path, **data) -> Recipe:
    base = {"root": str(root), "image_size": 64, "max_long_side": 128, "batch_images": 4, "synth": WORLD}
    base.update(data)
    return Recipe(data=base, train={"seed": 3}, model={"backbone": {"pool": 1}})


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return ensure_data(recipe_for(tmp_path_factory.getbasetemp() / "synth-world"))


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def recipe(world) -> Recipe:
    return recipe_for(world, itm_positives=2, itm_negatives=3, random_resized_crop=True)


@pytest.fixture(scope="session")
def samples(recipe, world) -> list[dict]:
    ds = ShardDataset(recipe, "train", train=True, root=world)
    return [ds[i] for i in range(8)]


@pytest.fixture(scope="session")
def collate(recipe, tokenizer, world) -> SOHOCollate:
    return SOHOCollate(recipe, tokenizer, train=True, manifest=read_manifest(world))


def contract_keys() -> dict[str, str]:
    """Keys and dtype/shape column of the 'Training batch' table of docs/contracts.md."""
    text = (ROOT / "docs" / "contracts.md").read_text()
    section = text.split("## Training batch", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \|", section, flags=re.M)
    return {k: v.strip() for k, v in rows if k != "key"}


def test_batch_matches_the_contract(collate, samples, recipe, tokenizer, world):
    batch = collate(samples[:4])
    keys = contract_keys()
    assert len(keys) >= 20
    assert set(batch) == set(keys), "the batch holds exactly the contract's keys"
    B, P, N = 4, recipe.data.itm_positives, recipe.data.itm_negatives
    Np = B * (P + N)
    vocab = read_manifest(world)["vocabularies"]
    A, R = len(vocab["attributes"]), vocab["roi_feature_dim"]
    H, W = batch["images"].shape[-2:]
    gh, gw = grid_shape(H, W, grid_stride(recipe.model.backbone.pool))
    T = batch["text_ids"].shape[1]
    O = batch["obj_labels"].shape[1]
    K = batch["phrase_spans"].shape[1]
    expected = {
        "images": (torch.float32, (B, 3, H, W)),
        "pixel_mask": (torch.bool, (B, H, W)),
        "text_ids": (torch.int64, (Np, T)),
        "text_mask": (torch.int64, (Np, T)),
        "pair_image": (torch.int64, (Np,)),
        "itm_labels": (torch.int64, (Np,)),
        "mlm_ids": (torch.int64, (Np, T)),
        "mlm_labels": (torch.int64, (Np, T)),
        "grid_hw": (torch.int64, (2,)),
        "grid_mask": (torch.bool, (B, gh, gw)),
        "obj_masks": (torch.bool, (B, O, gh, gw)),
        "obj_labels": (torch.int64, (B, O)),
        "obj_boxes": (torch.float32, (B, O, 4)),
        "obj_attrs": (torch.float32, (B, O, A)),
        "obj_roi": (torch.float32, (B, O, R)),
        "obj_has_roi": (torch.bool, (B, O)),
        "seg": (torch.int64, (B, gh, gw)),
        "phrase_spans": (torch.int64, (Np, K, 2)),
    }
    for key, (dtype, shape) in expected.items():
        assert batch[key].dtype == dtype, key
        assert tuple(batch[key].shape) == shape, key
        assert str(dtype).split(".")[1] in keys[key], f"{key}: contract says {keys[key]}"
    assert batch["image_ids"] == [s["image_id"] for s in samples[:4]]
    assert isinstance(batch["captions"], list) and len(batch["captions"]) == Np
    assert batch["skipped"] == 0
    assert batch["grid_hw"].tolist() == [gh, gw]
    assert O == max(1, max(len(s["labels"]) for s in samples[:4]))
    assert T <= recipe.data.max_text_len
    ids = batch["text_ids"]
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    lengths = batch["text_mask"].sum(1)
    assert (ids[torch.arange(Np), lengths - 1] == tokenizer.sep_token_id).all()
    assert (ids[batch["text_mask"] == 0] == tokenizer.pad_token_id).all()
    for b, s in enumerate(samples[:4]):
        h, w = s["image"].shape[1:]
        assert torch.equal(batch["images"][b, :, :h, :w], s["image"])
        assert batch["pixel_mask"][b].sum() == h * w and batch["images"][b][:, ~batch["pixel_mask"][b]].abs().sum() == 0
        ch, cw = grid_shape(h, w, grid_stride(recipe.model.backbone.pool))
        assert batch["grid_mask"][b].sum() == ch * cw and batch["grid_mask"][b, :ch, :cw].all()
        n = len(s["labels"])
        assert (batch["obj_labels"][b, :n] >= 0).all() and (batch["obj_labels"][b, n:] == -1).all()
        assert batch["obj_has_roi"][b, :n].all() and not batch["obj_has_roi"][b, n:].any()
        assert not batch["obj_masks"][b, n:].any()
        for k in range(n):
            assert batch["obj_attrs"][b, k].nonzero().flatten().tolist() == sorted(s["attributes"][k])
            cx, cy, bw, bh = batch["obj_boxes"][b, k].tolist()
            x0, y0, x1, y1 = s["boxes"][k]
            assert cx == pytest.approx((x0 + x1) / 2 / w) and bh == pytest.approx((y1 - y0) / h)
            assert 0 <= cx <= 1 and 0 < bw <= 1


def test_positives_and_negatives(collate, samples, recipe):
    batch = collate(samples)
    P, N = recipe.data.itm_positives, recipe.data.itm_negatives
    own = {b: set(s["captions"]) for b, s in enumerate(samples)}
    ids = [s["image_id"] for s in samples]
    caption_owner = {c: {i for i, s in zip(ids, samples) if c in s["captions"]} for s in samples for c in s["captions"]}
    expected_labels = ([1] * P + [0] * N) * len(samples)
    assert batch["itm_labels"].tolist() == expected_labels
    assert batch["pair_image"].tolist() == [b for b in range(len(samples)) for _ in range(P + N)]
    for _r, (b, label, text) in enumerate(zip(batch["pair_image"].tolist(), batch["itm_labels"].tolist(), batch["captions"])):
        if label == 1:
            assert text in own[b]
        else:
            assert text not in own[b], "a negative is never a caption of the same image"
            assert caption_owner[text] - {ids[b]}, "negatives come from other images of the batch"
    positives = [batch["captions"][b * (P + N) : b * (P + N) + P] for b in range(len(samples))]
    assert all(len(set(p)) == P for p in positives), "positives are distinct captions when the image has enough"


def test_one_image_batch_takes_negatives_from_the_pool(collate, samples, recipe):
    batch = collate(samples[:1])
    P, N = recipe.data.itm_positives, recipe.data.itm_negatives
    negatives = batch["captions"][P:]
    assert len(negatives) == N
    assert not set(negatives) & set(samples[0]["captions"])
    pool = {c for d in samples[0]["distractors"] for c in d["captions"]}
    assert set(negatives) <= pool
    lonely = dict(samples[0], distractors=[])
    with pytest.raises(DataError, match="negative"):
        collate([lonely])


def test_mlm_masking_statistics():
    tok = load_tokenizer("minilm")
    masker = MLMMasker(tok, 0.15)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (400, 64), generator=g)
    ids[:, 0], ids[:, 40] = tok.cls_token_id, tok.sep_token_id
    ids[:, 41:] = tok.pad_token_id
    mask = (ids != tok.pad_token_id).long()
    maskable = masker.maskable(ids, mask)
    out, labels = masker.mask(ids, maskable, torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert not selected[:, [0, 40]].any() and not selected[:, 41:].any(), "never [CLS], [SEP], [PAD]"
    assert torch.equal(labels[selected], ids[selected])
    rate = selected.sum().item() / maskable.sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = selected.sum().item()
    to_mask = (out[selected] == tok.mask_token_id).sum().item() / n
    kept = (out[selected] == ids[selected]).sum().item() / n
    randomised = 1 - to_mask - kept
    assert to_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1, abs=0.02)
    assert randomised == pytest.approx(0.1, abs=0.02)
    assert torch.equal(out[~selected], ids[~selected]), "unselected tokens are untouched"
    special = set(tok.all_special_ids)
    assert not any(int(t) in special for t in out[selected & (out != tok.mask_token_id)])
    again, _ = masker.mask(ids, maskable, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_mlm_only_on_positives(collate, samples, tokenizer, recipe):
    batch = collate(samples)
    pos = batch["itm_labels"] == 1
    labels, mlm_ids, text_ids = batch["mlm_labels"], batch["mlm_ids"], batch["text_ids"]
    assert (labels[~pos] == IGNORE_INDEX).all() and torch.equal(mlm_ids[~pos], text_ids[~pos])
    selected = labels != IGNORE_INDEX
    assert selected[pos].any()
    assert torch.equal(labels[selected], text_ids[selected])
    assert torch.equal(mlm_ids[~selected], text_ids[~selected])
    for special in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        assert not selected[text_ids == special].any()


def test_batches_are_deterministic(collate, samples, recipe, tokenizer, world):
    a, b = collate(samples[:4]), collate(samples[:4])
    other = SOHOCollate(recipe, tokenizer, train=True, manifest=read_manifest(world))(samples[:4])
    for x in (b, other):
        for key, value in a.items():
            if torch.is_tensor(value):
                assert torch.equal(value, x[key]), key
            else:
                assert value == x[key], key
    reseeded = [dict(s, seed=s["seed"] + 1) for s in samples[:4]]
    c = collate(reseeded)
    assert not (torch.equal(a["mlm_ids"], c["mlm_ids"]) and a["captions"] == c["captions"])


def test_object_masks_cover_the_cells_under_the_boxes(collate, samples, recipe):
    batch = collate(samples)
    s = grid_stride(recipe.model.backbone.pool)
    gh, gw = batch["grid_hw"].tolist()
    checked = 0
    for b, smp in enumerate(samples):
        for k, (x0, y0, x1, y1) in enumerate(smp["boxes"]):
            # brute force: a cell is covered when the box overlaps its pixel square
            want = torch.zeros(gh, gw, dtype=torch.bool)
            for i in range(gh):
                for j in range(gw):
                    want[i, j] = bool((x0 < (j + 1) * s) and (x1 > j * s) and (y0 < (i + 1) * s) and (y1 > i * s))
            assert torch.equal(batch["obj_masks"][b, k], want), (b, k)
            assert (batch["obj_masks"][b, k] <= batch["grid_mask"][b]).all()
            checked += 1
    assert checked >= 8


def test_box_cells_and_segmentation_grid():
    assert box_cells((0, 0, 64, 64), 32, 4, 4) == (0, 2, 0, 2)
    assert box_cells((33, 10, 33, 10), 32, 4, 4) == (0, 1, 1, 2)  # degenerate box: its cell
    assert box_cells((90, 90, 500, 500), 32, 4, 4) == (2, 4, 2, 4)  # clipped to the image's cells
    seg = np.zeros((5, 7), dtype=np.uint8)
    seg[:2, :2] = 3  # cell (0,0): 4 of 4 pixels
    seg[2:4, 0] = 5  # cell (1,0): 2 of 4 pixels are class 5, 2 are class 0 -> tie -> 0
    seg[2:4, 2:4] = 7
    seg[4, 6] = 9  # cell (2,3): its only real pixel
    grid = seg_to_grid(seg, 4, 5, 2, 5, 7)
    assert grid.dtype == torch.int64
    assert grid[0, 0] == 3 and grid[1, 0] == 0 and grid[1, 1] == 7 and grid[2, 3] == 9
    assert (grid[3] == 255).all() and (grid[:, 4] == 255).all(), "255 outside the image"
    assert (seg_to_grid(None, 2, 2, 2, 3, 3) == 255).all()


def test_segmentation_majority_in_batch(collate, samples, recipe):
    batch = collate(samples[:4])
    s = grid_stride(recipe.model.backbone.pool)
    for b, smp in enumerate(samples[:4]):
        seg = smp["seg"]
        h, w = seg.shape
        ch, cw = grid_shape(h, w, s)
        for i in range(ch):
            for j in range(cw):
                cell = seg[i * s : (i + 1) * s, j * s : (j + 1) * s]
                counts = np.bincount(cell.ravel(), minlength=256)
                assert batch["seg"][b, i, j] == counts.argmax()
        assert (batch["seg"][b][~batch["grid_mask"][b]] == 255).all()


def test_phrase_spans_decode_back_to_the_phrases(collate, samples, tokenizer):
    batch = collate(samples)
    spans = batch["phrase_spans"]
    by_caption = {c: ph for s in samples for d in [s, *s["distractors"]] for c, ph in zip(d["captions"], d["phrases"])}
    found = 0
    for r, text in enumerate(batch["captions"]):
        phrases = by_caption[text]
        assert (spans[r, len(phrases) :] == -1).all()
        for k, (start, end) in enumerate(phrases):
            ts, te = spans[r, k].tolist()
            assert 0 < ts < te < batch["text_mask"][r].sum()
            decoded = tokenizer.decode(batch["text_ids"][r, ts:te])
            assert decoded == text[start:end].lower(), (decoded, text[start:end])
            found += 1
    assert found > 10


def test_char_to_token_spans_handles_subwords_and_truncation(tokenizer):
    text = "a bluish-green heart beside the tiny hexagon"
    enc = encode(tokenizer, [text], 6)  # truncated: [CLS] a blu ##ish - [SEP]
    spans = char_to_token_spans(enc.offsets[0], enc.special[0].tolist(), [(2, 20), (32, 44)])
    assert spans[0] == (2, 5)  # the surviving tokens of "bluish-green heart"
    assert spans[1] == (-1, -1)  # truncated away
    full = encode(tokenizer, [text], 40)
    ((s, e),) = char_to_token_spans(full.offsets[0], full.special[0].tolist(), [(2, 20)])
    assert tokenizer.decode(full.ids[0, s:e]) == "bluish - green heart"


def test_corrupt_markers_are_dropped_and_counted(collate, samples):
    marker = {"corrupt": True, "skipped": [("x", "bad"), ("y", "bad")], "image_id": "x"}
    first = dict(samples[0], skipped=[("z", "bad")])
    batch = collate([first, marker, samples[1]])
    assert batch["image_ids"] == [samples[0]["image_id"], samples[1]["image_id"]]
    assert batch["skipped"] == 3
    with pytest.raises(DataError):
        collate([marker])
