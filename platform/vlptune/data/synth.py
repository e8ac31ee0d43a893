"""The synthetic vision-language world, written as Parquet shards.

Images hold 1 to 4 coloured shapes on textured backgrounds; each image comes
with captions that are true of it, spaCy noun phrases of those captions,
per-object boxes, labels, attributes and a stand-in detector RoI feature, a
per-pixel segmentation map, and downstream records (VQA, NLVR2-style pairs,
visual entailment, retrieval sets). Everything is a pure function of
(seed, split, index), so the output is the same whatever the worker count.

This module is the world itself: its settings (:class:`WorldConfig`), its
vocabularies, the records of a chunk of images and :func:`make_world`, which
writes them all as Parquet shards (see vlptune.data.shards and docs/data.md).
The parts are :mod:`vlptune.data.scenes` (layout, pixels, RoI features),
:mod:`vlptune.data.captions`, :mod:`vlptune.data.phrases` (spaCy noun
phrases) and :mod:`vlptune.data.downstream` (VQA, VE, NLVR2).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vlptune.data.captions import (
    CAPTION_STYLES,
    DEFAULT_CAPTION_STYLE,
    SHAPE_SYNONYMS,
    make_captions,
)
from vlptune.data.downstream import make_nlvr2, make_ve, make_vqa
from vlptune.data.phrases import SPACY_MODEL, phrase_extractor
from vlptune.data.scenes import (
    ATTRIBUTES,
    COLOUR_NAMES,
    SHAPES,
    SIZES,
    Scene,
    render_scene,
    rng_for,
    roi_feature,
    sample_scene,
)
from vlptune.data.schema import (
    ROI_FEATURE_DIM_DEFAULT,
    SCHEMA_VERSION,
    TABLE_IMAGE_TEXT,
    TABLE_NLVR2,
    TABLE_RETRIEVAL,
    TABLE_VE,
    TABLE_VQA,
    TABLES,
    DataError,
)
from vlptune.data.shards import (
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    ShardWriter,
    encode_png,
)
from vlptune.data.similarity import MANIFEST_KEY, PhraseLabelSimilarity

# ---------------------------------------------------------------------------
# the world's vocabulary
# ---------------------------------------------------------------------------

SEGMENTATION_CLASSES: tuple[str, ...] = ("background",) + SHAPES  # map value = 1 + label

SPLITS: tuple[str, ...] = ("train", "val", "test")

# text
DEFAULT_CAPTIONS_PER_IMAGE = 5

# retrieval sets (rows pointing at image_text captions)
RETRIEVAL_SPLITS: tuple[str, ...] = ("val", "test")
RETRIEVAL_MAX_IMAGES = 1000  # like the COCO 1k retrieval protocol
RETRIEVAL_CAPTIONS_PER_IMAGE = 5

# generation
CHUNK_IMAGES = 64  # images per worker task
# fork where the platform has it (as torch's DataLoader does): workers inherit the loaded
# spaCy model and its cache instead of paying ~5 CPU-seconds of imports each under spawn
POOL_START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
CREATED_BY = "vlptune data synth"


# ---------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 96
    captions_per_image: int = DEFAULT_CAPTIONS_PER_IMAGE
    roi_feature_dim: int = ROI_FEATURE_DIM_DEFAULT
    spacy_model: str = SPACY_MODEL
    caption_style: str = DEFAULT_CAPTION_STYLE

    def validate(self) -> None:
        if self.caption_style not in CAPTION_STYLES:
            raise DataError(f"caption_style must be one of {', '.join(CAPTION_STYLES)}, got {self.caption_style!r}")
        if self.image_size < 32:
            raise DataError(f"image_size must be >= 32 (objects must fit), got {self.image_size}")
        if self.captions_per_image < 1:
            raise DataError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        if self.roi_feature_dim < 1:
            raise DataError(f"roi_feature_dim must be >= 1, got {self.roi_feature_dim}")


def vocabularies(roi_feature_dim: int = ROI_FEATURE_DIM_DEFAULT) -> dict:
    return {
        "classes": list(SHAPES),
        "attributes": list(ATTRIBUTES),
        "segmentation_classes": list(SEGMENTATION_CLASSES),
        "roi_feature_dim": roi_feature_dim,
        "colours": list(COLOUR_NAMES),
        "sizes": list(SIZES),
        "shape_synonyms": {k: list(v) for k, v in SHAPE_SYNONYMS.items()},
    }


def image_record(scene: Scene, cfg: WorldConfig, captions: list[str],
                 phrases: list[list[dict]]) -> dict:
    """The image_text record of `scene` (draws and PNG-encodes it)."""
    image, seg = render_scene(scene)
    rnd = rng_for(scene.seed, scene.split, scene.index, "roi")
    objects = [
        {"box": [float(v) for v in o.box], "label": o.label, "name": o.shape,
         "attributes": o.attributes, "roi_feature": roi_feature(o, cfg.roi_feature_dim, rnd)}
        for o in scene.objects
    ]
    return {
        "image_id": scene.image_id, "split": scene.split,
        "image": encode_png(image), "width": scene.width, "height": scene.height,
        "captions": captions, "phrases": phrases, "objects": objects,
        "segmentation": encode_png(seg),
    }


def generate_chunk(cfg: WorldConfig, split: str, start: int, stop: int,
                   split_size: int) -> dict:
    """Every record of images [start, stop) of `split`, plus CPU times and cache stats."""
    t0 = time.process_time()
    scenes = [sample_scene(cfg.seed, split, i, cfg.image_size) for i in range(start, stop)]
    captions = [make_captions(s, cfg.captions_per_image, cfg.caption_style) for s in scenes]
    t1 = time.process_time()
    extractor = phrase_extractor(cfg.spacy_model)
    before = extractor.stats()
    phrases = extractor.phrases(captions)
    after = extractor.stats()
    t2 = time.process_time()
    tables: dict[str, list[dict]] = {t: [] for t in TABLES}
    for scene, caps, phr in zip(scenes, captions, phrases):
        tables[TABLE_IMAGE_TEXT].append(image_record(scene, cfg, caps, phr))
    t3 = time.process_time()
    for scene, caps in zip(scenes, captions):
        tables[TABLE_VQA] += make_vqa(scene)
        tables[TABLE_VE] += make_ve(scene)
        tables[TABLE_NLVR2] += make_nlvr2(cfg.seed, split, scene.index, split_size,
                                          cfg.image_size, left=scene)
        if split in RETRIEVAL_SPLITS and scene.index < RETRIEVAL_MAX_IMAGES:
            tables[TABLE_RETRIEVAL] += [
                {"split": split, "image_id": scene.image_id, "caption_index": c}
                for c in range(min(len(caps), RETRIEVAL_CAPTIONS_PER_IMAGE))
            ]
    t4 = time.process_time()
    return {
        "tables": tables,
        "images": stop - start,
        "cpu_seconds": {"scene_captions": t1 - t0, "phrases": t2 - t1,
                        "draw_encode": t3 - t2, "downstream": t4 - t3},
        "phrase_cache": {k: after[k] - before[k]
                         for k in ("hits", "misses", "parse_cpu_seconds", "load_seconds")},
    }


def _generate_chunk_star(args: tuple) -> dict:
    return generate_chunk(*args)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(
                f"{out_dir}: output directory is not empty; choose a new one or overwrite"
            )
        # remove only what a dataset directory holds
        for table in TABLES:
            if (out_dir / table).is_dir():
                shutil.rmtree(out_dir / table)
        if (out_dir / MANIFEST_NAME).exists():
            (out_dir / MANIFEST_NAME).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def make_world(
    out_dir,
    train: int,
    val: int,
    test: int = 0,
    image_size: int = 96,
    seed: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 1,
    captions_per_image: int = DEFAULT_CAPTIONS_PER_IMAGE,
    roi_feature_dim: int = ROI_FEATURE_DIM_DEFAULT,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    phrase_similarity: bool = False,
    similarity_model: str | None = None,
    caption_style: str = DEFAULT_CAPTION_STYLE,
) -> dict:
    """Generate the world into `out_dir` as Parquet shards; return a summary dict.

    Output is byte-identical for the same arguments whatever `workers` is.
    `progress(split, done, total)` is called after each chunk when given.
    Summary keys: out_dir, counts (table -> split -> records), images,
    seconds and images_per_second (wall clock), stage_cpu_seconds (CPU seconds
    per stage, summed over workers: scene_captions, phrases, draw_encode,
    downstream, write, and similarity when on), phrase_cache (hits, misses, hit_rate,
    parse_cpu_seconds, load_seconds), workers, phrase_similarity (None when
    off, else encoded, hits, encode_cpu_seconds, load_seconds).

    ``phrase_similarity``: also fill the ``image_text`` column
    ``phrase_label_sim`` (KD-VLP's alpha(z, n), :mod:`vlptune.data.similarity`)
    with the text encoder ``similarity_model`` (None: the packaged MiniLM), and
    record ``phrase_label_similarity`` in the manifest. It runs in this process
    as the chunks arrive (in order, one cache for the whole run), so the output
    stays the same whatever ``workers`` is. Cost: one encoder pass per distinct
    phrase string (about 1250 distinct phrases in a 2000-image world).
    """
    cfg = WorldConfig(seed=seed, image_size=image_size, captions_per_image=captions_per_image,
                      roi_feature_dim=roi_feature_dim, caption_style=caption_style)
    cfg.validate()
    similarity = None
    if phrase_similarity:

        similarity = PhraseLabelSimilarity(similarity_model)  # a fresh cache: same bytes whatever ran before
    sizes = {"train": train, "val": val, "test": test}
    for split, n in sizes.items():
        if n < 0:
            raise DataError(f"number of {split} images must be >= 0, got {n}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)

    tasks = [(cfg, split, start, min(start + CHUNK_IMAGES, n), n)
             for split, n in sizes.items() for start in range(0, n, CHUNK_IMAGES)]
    done = {s: 0 for s in sizes}
    stage = {"scene_captions": 0.0, "phrases": 0.0, "draw_encode": 0.0, "downstream": 0.0,
             "write": 0.0}
    if similarity is not None:
        stage["similarity"] = 0.0
    extra = {"generator": {"name": "synth", "seed": seed, "image_size": image_size,
                           "captions_per_image": captions_per_image,
                           "caption_style": caption_style,
                           "splits": {s: n for s, n in sizes.items() if n},
                           "schema_version": SCHEMA_VERSION}}
    if similarity is not None:
        extra[MANIFEST_KEY] = similarity.describe()
    cache = {"hits": 0, "misses": 0, "parse_cpu_seconds": 0.0, "load_seconds": 0.0}
    writer = ShardWriter(
        out_dir, vocabularies=vocabularies(roi_feature_dim), created_by=CREATED_BY,
        shard_size=shard_size, extra=extra,
    )
    start_time = time.perf_counter()
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            pool = mp.get_context(POOL_START_METHOD).Pool(min(workers, len(tasks)))
            results: Iterable[dict] = pool.imap(_generate_chunk_star, tasks)  # in order: same output
        else:
            results = map(_generate_chunk_star, tasks)
        with writer:
            for task, result in zip(tasks, results):
                if similarity is not None:
                    s0 = time.process_time()
                    similarity.fill_records(result["tables"][TABLE_IMAGE_TEXT])
                    stage["similarity"] += time.process_time() - s0
                w0 = time.process_time()
                for table, records in result["tables"].items():
                    writer.add_many(table, records)
                stage["write"] += time.process_time() - w0
                for k, v in result["cpu_seconds"].items():
                    stage[k] += v
                for k, v in result["phrase_cache"].items():
                    cache[k] += v
                split = task[1]
                done[split] += result["images"]
                if progress:
                    progress(split, done[split], sizes[split])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    manifest = writer.manifest
    assert manifest is not None  # the with block closed the writer, which wrote it
    seconds = time.perf_counter() - start_time
    images = sum(sizes.values())
    total_lookups = cache["hits"] + cache["misses"]
    cache["hit_rate"] = cache["hits"] / total_lookups if total_lookups else 0.0
    return {
        "out_dir": str(out_dir),
        "counts": manifest["counts"],
        "images": images,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else float("inf"),
        "stage_cpu_seconds": stage,
        "phrase_cache": cache,
        "workers": workers,
        "phrase_similarity": similarity.stats() if similarity is not None else None,
    }
