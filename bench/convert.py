"""Speed of ``vlptune data convert`` per core, next to plain PIL; and of the training loader on converted JPEG vs PNG shards.

Three measurements, each interleaving rounds of ours and of its reference in
this one process (ours, reference, ours, ...), medians reported with the ratio:

1. **conversion per core**: the whole conversion of N camera-sized JPEGs
   (default 1600x1200) to 600x1000 on the inline executor (one process:
   read, sniff, EXIF, resize with JPEG draft decoding, JPEG encode, spaCy noun
   phrases, Parquet shards, sha256, report, manifest), images per CPU-second,
   next to a plain PIL ``open -> convert("RGB") -> resize(BICUBIC) -> JPEG``
   of the same files (the target: ours >= 0.8 of plain);
2. **Ray Data scaling**: the same conversion on Ray Data with 1 and 2 workers
   (wall clock; the embedded local Ray started once, before timing);
3. **loader**: images/s of the training dataset (``ShardDataset[i]``: decode
   + the paper-style 600x1000 transform) over the converted JPEG shards, next
   to the same pixels stored as PNG (what the synthetic world stores; target >= 2x).

    .venv/bin/python bench/convert.py                  # N=48, 3 rounds
    .venv/bin/python bench/convert.py --images 24 --rounds 2 --no-ray
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vlptune.config import validate_recipe
from vlptune.data.convert.captioned import parse_pairs
from vlptune.data.convert.images import DEFAULT_JPEG_QUALITY, ImageOptions, target_size
from vlptune.data.convert.pipeline import ConvertOptions, convert
from vlptune.data.dataset import ShardDataset
from vlptune.data.schema import TABLE_IMAGE_TEXT
from vlptune.data.shards import build_manifest, encode_png, iter_records, read_manifest, write_manifest, write_shard

DEFAULT_IMAGES = 48
DEFAULT_ROUNDS = 3
SOURCE_SIZE = (1600, 1200)  # a typical camera / COCO-original-like size (COCO's are ~640x480; VG and web images run larger)
SOURCE_QUALITY = 92
DETAIL_SCALE = 8  # low-resolution structure upsampled by this, plus pixel noise: compresses like a photo
OPTIONS = ImageOptions()  # the defaults: 600 / 1000, quality 90


def make_sources(folder: Path, n: int, seed: int) -> Path:
    """N JPEGs of SOURCE_SIZE and a TSV (image, caption) over them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = SOURCE_SIZE
    lines = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(h // DETAIL_SCALE, w // DETAIL_SCALE, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        arr = np.clip(base + rng.integers(-12, 13, size=base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:04d}.jpg", quality=SOURCE_QUALITY)
        lines.append(f"img_{i:04d}.jpg\ta photo number {i} of a red car parked next to a small house")
    tsv = folder / "pairs.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv


def plain(folder: Path, n: int) -> None:
    """The reference: plain PIL decode + resize + JPEG encode of the same files."""
    for i in range(n):
        image = Image.open(folder / f"img_{i:04d}.jpg").convert("RGB")
        image = image.resize(target_size(*image.size, OPTIONS.max_short_side, OPTIONS.max_long_side), Image.Resampling.BICUBIC)
        image.save(io.BytesIO(), format="JPEG", quality=DEFAULT_JPEG_QUALITY)


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def wall_seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ours(tsv: Path, out: Path, executor: str = "inline", workers: int = 1) -> None:
    parsed = parse_pairs(tsv, tsv.parent, "tsv", "train", "bench")
    convert(parsed, ConvertOptions(out=out, images=OPTIONS, executor=executor, workers=workers, overwrite=True, shard_size=16))  # type: ignore[arg-type]


def png_copy(root: Path, out: Path, originals: Path | None = None) -> Path:
    """The converted dataset with every image stored as PNG: the same pixels, or (``originals``) the unconverted source image."""
    manifest = read_manifest(root)
    records = list(iter_records(root, TABLE_IMAGE_TEXT))
    for k, r in enumerate(records):
        image = Image.open(originals / f"img_{k:04d}.jpg") if originals else Image.open(io.BytesIO(r["image"]))
        r["image"] = encode_png(image.convert("RGB"))
        r["width"], r["height"] = image.size
    entry = write_shard(out, TABLE_IMAGE_TEXT, "train", 0, records)
    write_manifest(out, build_manifest(manifest["vocabularies"], "bench png copy", {TABLE_IMAGE_TEXT: {"train": [entry]}}))
    return out


def loader_rate(root: Path) -> float:
    recipe = validate_recipe(
        {"name": "bench", "data": {"root": str(root), "synthesize": False, "image_size": 600, "max_long_side": 1000}, "objectives": {"mlm": {"weight": 1.0}}},
        "bench recipe",
    )
    ds = ShardDataset(recipe, "train", train=False, root=root)
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Data scaling measurement")
    args = ap.parse_args(argv)
    n = args.images
    logging.getLogger("vlptune").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tsv = make_sources(tmp / "src", n, args.seed)
        ours(tsv, tmp / "warm")  # imports, spaCy model load: not timed
        plain(tsv.parent, 2)
        print(
            f"convert bench: {n} JPEGs of {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} -> {OPTIONS.max_short_side}/{OPTIONS.max_long_side}, {args.rounds} rounds interleaved"
        )
        our_rates, plain_rates = [], []
        for _ in range(args.rounds):
            our_rates.append(n / cpu_seconds(lambda: ours(tsv, tmp / "ours")))
            plain_rates.append(n / cpu_seconds(lambda: plain(tsv.parent, n)))
        o, p = statistics.median(our_rates), statistics.median(plain_rates)
        print(f"1. per core: vlptune convert {o:.1f} images/CPU-s, plain PIL {p:.1f} images/CPU-s, ratio {o / p:.2f} (target >= 0.8)")
        print(f"   rounds: ours {[round(r, 1) for r in our_rates]}, plain {[round(r, 1) for r in plain_rates]}")

        if not args.no_ray:
            import ray  # the bench starts the embedded Ray once, before timing (the pipeline reuses it)

            ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.ERROR)
            try:
                ours(tsv, tmp / "ray-warm", "ray", 2)
                one, two = [], []
                for _ in range(args.rounds):
                    one.append(n / wall_seconds(lambda: ours(tsv, tmp / "ray1", "ray", 1)))
                    two.append(n / wall_seconds(lambda: ours(tsv, tmp / "ray2", "ray", 2)))
            finally:
                ray.shutdown()
            r1, r2 = statistics.median(one), statistics.median(two)
            print(f"2. Ray Data: 1 worker {r1:.1f} images/s, 2 workers {r2:.1f} images/s (wall), scaling {r2 / r1:.2f}x (linear: 2.00)")
            print(f"   rounds: 1 worker {[round(r, 1) for r in one]}, 2 workers {[round(r, 1) for r in two]}")

        roots = {"JPEG 600x800 (converted)": tmp / "ours", "PNG 600x800 (same pixels)": png_copy(tmp / "ours", tmp / "png")}
        roots[f"PNG {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} (unconverted)"] = png_copy(tmp / "ours", tmp / "png-orig", tsv.parent)
        loader_rate(tmp / "png")  # warm
        rates: dict[str, list[float]] = {k: [] for k in roots}
        for _ in range(args.rounds):
            for name, root in roots.items():
                rates[name].append(loader_rate(root))
        first = statistics.median(rates[next(iter(roots))])
        print("3. loader (ShardDataset: decode + the 600x1000 transform), images/s:")
        for name, root in roots.items():
            size = sum(len(r["image"]) for r in iter_records(root, TABLE_IMAGE_TEXT)) / n / 1024
            rate = statistics.median(rates[name])
            print(f"   {name:<30} {rate:6.1f} images/s  {size:6.0f} KiB/image  JPEG/this {first / rate:.2f}  rounds {[round(r, 1) for r in rates[name]]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
