"""Caption generation from a checkpoint and a CIDEr-free sanity metric (``vlptune caption``).

``caption_checkpoint(path, ...)`` loads a run's checkpoint (safetensors + JSON
written by the training loop; the recipe is the run directory's
``recipe.yaml``), encodes the first ``limit`` images of a split with the
image-only encoder pass and decodes one caption per image with the captioning
objective's decoder (greedy, or beam search with ``beam > 1``).

The sanity metric needs no reference n-grams, only the image's objects:

* a caption **mentions** a shape when one of its words is a synonym of a
  class (the manifest's ``shape_synonyms``, singular or plural) and a colour
  when a word is one of the manifest's ``colours``;
* ``mention_accuracy``: share of captions whose every mentioned shape and
  every mentioned colour is present in the image (a caption that mentions
  nothing counts as correct, so ``mention_rate`` is reported next to it);
* ``shape_precision`` / ``colour_precision``: share of mentioned shapes /
  colours (over all captions) present in their image;
* the same numbers for two references: the image's own first ground-truth
  caption (``reference_*``: what a perfect captioner gets, below 1 only where
  the world's captions use a synonym outside the manifest vocabularies, e.g.
  "violet") and another image's first caption (``shuffled_*``: what a fluent
  captioner that ignores the image gets).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlptune.config import ConfigError, Recipe, load_recipe
from vlptune.config.objectives import caption_generator_names
from vlptune.config.tasks import CaptionConfig
from vlptune.data.collate import pad_images
from vlptune.data.dataset import ShardDataset
from vlptune.data.schema import DataError
from vlptune.data.shards import read_manifest
from vlptune.data.text import load_tokenizer
from vlptune.grid import grid_stride
from vlptune.io import atomic_write_text
from vlptune.model.decoder import image_only_memory
from vlptune.objectives.base import Objective, Pretrainer, build_pretrainer, prepare_dataset
from vlptune.train.checkpoint import CHECKPOINT_DIR, STATE_FILE, CheckpointError, latest_checkpoint, load_checkpoint
from vlptune.train.loop import Dist, resolve_device

DEFAULTS = CaptionConfig()

RUN_RECIPE = "recipe.yaml"
WORD = re.compile(r"[a-z]+")
PLURAL_SUFFIXES = ("", "s", "es")


# --------------------------------------------------------------------------- the metric


@dataclass(frozen=True)
class MentionVocab:
    """Word -> class name for shapes, word -> colour name, and the attribute vocabulary."""

    shape_words: dict[str, str]
    colour_words: dict[str, str]
    classes: tuple[str, ...]
    attributes: tuple[str, ...]

    @classmethod
    def from_manifest(cls, manifest: dict) -> MentionVocab:
        vocab = manifest.get("vocabularies", {})
        missing = [key for key in ("classes", "attributes", "colours", "shape_synonyms") if key not in vocab]
        if missing:
            raise ConfigError(
                f"the mention accuracy needs the manifest vocabularies {missing} (the synthetic world writes them); this dataset has {sorted(vocab)}"
            )
        shapes: dict[str, str] = {}
        for name, synonyms in vocab["shape_synonyms"].items():
            for word in [name, *synonyms]:
                for suffix in PLURAL_SUFFIXES:
                    shapes[word.lower() + suffix] = name
        colours = {c.lower(): c for c in vocab["colours"]}
        return cls(shapes, colours, tuple(vocab["classes"]), tuple(vocab["attributes"]))

    def mentions(self, caption: str) -> tuple[set[str], set[str]]:
        words = WORD.findall(caption.lower())
        return {self.shape_words[w] for w in words if w in self.shape_words}, {self.colour_words[w] for w in words if w in self.colour_words}

    def present(self, labels: Sequence[int], attributes: Sequence[Sequence[int]]) -> tuple[set[str], set[str]]:
        shapes = {self.classes[int(k)] for k in labels}
        colours = {self.attributes[int(a)] for attrs in attributes for a in attrs if self.attributes[int(a)] in self.colour_words.values()}
        return shapes, colours


def mention_scores(vocab: MentionVocab, captions: Sequence[str], objects: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> dict[str, float]:
    """``mention_accuracy``, ``mention_rate``, ``shape_precision``, ``colour_precision`` of ``captions`` against their images' ``objects`` (labels, attributes)."""
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions for {len(objects)} images")
    correct = mentioning = 0
    shape_hits = shape_total = colour_hits = colour_total = 0
    for caption, (labels, attributes) in zip(captions, objects):
        shapes, colours = vocab.mentions(caption)
        have_shapes, have_colours = vocab.present(labels, attributes)
        correct += shapes <= have_shapes and colours <= have_colours
        mentioning += bool(shapes or colours)
        shape_hits += len(shapes & have_shapes)
        shape_total += len(shapes)
        colour_hits += len(colours & have_colours)
        colour_total += len(colours)
    n = max(1, len(captions))
    return {
        "mention_accuracy": correct / n,
        "mention_rate": mentioning / n,
        "shape_precision": shape_hits / shape_total if shape_total else math.nan,
        "colour_precision": colour_hits / colour_total if colour_total else math.nan,
    }


