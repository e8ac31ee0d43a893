"""`vlptune data ...`: synth (generate the synthetic world), convert a real dataset, inspect and verify a dataset.

The top-level `vlptune` parser calls `add_commands(subparsers)`; every
sub-command sets `func`, a callable taking the parsed Namespace and
returning an exit code (0 ok, 1 a data problem; argparse exits 2 on bad arguments,
inspect returns 2 for a split or index that does not exist).
"""

from __future__ import annotations

import argparse
import sys

from vlptune.data.captions import CAPTION_STYLES, DEFAULT_CAPTION_STYLE
from vlptune.data.convert.commands import add_convert_commands
from vlptune.data.inspect import inspect_dataset
from vlptune.data.schema import ROI_FEATURE_DIM_DEFAULT, DataError
from vlptune.data.shards import DEFAULT_SHARD_SIZE, read_manifest, verify
from vlptune.data.synth import DEFAULT_CAPTIONS_PER_IMAGE, make_world

MIN_IMAGE_SIZE = 32
DEFAULT_IMAGE_SIZE = 96


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def add_commands(subparsers) -> argparse.ArgumentParser:
    """Add `data` with its sub-commands `synth` and `inspect`; return the `data` parser."""
    data = subparsers.add_parser(
        "data", help="generate and inspect datasets (Parquet shards)",
        description="Generate the synthetic vision-language world; inspect a dataset directory.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="{synth,convert,inspect,verify}")
    commands.required = True

    synth = commands.add_parser(
        "synth", help="generate the synthetic world as Parquet shards",
        description="Generate images of coloured shapes with true captions, noun phrases, "
                    "boxes, segmentation maps and VQA / NLVR2 / VE / retrieval records. "
                    "Deterministic given --seed, whatever --workers is.",
    )
    synth.add_argument("--out", required=True, help="output directory (new or empty)")
    synth.add_argument("--train", type=_int_at_least(0), required=True, help="train images")
    synth.add_argument("--val", type=_int_at_least(0), required=True, help="val images")
    synth.add_argument("--test", type=_int_at_least(0), default=0, help="test images (default 0)")
    synth.add_argument("--image-size", type=_int_at_least(MIN_IMAGE_SIZE),
                       default=DEFAULT_IMAGE_SIZE,
                       help=f"shorter image side in pixels (default {DEFAULT_IMAGE_SIZE})")
    synth.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    synth.add_argument("--shard-size", type=_int_at_least(1), default=DEFAULT_SHARD_SIZE,
                       help=f"records per shard (default {DEFAULT_SHARD_SIZE})")
    synth.add_argument("--workers", type=_int_at_least(1), default=1,
                       help="generator processes (default 1)")
    synth.add_argument("--captions-per-image", type=_int_at_least(1),
                       default=DEFAULT_CAPTIONS_PER_IMAGE,
                       help=f"captions per image (default {DEFAULT_CAPTIONS_PER_IMAGE})")
    synth.add_argument("--roi-feature-dim", type=_int_at_least(1),
                       default=ROI_FEATURE_DIM_DEFAULT,
                       help=f"length of each object's roi_feature (default {ROI_FEATURE_DIM_DEFAULT})")
    synth.add_argument("--caption-style", choices=sorted(CAPTION_STYLES), default=DEFAULT_CAPTION_STYLE,
                       help=f"caption style (default {DEFAULT_CAPTION_STYLE}; 'descriptive' names every object by colour)")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace the dataset already in --out")
    synth.add_argument("--quiet", action="store_true", help="no progress lines")
    synth.set_defaults(func=run_synth)

    add_convert_commands(commands)

    inspect = commands.add_parser(
        "inspect", help="counts, manifest check and one decoded sample of a dataset",
        description="Print counts per split and table, check the shards against the manifest "
                    "(sha256, record counts, schemas), and decode one sample.",
    )
    inspect.add_argument("dir", help="dataset directory (holds manifest.json)")
    inspect.add_argument("--split", default=None, help="split of the sample (default train)")
    inspect.add_argument("--index", type=_int_at_least(0), default=0,
                         help="index of the sample in its split (default 0)")
    inspect.add_argument("--image", default=None, metavar="PNG",
                         help="write a picture of the sample: boxes labelled, captions below")
    inspect.set_defaults(func=run_inspect)

    verify = commands.add_parser(
        "verify", help="check a dataset's shards against its manifest",
        description="Check every shard listed in DIR/manifest.json: present, sha256, record "
                    "count, schema; and report leftover .tmp files and unlisted shards.",
    )
    verify.add_argument("dir", help="dataset directory (holds manifest.json)")
    verify.set_defaults(func=run_verify)
    return data


def run_synth(args: argparse.Namespace) -> int:

    def progress(split: str, done: int, total: int) -> None:
        print(f"  {split}: {done}/{total} images", file=sys.stderr, flush=True)

    try:
        summary = make_world(
            args.out, train=args.train, val=args.val, test=args.test,
            image_size=args.image_size, seed=args.seed, shard_size=args.shard_size,
            workers=args.workers, captions_per_image=args.captions_per_image,
            roi_feature_dim=args.roi_feature_dim, overwrite=args.overwrite,
            caption_style=args.caption_style, progress=None if args.quiet else progress,
        )
    except (DataError, OSError) as exc:  # OSError: e.g. no permission, disk full
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    counts = summary["counts"]
    splits = [s for s in ("train", "val", "test") if any(s in c for c in counts.values())]
    width = max(len(t) for t in counts) + 2 if counts else 8
    lines = [f"wrote {summary['out_dir']}",
             "  " + "table".ljust(width) + "".join(s.rjust(10) for s in splits)]
    for table, row in counts.items():
        lines.append("  " + table.ljust(width)
                     + "".join(str(row.get(s, "-")).rjust(10) for s in splits))
    cache = summary["phrase_cache"]
    lines.append(
        f"{summary['images']} images in {summary['seconds']:.2f} s "
        f"({summary['images_per_second']:.0f} images/s with {summary['workers']} worker(s)); "
        f"spaCy: {cache['misses']} distinct captions parsed in "
        f"{cache['parse_cpu_seconds']:.2f} CPU s, "
        f"cache hit rate {cache['hit_rate']:.0%}")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:

    return inspect_dataset(args.dir, split=args.split, index=args.index, image_path=args.image)


def run_verify(args: argparse.Namespace) -> int:

    problems = verify(args.dir)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    manifest = read_manifest(args.dir)
    n_shards = sum(len(v) for t in manifest["shards"].values() for v in t.values())
    print(f"{args.dir}: OK ({n_shards} shards: present, sha256, record counts and schemas verified)")
    return 0


# ------------------------------------------------------------------ a recipe whose data is missing


