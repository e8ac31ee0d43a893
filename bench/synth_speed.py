"""Speed of the synthetic world generator, per core.

For each image size it generates N train images with `make_world` in one
process (workers=1, BLAS/OpenMP threads pinned to 1) and reports:

  * images/s per core = N / CPU seconds of the whole run (drawing, PNG
    encoding, captions, spaCy noun phrases, VQA/VE/NLVR2 records, Parquet
    writing, sha256), and the wall-clock rate beside it;
  * spaCy separately: distinct captions parsed, parse seconds, their share of
    the run, and the phrase-cache hit rate (cache emptied before each size);
  * a reference measured in the same run: only drawing and PNG-encoding the
    same images (image + segmentation map), no text; and the ratio.

One-time costs (importing spaCy and pandas, loading the spaCy model, the
noise tile) are paid in a warm-up before timing and shown on their own.

    .venv/bin/python bench/synth_speed.py                # N=2000, S=96 and 192
    .venv/bin/python bench/synth_speed.py --images 500 --sizes 96
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: set before numpy / spaCy load

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from vlptune.data import phrases, scenes, synth  # noqa: E402
from vlptune.data.shards import encode_png  # noqa: E402

WARMUP_IMAGES = 16
DEFAULT_IMAGES = 2000
DEFAULT_SIZES = (96, 192)
TARGET_IMAGES_PER_CORE = 300  # at S=96 (the design's target)


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def reference(n: int, size: int, seed: int) -> None:
    """Draw and PNG-encode the same images (and maps) as make_world, nothing else."""
    for i in range(n):
        image, seg = scenes.render_scene(scenes.sample_scene(seed, "train", i, size))
        encode_png(image)
        encode_png(seg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="images per size")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"synth speed: {args.images} train images per size, 1 process, python {platform.python_version()}, {os.cpu_count()} CPUs visible")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, warm_wall, warm_cpu = timed(lambda: synth.make_world(tmp / "warmup", train=WARMUP_IMAGES, val=0, image_size=min(args.sizes), seed=1))
        load = phrases.phrase_extractor().stats()["load_seconds"]
        print(f"warm-up (imports, spaCy model load {load:.2f} s, first shard): {warm_wall:.2f} s wall, {warm_cpu:.2f} s CPU -- not counted below\n")

        rows = []
        for size in args.sizes:
            phrases.phrase_extractor().clear()  # a cold cache, as a fresh run has
            summary, wall, cpu = timed(lambda size=size: synth.make_world(tmp / f"world-{size}", train=args.images, val=0, image_size=size, seed=args.seed))
            _, ref_wall, ref_cpu = timed(lambda size=size: reference(args.images, size, args.seed))
            cache = summary["phrase_cache"]
            rows.append((size, summary, wall, cpu, ref_wall, ref_cpu, cache))

    n = args.images
    print(
        f"{'S':>4} {'img/s/core':>11} {'img/s wall':>11} {'spaCy CPU s':>11} {'spaCy %':>8} "
        f"{'parsed':>7} {'hit rate':>9} {'ref img/s/core':>15} {'full/ref':>9}"
    )
    for size, _summary, wall, cpu, _ref_wall, ref_cpu, cache in rows:
        spacy_cpu = cache["parse_cpu_seconds"]
        print(
            f"{size:>4} {n / cpu:>11.0f} {n / wall:>11.0f} {spacy_cpu:>11.2f} "
            f"{100 * spacy_cpu / cpu:>7.0f}% {cache['misses']:>7} "
            f"{cache['hit_rate']:>8.0%} {n / ref_cpu:>15.0f} {cpu / ref_cpu:>8.1f}x"
        )
    print("\nCPU seconds per stage:")
    for size, summary, *_ in rows:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in summary["stage_cpu_seconds"].items())
        print(f"  S={size}: {stages}")
    print(
        "\nimg/s/core: images per CPU-second of the whole make_world run; ref: draw + PNG "
        "encode only (image and segmentation map) of the same images; full/ref: how much "
        "the text, records and writing cost on top of the pixels."
    )
    first = rows[0]
    if first[0] == 96 and n / first[3] < TARGET_IMAGES_PER_CORE:
        print(f"\nbelow the target of {TARGET_IMAGES_PER_CORE} images/s per core at S=96", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
