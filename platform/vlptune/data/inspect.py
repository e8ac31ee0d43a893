"""Look at a dataset directory: counts, manifest check, one decoded sample, a picture.

`inspect_dataset` prints a report and returns an exit code (0 all good,
1 the manifest check or the sample found a problem, 2 bad arguments);
`render_sample` draws one image_text record with its boxes labelled and its
captions below, next to its segmentation map.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlptune.data.schema import (
    TABLE_IMAGE_TEXT,
    TABLE_NLVR2,
    TABLE_VE,
    TABLE_VQA,
    TABLES,
    VE_LABELS,
    DataError,
)
from vlptune.data.shards import (
    decode_image,
    decode_segmentation,
    read_manifest,
    read_shard,
    verify,
)

PICTURE_MIN_SIDE = 384  # the sample is upscaled (nearest) until its shorter side reaches this
PICTURE_FONT_SIZE = 14
PICTURE_PAD = 8
PICTURE_LINE_GAP = 4
PICTURE_INDENT_PX = 24  # room the "    " indent of phrase lines takes
PICTURE_BOX_WIDTH = 2
PICTURE_PANEL_COLOUR = (255, 255, 255)
PICTURE_TEXT_COLOUR = (0, 0, 0)
BOX_COLOURS = ((0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 128, 0), (255, 255, 0))
SEG_PALETTE_SEED = 3
MAX_RELATED_PRINTED = 4  # vqa / ve / nlvr2 records printed for the sample


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines or [""]


def _segmentation_rgb(seg: np.ndarray, n_classes: int) -> np.ndarray:
    rng = np.random.default_rng(SEG_PALETTE_SEED)
    palette = rng.integers(60, 256, size=(max(n_classes, int(seg.max()) + 1), 3), dtype=np.uint8)
    palette[0] = 0
    return palette[seg]


def object_caption(obj: dict, attributes: list[str]) -> str:
    """'circle (red, big)': the class name and its attribute names."""
    names = [attributes[a] if 0 <= a < len(attributes) else f"attribute {a}"
             for a in obj["attributes"]]
    return f"{obj['name']} ({', '.join(names)})" if names else obj["name"]


def render_sample(record: dict, vocabularies: dict, path: str | Path) -> Path:
    """Write a PNG of `record`: image with labelled boxes | segmentation, captions below."""
    rid = record["image_id"]
    image = decode_image(record["image"], rid)
    w, h = image.size
    scale = max(1, math.ceil(PICTURE_MIN_SIDE / min(w, h)))
    big = image.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    panels = [big]
    if record.get("segmentation") is not None:
        seg = decode_segmentation(record["segmentation"], rid)
        seg_rgb = _segmentation_rgb(seg, len(vocabularies.get("segmentation_classes", [])))
        panels.append(Image.fromarray(seg_rgb).resize(big.size, Image.Resampling.NEAREST))
    font = _font(PICTURE_FONT_SIZE)
    attributes = vocabularies.get("attributes", [])

    draw = ImageDraw.Draw(big)
    for k, obj in enumerate(record["objects"]):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (v * scale for v in obj["box"])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=PICTURE_BOX_WIDTH)
        label = f"{k} {object_caption(obj, attributes)}"
        bx0, by0, bx1, by1 = draw.textbbox((0, 0), label, font=font)  # offsets from origin
        ty = y0 - PICTURE_BOX_WIDTH - by1  # text bottom just above the box ...
        if ty + by0 < 0:
            ty = y1 + PICTURE_BOX_WIDTH - by0  # ... or just below it when no room above
        tx = min(max(0.0, x0), big.width - bx1 - 1)
        draw.rectangle((tx + bx0 - 1, ty + by0 - 1, tx + bx1 + 1, ty + by1 + 1), fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=colour, font=font)

    top_w = sum(p.width for p in panels) + PICTURE_PAD * (len(panels) - 1)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [f"{rid}  ({w}x{h})"]
    for i, cap in enumerate(record["captions"]):
        phrases = record["phrases"][i] if i < len(record["phrases"]) else []
        marked = " ".join(f"[{p['text']}]" for p in phrases)
        lines += _wrap(measure, f"{i}: {cap}", font, top_w - 2 * PICTURE_PAD)
        lines += ["    " + t for t in _wrap(measure, f"phrases: {marked}", font,
                                             top_w - 2 * PICTURE_PAD - PICTURE_INDENT_PX)]
    line_h = PICTURE_FONT_SIZE + PICTURE_LINE_GAP
    panel_h = PICTURE_PAD * 2 + line_h * len(lines)
    canvas = Image.new("RGB", (top_w, big.height + panel_h), PICTURE_PANEL_COLOUR)
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + PICTURE_PAD
    draw = ImageDraw.Draw(canvas)
    y = big.height + PICTURE_PAD
    for line in lines:
        draw.text((PICTURE_PAD, y), line, fill=PICTURE_TEXT_COLOUR, font=font)
        y += line_h
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


class SampleNotFound(DataError):
    """The requested split / index does not exist in the dataset."""


def sample_record(data_dir: str | Path, manifest: dict, split: str, index: int) -> dict:
    """Record `index` of `split` in image_text, reading only the shard that holds it."""
    entries = manifest["shards"].get(TABLE_IMAGE_TEXT, {}).get(split, [])
    total = sum(e["records"] for e in entries)
    if not 0 <= index < total:
        raise SampleNotFound(
            f"{Path(data_dir)}: index {index} is out of range for split {split!r} "
            f"({total} image_text records)"
        )
    offset = index
    for entry in entries:
        if offset < entry["records"]:
            shard = read_shard(Path(data_dir) / entry["path"], TABLE_IMAGE_TEXT)
            return shard.slice(offset, 1).to_pylist()[0]
        offset -= entry["records"]
    raise DataError(f"{Path(data_dir)}: manifest record counts of split {split!r} are inconsistent")


def _related(data_dir: Path, manifest: dict, table: str, split: str, image_id: str) -> list[dict]:
    """Records of `table` in `split` that refer to `image_id` (first shard that has any)."""
    found = []
    for entry in manifest["shards"].get(table, {}).get(split, []):
        arrow = read_shard(data_dir / entry["path"], table)
        cols = ["image_id_left", "image_id_right"] if table == TABLE_NLVR2 else ["image_id"]
        ids = [arrow.column(c).to_pylist() for c in cols]
        rows = [i for i in range(arrow.num_rows) if any(col[i] == image_id for col in ids)]
        found += [arrow.slice(i, 1).to_pylist()[0] for i in rows[:MAX_RELATED_PRINTED]]
        if found:
            break
    return found


def _print_counts(manifest: dict, out: TextIO) -> None:
    counts = manifest["counts"]
    splits = sorted({s for t in counts.values() for s in t},
                    key=lambda s: (("train", "val", "test") + (s,)).index(s))
    width = max(len(t) for t in TABLES) + 2
    print("records:", file=out)
    print("  " + "table".ljust(width) + "".join(s.rjust(10) for s in splits), file=out)
    for table in TABLES:
        row = counts.get(table, {})
        n_shards = sum(len(v) for v in manifest["shards"].get(table, {}).values())
        print("  " + table.ljust(width)
              + "".join(str(row.get(s, "-")).rjust(10) for s in splits)
              + f"   ({n_shards} shards)", file=out)


def inspect_dataset(
    data_dir: str | Path,
    split: str | None = None,
    index: int = 0,
    image_path: str | Path | None = None,
    out: TextIO | None = None,
) -> int:
    """Print counts, the manifest check and one sample (to `out`, default stdout);
    write its picture to `image_path` if given."""
    out = sys.stdout if out is None else out
    data_dir = Path(data_dir)
    try:
        manifest = read_manifest(data_dir)
    except DataError as exc:
        print(f"error: {exc}", file=out)
        return 1
    vocab = manifest["vocabularies"]
    print(f"dataset {data_dir}", file=out)
    print(f"  schema version {manifest['schema_version']}, created by {manifest['created_by']}",
          file=out)
    if "generator" in manifest:
        print(f"  generator: {manifest['generator']}", file=out)
    print(f"  vocabularies: {len(vocab['classes'])} classes ({', '.join(vocab['classes'])}); "
          f"{len(vocab['attributes'])} attributes ({', '.join(vocab['attributes'])}); "
          f"roi_feature_dim {vocab['roi_feature_dim']}", file=out)
    _print_counts(manifest, out)

    status = 0
    problems = verify(data_dir)
    n_shards = sum(len(v) for t in manifest["shards"].values() for v in t.values())
    if problems:
        status = 1
        print(f"manifest check: FAILED ({len(problems)} problem(s))", file=out)
        for p in problems:
            print(f"  - {p}", file=out)
    else:
        print(f"manifest check: OK ({n_shards} shards, sha256 and schemas verified)", file=out)

    image_splits = list(manifest["shards"].get(TABLE_IMAGE_TEXT, {}))
    if not image_splits:
        print("no image_text records: nothing to sample", file=out)
        return status
    if split is None:
        split = "train" if "train" in image_splits else image_splits[0]
    elif split not in image_splits:
        print(f"error: split {split!r} has no image_text records; splits: "
              f"{', '.join(image_splits)}", file=out)
        return 2
    try:
        record = sample_record(data_dir, manifest, split, index)
    except SampleNotFound as exc:
        print(f"error: {exc}", file=out)
        return 2
    except DataError as exc:
        print(f"error: {exc}", file=out)
        return 1
    rid = record["image_id"]
    print(f"sample: split {split}, index {index}: {rid} ({record['width']}x{record['height']})",
          file=out)
    try:
        image = decode_image(record["image"], rid)
        print(f"  image: {image.size[0]}x{image.size[1]} {image.mode}, "
              f"{len(record['image'])} bytes", file=out)
        if record.get("segmentation") is not None:
            seg = decode_segmentation(record["segmentation"], rid)
            classes = vocab["segmentation_classes"]
            values, counts = np.unique(seg, return_counts=True)
            share = ", ".join(
                f"{classes[v] if v < len(classes) else v} {c / seg.size:.0%}"
                for v, c in zip(values, counts))
            print(f"  segmentation: {seg.shape[1]}x{seg.shape[0]}: {share}", file=out)
    except DataError as exc:
        print(f"  error: {exc}", file=out)
        status = 1
    print("  captions (noun phrases in [brackets]):", file=out)
    for i, cap in enumerate(record["captions"]):
        phrases = record["phrases"][i] if i < len(record["phrases"]) else []
        print(f"    {i}: {cap}", file=out)
        print("       " + " ".join(f"[{p['text']}]@{p['start']}:{p['end']}" for p in phrases),
              file=out)
    print("  objects:", file=out)
    for k, obj in enumerate(record["objects"]):
        box = ", ".join(f"{v:.1f}" for v in obj["box"])
        roi = obj.get("roi_feature")
        roi_text = f"roi_feature[{len(roi)}]" if roi is not None else "no roi_feature"
        print(f"    {k}: {object_caption(obj, vocab['attributes'])} (label {obj['label']}) "
              f"box [{box}] {roi_text}", file=out)
    try:
        for rec in _related(data_dir, manifest, TABLE_VQA, split, rid):
            answers = ", ".join(f"{a['answer']} {a['score']:.1f}" for a in rec["answers"])
            print(f"  vqa: {rec['question']} -> {answers}", file=out)
        for rec in _related(data_dir, manifest, TABLE_VE, split, rid):
            print(f"  ve: {rec['hypothesis']} -> {VE_LABELS[rec['label']]}", file=out)
        for rec in _related(data_dir, manifest, TABLE_NLVR2, split, rid)[:1]:
            print(f"  nlvr2: ({rec['image_id_left']} | {rec['image_id_right']}) "
                  f"{rec['statement']} -> {rec['label']}", file=out)
    except DataError as exc:
        print(f"  error: {exc}", file=out)
        status = 1
    if image_path is not None:
        try:
            written = render_sample(record, vocab, image_path)
            print(f"picture written to {written}", file=out)
        except DataError as exc:
            print(f"error: cannot draw the sample: {exc}", file=out)
            status = 1
    return status
