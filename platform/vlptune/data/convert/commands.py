"""``vlptune data convert SOURCE ...``: one sub-command per source, sharing the pipeline's flags.

Bad input (a missing annotation file, a field that is not there, too many bad
records) raises :class:`~vlptune.data.schema.DataError`: the top-level command
prints it as one line and exits 2. The conversion prints a progress line
(images/s, ETA) at most every few seconds, the report table at the end, and
keeps the details in ``OUT/convert.log``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from vlptune.data.convert import captioned, detections, extend, reasoning, vg, vqa, web
from vlptune.data.convert.images import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_LONG_SIDE, DEFAULT_MAX_SHORT_SIDE, DEFAULT_MIN_SIDE, ImageOptions
from vlptune.data.convert.pipeline import ConvertOptions, convert, default_progress
from vlptune.data.convert.report import DEFAULT_MAX_BAD_FRACTION, Report, format_report
from vlptune.data.convert.tasks import DEFAULT_MAX_CAPTION_CHARS, ParsedSource
from vlptune.data.schema import RECORD_ID_FIELD, TABLE_VE, TABLE_VQA, DataError
from vlptune.data.shards import DEFAULT_SHARD_SIZE

MAX_JPEG_QUALITY = 100
MAX_SIDE = 8192
FEATURE_NDIM = 2  # RoI features: [boxes, D]


def _ranged(kind: type, low: float, high: float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    parse.__name__ = f"{kind.__name__} in [{low}, {high}]"
    return parse


def _max_bad_fraction(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-bad-fraction",
        type=_ranged(float, 0.0, 1.0),
        default=DEFAULT_MAX_BAD_FRACTION,
        help=f"fail when more records than this are dropped (default {DEFAULT_MAX_BAD_FRACTION})",
    )


def _record_limits(parser: argparse.ArgumentParser, texts: str) -> None:
    """``--max-caption-chars`` and ``--max-bad-fraction``."""
    parser.add_argument(
        "--max-caption-chars",
        type=_ranged(int, 1, 100_000),
        default=DEFAULT_MAX_CAPTION_CHARS,
        help=f"truncate longer {texts}, counted (default {DEFAULT_MAX_CAPTION_CHARS})",
    )
    _max_bad_fraction(parser)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output dataset directory (new or empty; see --overwrite, --resume)")
    parser.add_argument(
        "--shard-size", type=_ranged(int, 1, 1_000_000), default=DEFAULT_SHARD_SIZE, help=f"images per image_text shard (default {DEFAULT_SHARD_SIZE})"
    )
    parser.add_argument("--workers", type=_ranged(int, 0, 100_000), default=0, help="Ray Data tasks in parallel (default 0: one per CPU of the cluster)")
    parser.add_argument("--address", default=None, help="Ray cluster to run on (default: an embedded local Ray on 127.0.0.1)")
    parser.add_argument("--executor", choices=("ray", "inline"), default="ray", help="ray (default) or inline: the same steps in this process, for debugging")
    parser.add_argument(
        "--max-short-side",
        type=_ranged(int, 1, MAX_SIDE),
        default=DEFAULT_MAX_SHORT_SIDE,
        help=f"resize so the shorter side is at most this (default {DEFAULT_MAX_SHORT_SIDE})",
    )
    parser.add_argument(
        "--max-long-side",
        type=_ranged(int, 1, MAX_SIDE),
        default=DEFAULT_MAX_LONG_SIDE,
        help=f"and the longer side at most this (default {DEFAULT_MAX_LONG_SIDE})",
    )
    parser.add_argument(
        "--min-side",
        type=_ranged(int, 1, MAX_SIDE),
        default=DEFAULT_MIN_SIDE,
        help=f"drop images whose shorter side is below this (default {DEFAULT_MIN_SIDE})",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=_ranged(int, 1, MAX_JPEG_QUALITY),
        default=DEFAULT_JPEG_QUALITY,
        help=f"JPEG quality of re-encoded images (default {DEFAULT_JPEG_QUALITY})",
    )
    parser.add_argument("--reencode-all", action="store_true", help="re-encode every image, also RGB JPEGs that need no fixing (kept byte for byte by default)")
    _record_limits(parser, "captions")
    parser.add_argument("--no-phrases", action="store_true", help="skip the spaCy noun-phrase parse (phrases stored empty)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted conversion with the same command (shards written are kept)")
    parser.add_argument("--overwrite", action="store_true", help="replace the dataset in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress lines (the report is still printed)")


def _downstream_common(parser: argparse.ArgumentParser, dataset: str) -> None:
    parser.add_argument("--into", type=Path, required=True, help=f"the converted {dataset} root whose images the records use")
    parser.add_argument("--shard-size", type=_ranged(int, 1, 1_000_000), default=DEFAULT_SHARD_SIZE, help=f"records per shard (default {DEFAULT_SHARD_SIZE})")
    _record_limits(parser, "texts")
    parser.add_argument("--overwrite", action="store_true", help="replace the table if the root holds it already")


def add_convert_commands(commands: Any) -> None:
    """Add ``convert`` with one sub-command per source to the ``vlptune data`` sub-parsers."""
    convert_parser = commands.add_parser(
        "convert",
        help="convert a real dataset (COCO, Flickr30k, web tars, ...) to Parquet shards",
        description="Convert a dataset to the documented Parquet shards on Ray Data (docs/convert.md).",
    )
    sources = convert_parser.add_subparsers(dest="source", metavar="{coco,flickr30k,webdataset,vg,vqa,nlvr2,snli-ve,detections}")
    sources.required = True

    coco = sources.add_parser(
        "coco", help="COCO captions: official files or Karpathy's split", description="COCO captions (2014) into image_text (+ retrieval for val/test)."
    )
    group = coco.add_mutually_exclusive_group(required=True)
    group.add_argument("--annotations", nargs="+", type=Path, help="captions_train2014.json captions_val2014.json (official splits)")
    group.add_argument("--karpathy", type=Path, help="dataset_coco.json (Karpathy splits train/restval/val/test)")
    coco.add_argument("--images", type=Path, required=True, help="folder holding train2014/ and val2014/ (or the images themselves)")
    coco.add_argument(
        "--test-images",
        type=Path,
        default=None,
        metavar="TEST2015_DIR",
        help="COCO's test2015/ folder: stored without captions (split test2015) for VQA v2 test-dev",
    )
    coco.add_argument(
        "--restval-into", choices=("train", "val"), default=None, help="the split Karpathy's restval joins (papers: train; default: its own split 'restval')"
    )
    _common(coco)
    coco.set_defaults(func=run_convert, parse=_parse_coco)

    flickr = sources.add_parser(
        "flickr30k", help="Flickr30k captions (Karpathy's dataset_flickr30k.json)", description="Flickr30k into image_text (+ retrieval for val/test)."
    )
    flickr.add_argument("--karpathy", type=Path, required=True, help="dataset_flickr30k.json")
    flickr.add_argument("--images", type=Path, required=True, help="folder of the flickr30k-images")
    _common(flickr)
    flickr.set_defaults(func=run_convert, parse=_parse_flickr)

    webds = sources.add_parser(
        "webdataset",
        help="img2dataset tars or Parquet, or a TSV / JSON-lines of (image, caption)",
        description="Web-scale image-text sets (CC3M, CC12M, SBU, LAION) as img2dataset writes them.",
    )
    group = webds.add_mutually_exclusive_group(required=True)
    group.add_argument("--tar", nargs="+", type=Path, help="webdataset tar shards (KEY.jpg + KEY.txt + KEY.json)")
    group.add_argument("--parquet", nargs="+", type=Path, help="img2dataset Parquet files (key, caption, jpg)")
    group.add_argument("--tsv", type=Path, help="image<TAB>caption rows (paths relative to --images)")
    group.add_argument("--jsonl", type=Path, help='{"image": PATH, "caption": TEXT} lines (paths relative to --images)')
    webds.add_argument("--images", type=Path, default=Path("."), help="folder the --tsv / --jsonl paths are relative to (default .)")
    webds.add_argument("--split", default="train", help="split of every sample (default train)")
    webds.add_argument("--name", default="web", help="dataset name: image id prefix and manifest source (default web)")
    _common(webds)
    webds.set_defaults(func=run_convert, parse=_parse_web)

    vgp = sources.add_parser(
        "vg",
        help="Visual Genome: region phrases as captions with boxes, objects with names and attributes",
        description="Visual Genome into image_text (region captions with caption_boxes; objects, classes and attributes vocabularies).",
    )
    vgp.add_argument("--image-data", type=Path, required=True, help="image_data.json (image_id, width, height, coco_id)")
    vgp.add_argument("--regions", type=Path, required=True, help="region_descriptions.json (the region phrases become captions)")
    vgp.add_argument("--objects", type=Path, required=True, help="objects.json (boxes and names)")
    vgp.add_argument("--attributes", type=Path, default=None, help="attributes.json (optional: object attributes)")
    vgp.add_argument("--images", type=Path, required=True, help="folder holding VG_100K/ and VG_100K_2/")
    vgp.add_argument(
        "--drop-coco-eval",
        type=Path,
        default=None,
        metavar="DATASET_COCO_JSON",
        help="Karpathy's dataset_coco.json: drop VG images whose coco_id is in its val/test (as the papers do)",
    )
    vgp.add_argument("--split", default="train", help="split of every image (default train)")
    vgp.add_argument(
        "--max-classes",
        type=_ranged(int, 1, 100_000),
        default=vg.DEFAULT_MAX_CLASSES,
        help=f"object classes kept, most frequent first (default {vg.DEFAULT_MAX_CLASSES})",
    )
    vgp.add_argument(
        "--max-attributes", type=_ranged(int, 0, 100_000), default=vg.DEFAULT_MAX_ATTRIBUTES, help=f"attributes kept (default {vg.DEFAULT_MAX_ATTRIBUTES})"
    )
    _common(vgp)
    vgp.set_defaults(func=run_convert, parse=_parse_vg)

    nlvr2 = sources.add_parser(
        "nlvr2", help="NLVR2 statements about image pairs (its own images)", description="NLVR2 into nlvr2 (+ its images, stored once, in image_text)."
    )
    nlvr2.add_argument("--jsonl", nargs="+", type=Path, required=True, help="train.json dev.json test1.json (JSON lines)")
    nlvr2.add_argument("--images", type=Path, required=True, help="folder holding train/<directory>/, dev/, test1/")
    _common(nlvr2)
    nlvr2.set_defaults(func=run_convert, parse=lambda a: reasoning.parse_nlvr2(a.jsonl, a.images, a.max_caption_chars))

    vqap = sources.add_parser(
        "vqa", help="VQA v2 questions and answers into a converted COCO root", description="VQA v2 into the vqa table of a converted COCO root (--into)."
    )
    vqap.add_argument("--questions", nargs="+", type=Path, required=True, help="v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015}_questions.json")
    vqap.add_argument("--annotations", nargs="+", type=Path, default=[], help="v2_mscoco_{train2014,val2014}_annotations.json")
    vqap.add_argument(
        "--min-answer-count",
        type=_ranged(int, 1, 1_000_000),
        default=vqa.DEFAULT_MIN_ANSWER_COUNT,
        help=f"answers given at least this often (train+val) form the vocabulary (default {vqa.DEFAULT_MIN_ANSWER_COUNT}: ~3,129 answers)",
    )
    vqap.add_argument("--score", choices=vqa.SCORE_MODES, default="table", help="soft scores: table (0/.3/.6/.9/1, the official metric; default) or min3")
    _downstream_common(vqap, "COCO")
    vqap.set_defaults(func=run_add, parse=_parse_vqa)

    ve = sources.add_parser(
        "snli-ve", help="SNLI-VE hypotheses into a converted Flickr30k root", description="SNLI-VE into the ve table of a converted Flickr30k root (--into)."
    )
    ve.add_argument("--jsonl", nargs="+", type=Path, required=True, help="snli_ve_train.jsonl snli_ve_dev.jsonl snli_ve_test.jsonl")
    _downstream_common(ve, "Flickr30k")
    ve.set_defaults(func=run_add, parse=_parse_ve)

    det = sources.add_parser(
        "detections",
        help="detector outputs (or VG ground truth) as the objects of a converted root",
        description="Replace the objects of a converted root's images by detector outputs (our JSON-lines + .npy format) or VG ground truth.",
    )
    det.add_argument("--into", type=Path, required=True, help="the converted root whose images the detections are of")
    group = det.add_mutually_exclusive_group(required=True)
    group.add_argument("--jsonl", type=Path, help="detections, one JSON line per image (docs/convert.md)")
    group.add_argument("--vg-objects", type=Path, help="VG objects.json: ground truth as a stand-in detector for the COCO images VG shows")
    det.add_argument("--classes", type=Path, help="with --jsonl: class names, one a line (labels index it)")
    det.add_argument("--attribute-names", type=Path, default=None, help="with --jsonl: attribute names, one a line")
    det.add_argument("--features", type=Path, default=None, help="with --jsonl: RoI features, a float .npy [total boxes, D] (feature_offset rows)")
    det.add_argument("--vg-image-data", type=Path, help="with --vg-objects: VG image_data.json (coco_id, width, height)")
    det.add_argument("--vg-attributes", type=Path, default=None, help="with --vg-objects: VG attributes.json")
    det.add_argument(
        "--max-classes", type=_ranged(int, 1, 100_000), default=vg.DEFAULT_MAX_CLASSES, help=f"with --vg-objects (default {vg.DEFAULT_MAX_CLASSES})"
    )
    det.add_argument(
        "--max-attributes", type=_ranged(int, 0, 100_000), default=vg.DEFAULT_MAX_ATTRIBUTES, help=f"with --vg-objects (default {vg.DEFAULT_MAX_ATTRIBUTES})"
    )
    det.add_argument(
        "--min-score",
        type=_ranged(float, 0.0, 1.0),
        default=detections.DEFAULT_MIN_SCORE,
        help=f"drop boxes scoring below this (default {detections.DEFAULT_MIN_SCORE})",
    )
    det.add_argument(
        "--max-boxes",
        type=_ranged(int, 1, 10_000),
        default=detections.DEFAULT_MAX_BOXES,
        help=f"keep the best this many per image (default {detections.DEFAULT_MAX_BOXES})",
    )
    _max_bad_fraction(det)
    det.set_defaults(func=run_detections)


def _parse_coco(args: argparse.Namespace) -> ParsedSource:
    if args.annotations:
        if args.restval_into:
            raise DataError("--restval-into applies to Karpathy's split file (--karpathy), not to the official annotations")
        parsed = captioned.parse_coco_official(args.annotations, args.images, args.max_caption_chars)
    else:
        parsed = captioned.parse_karpathy(args.karpathy, args.images, "coco", args.restval_into, args.max_caption_chars)
    if args.test_images:
        parsed.tasks.extend(captioned.coco_test_images(args.test_images, parsed.report))
    return parsed


def _parse_flickr(args: argparse.Namespace) -> ParsedSource:
    return captioned.parse_karpathy(args.karpathy, args.images, "flickr30k", None, args.max_caption_chars)


def _parse_web(args: argparse.Namespace) -> ParsedSource:
    if args.tar:
        return web.parse_tars(args.tar, args.split, args.name, args.max_caption_chars)
    if args.parquet:
        return web.parse_parquet(args.parquet, args.split, args.name, args.max_caption_chars)
    fmt, path = ("tsv", args.tsv) if args.tsv else ("jsonl", args.jsonl)
    return captioned.parse_pairs(path, args.images, fmt, args.split, args.name, args.max_caption_chars)


def _parse_vg(args: argparse.Namespace) -> ParsedSource:
    drop = vg.coco_eval_ids(args.drop_coco_eval) if args.drop_coco_eval else set()
    return vg.parse_vg(
        args.image_data,
        args.regions,
        args.objects,
        args.images,
        attributes=args.attributes,
        drop_coco_ids=drop,
        split=args.split,
        max_classes=args.max_classes,
        max_attributes=args.max_attributes,
        max_caption_chars=args.max_caption_chars,
    )


def _parse_vqa(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, Any]]], Report, dict[str, Any]]:
    records, vocabulary, report = vqa.parse_vqa(args.questions, args.annotations, args.min_answer_count, args.score)
    return {TABLE_VQA: records}, report, {vqa.VOCABULARY_KEY: vocabulary}


def _parse_ve(args: argparse.Namespace) -> tuple[dict[str, list[dict[str, Any]]], Report, dict[str, Any]]:
    records, report = reasoning.parse_snli_ve(args.jsonl, args.max_caption_chars)
    return {TABLE_VE: records}, report, {}


def run_add(args: argparse.Namespace) -> int:
    """Parse the records, keep those whose images the root holds, write them into the root."""
    tables, report, vocabularies = args.parse(args)
    known = extend.root_image_ids(args.into)
    kept = {t: extend.keep_known(records, known, t, RECORD_ID_FIELD[t], report) for t, records in tables.items()}
    extend.add_tables(
        args.into,
        kept,
        report,
        args.source,
        args.max_bad_fraction,
        overwrite=args.overwrite,
        vocabularies=vocabularies,
        shard_size=args.shard_size,
        progress=print,
    )
    return 0


def run_detections(args: argparse.Namespace) -> int:
    report = Report()
    features = None
    if args.jsonl:
        if args.classes is None:
            raise DataError("--jsonl needs --classes (the class names its labels index)")
        entries = detections.parse_detections(args.jsonl, report)
        classes = detections.read_names(args.classes, "class names")
        attributes = detections.read_names(args.attribute_names, "attribute names") if args.attribute_names else []
        if args.features:
            if not args.features.is_file():
                raise DataError(f"{args.features}: features file not found")
            features = np.load(args.features, mmap_mode="r")
            if features.ndim != FEATURE_NDIM:
                raise DataError(f"{args.features}: expected a [boxes, D] array, found shape {features.shape}")
    else:
        if args.vg_image_data is None:
            raise DataError("--vg-objects needs --vg-image-data (VG's image_data.json: the coco_id of each image)")
        entries, classes, attributes = detections.vg_detections(
            args.vg_image_data, args.vg_objects, args.vg_attributes, report, args.max_classes, args.max_attributes
        )
    detections.apply_detections(
        args.into,
        entries,
        classes,
        report,
        attribute_names=attributes,
        features=features,
        min_score=args.min_score,
        max_boxes=args.max_boxes,
        max_bad_fraction=args.max_bad_fraction,
        progress=print,
    )
    return 0


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    images = ImageOptions(
        max_short_side=args.max_short_side,
        max_long_side=args.max_long_side,
        min_side=args.min_side,
        jpeg_quality=args.jpeg_quality,
        keep_jpeg=not args.reencode_all,
    )
    return ConvertOptions(
        out=Path(args.out),
        images=images,
        shard_size=args.shard_size,
        workers=args.workers,
        address=args.address,
        executor=args.executor,
        resume=args.resume,
        overwrite=args.overwrite,
        max_bad_fraction=args.max_bad_fraction,
        phrases=not args.no_phrases,
        progress=None if args.quiet else default_progress,
    )


def run_convert(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    parsed = args.parse(args)
    summary = convert(parsed, options)
    if args.quiet:
        print(f"wrote {summary['out_dir']}: {summary['images_stored']} images stored of {summary['images_read']} read\n{format_report(summary['report'])}")
    return 0
