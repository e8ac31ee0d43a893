"""The training loader (``build_loader``) next to a plain PIL decode + resize + to-tensor of the same stored bytes.

    PYTHONPATH=platform .venv/bin/python bench/loader.py [--images 64] [--rounds 3] [--workers 0 2]
                                                         [--datasets demo-light jpeg600 jpeg1600] [--profile]

Datasets (written once into a temporary directory, not timed):

* ``demo-light``: the synthetic world of trials/demo-light.yaml (PNG shards,
  128-pixel images resized to 96x128), the recipe's own loader settings,
  4x ``--images`` per pass;
* ``jpeg600``: 600x800 photo-like JPEGs (what ``vlptune data convert`` writes
  at its default 600/1000), the paper-style 600x1000 transform;
* ``jpeg1600``: 1600x1200 photo-like JPEGs stored unconverted: the transform
  scales them to 600x800, where PIL's draft mode decodes at 1/2 scale.

For each dataset and each ``--workers`` count, rounds interleaved (ours,
reference, ours, ...), medians reported:

* **vlptune**: images/s of iterating ``build_loader(recipe)`` (decode, resize,
  flip, normalise, the distractor captions, then the SOHO collate: pairs,
  tokenisation, MLM masking, grid and object masks, padding);
* **reference**: images/s of a ``torch.utils.data.DataLoader`` with the same
  workers and batch size over the same stored bytes, each sample
  ``Image.open -> convert("RGB") -> resize(BILINEAR) -> float tensor / 255``,
  batched by PyTorch's default collate (``torch.stack``; every dataset here
  has one image size), as a plain loader would.

The ratio is the median over rounds of ours / reference of the same round
(target >= 0.9, at every worker count).
``--profile`` prints the 25 most expensive functions of one pass of ours at
0 workers (the loader's construction excluded, as from the timings: a run
builds it once).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from vlptune.config import Recipe, load_recipe, validate_recipe
from vlptune.data.dataset import build_loader
from vlptune.data.prepare import ensure_data
from vlptune.data.schema import TABLE_IMAGE_TEXT
from vlptune.data.shards import build_manifest, iter_records, read_manifest, write_manifest, write_shard
from vlptune.data.transforms import resized_hw

DEMO_LIGHT = Path(__file__).resolve().parents[1] / "trials" / "demo-light.yaml"
DATASETS = ("demo-light", "jpeg600", "jpeg1600")
PHOTO_SIZES = {"jpeg600": (800, 600), "jpeg1600": (1600, 1200)}  # (w, h) stored
PHOTO_QUALITY = 90  # the converter's default JPEG quality
DETAIL_SCALE = 8  # low-resolution structure upsampled by this, plus pixel noise: compresses like a photo
SHARD_IMAGES = 32
SMALL_IMAGE_PASSES = 4  # demo-light's tiny images: 4x --images per timed pass (a pass of ~1 s, not ~0.2 s)


def photo_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    coarse = rng.integers(0, 256, size=(h // DETAIL_SCALE, w // DETAIL_SCALE, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    arr = np.clip(base + rng.integers(-12, 13, size=base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=PHOTO_QUALITY)
    return out.getvalue()


def synth_recipe(root: Path, images: int, **data: Any) -> Recipe:
    """demo-light with its synthetic world at ``root`` (``images`` training images) and ``data`` overrides."""
    spec = load_recipe(DEMO_LIGHT).model_dump()
    spec["data"].update({"root": str(root), **data})
    spec["data"]["synth"].update({"train": images, "val": 8})
    return validate_recipe(spec, "bench loader recipe")


def photo_copy(src: Path, out: Path, size: tuple[int, int], seed: int, images: int) -> Path:
    """``images`` training records of ``src`` (cycled, ids made unique) with photo-like JPEGs of ``size``
    (no maps, no objects: the pixels change size)."""
    rng = np.random.default_rng(seed)
    base = list(iter_records(src, TABLE_IMAGE_TEXT, "train"))
    records = []
    for k in range(images):
        r = dict(base[k % len(base)])
        r["image_id"] = f"{r['image_id']}-{k}"
        r["image"] = photo_jpeg(rng, *size)
        r["width"], r["height"] = size
        r["segmentation"] = None
        r["objects"] = []
        r["phrase_label_sim"] = None
        records.append(r)
    entries = [write_shard(out, TABLE_IMAGE_TEXT, "train", k, records[s : s + SHARD_IMAGES]) for k, s in enumerate(range(0, len(records), SHARD_IMAGES))]
    write_manifest(out, build_manifest(read_manifest(src)["vocabularies"], "bench loader photos", {TABLE_IMAGE_TEXT: {"train": entries}}))
    return out


class PlainImages(Dataset):
    """The reference: plain PIL decode + resize + to-tensor of the stored bytes."""

    def __init__(self, root: Path, recipe: Recipe):
        self.data = recipe.data
        self.images = [r["image"] for r in iter_records(root, TABLE_IMAGE_TEXT, "train")]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        h, w = resized_hw(image.height, image.width, self.data)
        image = image.resize((w, h), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div(255.0)


def stack_or_list(batch: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """A plain DataLoader's batch: PyTorch's default collate (one stacked tensor) when the images share a size."""
    return default_collate(batch) if len({tuple(t.shape) for t in batch}) == 1 else batch


def rate_ours(recipe: Recipe, images: int, profile: cProfile.Profile | None = None) -> float:
    loader = build_loader(recipe, train=True)  # once per run in training (its tokenizer, shard reads): not timed
    start = time.perf_counter()
    seen = 0
    if profile is not None:
        profile.enable()
    for batch in loader:
        seen += int(batch["images"].shape[0])
        if seen >= images:
            break
    if profile is not None:
        profile.disable()
    return seen / (time.perf_counter() - start)


def rate_reference(dataset: PlainImages, recipe: Recipe, images: int) -> float:
    workers = recipe.data.num_workers
    loader = DataLoader(
        dataset, batch_size=recipe.data.batch_images, num_workers=workers, collate_fn=stack_or_list, worker_init_fn=_one_thread if workers else None
    )
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch)  # a stacked tensor or a list: its first dimension
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # as build_loader's workers


def roots(tmp: Path, images: int, names: list[str], seed: int) -> dict[str, Recipe]:
    """One recipe per dataset name, its data written under ``tmp``."""
    base = synth_recipe(tmp / "synth", images * SMALL_IMAGE_PASSES)
    ensure_data(base)
    out: dict[str, Recipe] = {}
    for name in names:
        if name == "demo-light":
            out[name] = base
        else:
            root = photo_copy(tmp / "synth", tmp / name, PHOTO_SIZES[name], seed, images)
            out[name] = synth_recipe(root, images, synthesize=False, image_size=600, max_long_side=1000, max_objects=8)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64, help="images per dataset (and per timed pass)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="profile ours at 0 workers on each dataset and print the top functions")
    args = ap.parse_args(argv)
    logging.getLogger("vlptune").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        recipes = roots(Path(tmp_name), args.images, args.datasets, args.seed)
        print(f"loader bench: {args.images} images per pass, {args.rounds} rounds interleaved (ours, reference), medians")
        for name, recipe in recipes.items():
            images = args.images * SMALL_IMAGE_PASSES if name == "demo-light" else args.images
            if args.profile:
                prof = cProfile.Profile()
                rate_ours(recipe, images, prof)
                print(f"--- profile of ours on {name} (0 workers)")
                pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
            reference = PlainImages(Path(recipe.data.root), recipe)
            for workers in args.workers:
                r = recipe.model_copy(update={"data": recipe.data.model_copy(update={"num_workers": workers})})
                rate_ours(r, recipe.data.batch_images)  # warm: tokenizer, shard reads, page cache
                ours, ref = [], []
                for _ in range(args.rounds):
                    ours.append(rate_ours(r, images))
                    ref.append(rate_reference(reference, r, images))
                o, p = statistics.median(ours), statistics.median(ref)
                ratios = [a / b for a, b in zip(ours, ref)]  # each round's pair ran back to back: the comparable figures
                print(
                    f"{name:<11} workers {workers}: vlptune {o:7.1f} img/s, plain PIL {p:7.1f} img/s, ratio {statistics.median(ratios):.2f} "
                    f"(median of the rounds' ratios {[round(x, 2) for x in ratios]}; target >= 0.9)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