# --------------------------------------------------------------------------- checkpoint


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """``(checkpoint_dir, run_dir)`` from a checkpoint directory or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
        return path, run_dir
    if (path / CHECKPOINT_DIR).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"{path}: a run directory without a complete checkpoint in {CHECKPOINT_DIR}/")
        return latest, path
    raise ConfigError(f"{path}: neither a checkpoint directory (with {STATE_FILE}) nor a run directory (with {CHECKPOINT_DIR}/)")


@dataclass
class CaptionReport:
    image_ids: list[str]
    captions: list[str]
    references: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str = ""
    seconds: float = 0.0
    note: str = ""  # why the mention metric is missing, when it is


def captioner_of(pretrainer: Pretrainer) -> Objective | None:
    """The active objective that generates captions (its config says ``generates_captions``), if any."""
    return next((objective for objective in pretrainer.objectives.values() if objective.cfg.generates_captions), None)


def load_captioner(checkpoint: Path, run_dir: Path, device: torch.device) -> tuple[Recipe, Pretrainer]:
    """``(recipe, pretrainer)`` of a run, weights loaded from ``checkpoint``, in eval mode on ``device``."""
    recipe_path = run_dir / RUN_RECIPE
    if not recipe_path.is_file():
        raise ConfigError(f"{run_dir}: no {RUN_RECIPE} (the training loop writes the resolved recipe there)")
    recipe = load_recipe(recipe_path)
    if not any(cfg.generates_captions for cfg in recipe.active_objectives().values()):
        raise ConfigError(
            f"{recipe_path}: no caption-generating objective ({', '.join(caption_generator_names())}) has a weight > 0; this checkpoint has no caption decoder"
        )
    pretrainer = build_pretrainer(recipe, prepare_dataset(recipe))  # heads sized from the dataset's vocabularies
    load_checkpoint(checkpoint, pretrainer, restore_rng_state=False)
    return recipe, pretrainer.to(device).eval()


@torch.no_grad()
def caption_checkpoint(
    path: str | Path,
    beam: int = DEFAULTS.beam,
    split: str | None = None,
    limit: int = DEFAULTS.limit,
    max_len: int | None = None,
    length_penalty: float = DEFAULTS.length_penalty,
    device: str | torch.device = "cpu",
) -> CaptionReport:
    """Caption the first ``limit`` images of ``split`` (default ``data.val_split``) and score the mentions."""
    if beam < 1:
        raise ConfigError(f"--beam must be >= 1, got {beam}")
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    start = time.perf_counter()
    device = torch.device(device)
    checkpoint, run_dir = resolve_checkpoint(path)
    recipe, pretrainer = load_captioner(checkpoint, run_dir, device)
    model, captioner = pretrainer.model, captioner_of(pretrainer)
    assert captioner is not None  # load_captioner refuses a recipe without one
    split = split or recipe.data.val_split
    dataset = ShardDataset(recipe, split, train=False)
    manifest = read_manifest(dataset.root)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    banned = tuple(sorted(set(tokenizer.all_special_ids) - {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}))
    stride = grid_stride(recipe.model.backbone.pool)
    samples = [dataset[i] for i in range(min(limit, len(dataset)))]
    samples = [s for s in samples if not s.get("corrupt")]
    if not samples:
        raise ConfigError(f"split {split!r} of {dataset.root} has no decodable image")
    captions: list[str] = []
    batch_size = recipe.data.batch_images
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        images, pixel_mask, _ = pad_images([x["image"] for x in chunk], stride)
        feats = model.encode_images(images.to(device), pixel_mask.to(device))
        memory = image_only_memory(model, feats.feats, feats.grid_mask, captioner.ids)
        tokens = captioner.generate(memory, beam=beam, max_len=max_len, length_penalty=length_penalty, banned=banned)
        captions.extend(tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens)
    references = [x["captions"][0] for x in samples]
    report = CaptionReport(
        image_ids=[x["image_id"] for x in samples],
        captions=captions,
        references=references,
        checkpoint=str(checkpoint),
    )
    try:
        vocab = MentionVocab.from_manifest(manifest)
    except ConfigError as exc:
        report.note = str(exc)
    else:
        objects = [(x["labels"].tolist(), x["attributes"]) for x in samples]
        shuffled = references[1:] + references[:1]
        report.metrics.update(mention_scores(vocab, captions, objects))
        report.metrics.update({f"reference_{k}": v for k, v in mention_scores(vocab, references, objects).items()})
        if len(samples) > 1:
            report.metrics.update({f"shuffled_{k}": v for k, v in mention_scores(vocab, shuffled, objects).items()})
    report.metrics["images"] = float(len(samples))
    report.metrics["mean_words"] = sum(len(c.split()) for c in captions) / len(captions)
    report.seconds = time.perf_counter() - start
    return report


# --------------------------------------------------------------------------- command


def format_report(report: CaptionReport, show: int = DEFAULTS.show) -> str:
    m = report.metrics
    lines = [f"captions of {int(m['images'])} images from {report.checkpoint} ({report.seconds:.1f} s)"]
    for image_id, caption, reference in list(zip(report.image_ids, report.captions, report.references))[:show]:
        lines.append(f"  {image_id}: {caption!r}   (reference: {reference!r})")
    if "mention_accuracy" in m:
        lines.append(f"  {'metric':<18} {'model':>8} {'reference':>10} {'shuffled':>9}")
        for key in ("mention_accuracy", "mention_rate", "shape_precision", "colour_precision"):
            lines.append(f"  {key:<18} {m[key]:>8.3f} {m.get('reference_' + key, math.nan):>10.3f} {m.get('shuffled_' + key, math.nan):>9.3f}")
    else:
        lines.append(f"  mention accuracy not computed: {report.note}")
    lines.append(f"  mean caption length: {m['mean_words']:.1f} words")
    return "\n".join(lines)


def run_caption(args: Any) -> int:
    device = resolve_device(args.device, Dist())
    try:
        report = caption_checkpoint(
            args.checkpoint,
            beam=args.beam,
            split=args.split,
            limit=args.limit,
            max_len=args.max_len,
            length_penalty=args.length_penalty,
            device=device,
        )
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report, args.show), flush=True)
    if args.out:
        rows = [json.dumps({"image_id": i, "caption": c, "reference": r}) for i, c, r in zip(report.image_ids, report.captions, report.references)]
        atomic_write_text(args.out, "\n".join(rows) + "\n")
        print(f"wrote {args.out}")
    return 0


__all__ = ["CaptionReport", "MentionVocab", "caption_checkpoint", "format_report", "mention_scores", "resolve_checkpoint", "run_caption"]
