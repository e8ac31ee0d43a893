"""Where a recipe's data comes from: its ``data.root``, generated as the synthetic world when it is missing.

:func:`ensure_data` is the one entry: it returns the dataset directory,
refusing a synthetic world generated with other ``data.synth`` settings and
explaining how to make the data when there is none. Which optional columns
to generate is the caller's word (the objectives know what they read; the
data package does not know the objectives).
"""

from __future__ import annotations

import fcntl
import logging
import shlex
from collections.abc import Collection
from pathlib import Path
from typing import Any

from vlptune.config import Recipe
from vlptune.data.schema import DataError
from vlptune.data.shards import MANIFEST_NAME, read_manifest
from vlptune.data.similarity import SIMILARITY_COLUMN

log = logging.getLogger(__name__)


def data_root(recipe: Recipe) -> Path:
    return Path(recipe.data.root).expanduser()


def world_mismatches(manifest: dict[str, Any], recipe: Recipe) -> list[str]:
    """``data.synth`` fields whose value differs from the synthetic world in ``manifest`` (empty: it matches).

    Only worlds written by the generator are compared; a world from before a
    field existed counts as that field's default.
    """
    generator = manifest.get("generator") or {}
    if generator.get("name") != "synth":
        return []
    s = recipe.data.synth
    splits = generator.get("splits", {})
    wanted = {
        "seed": (s.seed, generator.get("seed")),
        "image_size": (s.image_size, generator.get("image_size")),
        "caption_style": (s.caption_style, generator.get("caption_style", type(s).model_fields["caption_style"].default)),
        "train": (s.train, splits.get("train", 0)),
        "val": (s.val, splits.get("val", 0)),
        "test": (s.test, splits.get("test", 0)),
    }
    return [f"data.synth.{k}={want!r} but the world has {have!r}" for k, (want, have) in wanted.items() if want != have]


def check_world_matches(root: Path, recipe: Recipe) -> None:
    """Refuse a synthetic world at ``root`` generated with other ``data.synth`` settings than ``recipe``'s."""
    differences = world_mismatches(read_manifest(root), recipe)
    if differences:
        raise DataError(
            f"{root / 'manifest.json'}: the synthetic world there was generated with other settings: {'; '.join(differences)}. "
            f"Point data.root at another directory (it is generated on first use) or delete {root} to regenerate it"
        )


def ensure_data(recipe: Recipe, columns: Collection[str] = ()) -> Path:
    """The data directory of ``recipe``; generates the synthetic world first when
    it has no manifest and ``data.synthesize`` is on (under a file lock, so
    concurrent ranks generate it once). ``columns`` are the optional
    ``image_text`` columns the caller needs (the objectives say which, see
    ``vlptune.objectives.base.prepare_dataset``); a world generated here fills
    them (``phrase_label_sim``: phrase-label similarities)."""
    root = data_root(recipe)
    if (root / "manifest.json").is_file():
        if recipe.data.synthesize:
            check_world_matches(root, recipe)
        check_sources(recipe)  # after data.root's own check: its message says how to make data.root
        return root
    if not recipe.data.synthesize:
        raise DataError(missing_data_message(recipe, root, SIMILARITY_COLUMN in columns))
    from vlptune.data import synth  # the generator (PIL drawing, its modules) only when a world is generated

    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / "manifest.json").is_file():
                s = recipe.data.synth
                log.info("generating the synthetic world into %s", root)
                synth.make_world(
                    root, train=s.train, val=s.val, test=s.test, image_size=s.image_size, seed=s.seed, shard_size=s.shard_size,
                    phrase_similarity=SIMILARITY_COLUMN in columns, caption_style=s.caption_style,
                )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    check_sources(recipe)
    return root


def check_sources(recipe: Recipe) -> None:
    """Refuse a mixture (``data.sources``) naming a root that holds no converted dataset, before anything is read."""
    for i, source in enumerate(recipe.data.sources):
        path = Path(source.root).expanduser()
        if not (path / MANIFEST_NAME).is_file():
            state = "the directory exists but has no manifest: an unfinished conversion?" if path.is_dir() else "no such directory"
            raise DataError(
                f"data.sources[{i}].root {source.root!r} holds no dataset ({path / MANIFEST_NAME} not found: {state}); "
                f"convert it with `vlptune data convert SOURCE ... --out {source.root}` (docs/convert.md) or remove it from data.sources"
            )


def synth_command(out: str, synth: Any) -> str:
    """The `vlptune data synth` command that writes the world a recipe's ``data.synth`` settings describe."""
    return (
        f"vlptune data synth --out {shlex.quote(out)} --train {synth.train} --val {synth.val} --test {synth.test} "
        f"--image-size {synth.image_size} --seed {synth.seed} --shard-size {synth.shard_size} --caption-style {synth.caption_style}"
    )


def missing_data_message(recipe: Any, root: Path, needs_phrase_similarity: bool) -> str:
    """Why ``recipe`` has no data at ``root`` (its ``data.root``, no manifest, ``data.synthesize`` off) and how to make it."""
    state = "the directory exists but has no manifest: an unfinished write?" if root.is_dir() else "no such directory"
    head = (
        f"data.root {recipe.data.root!r} holds no dataset ({root / MANIFEST_NAME} not found: {state}), "
        "and the recipe sets data.synthesize: false, so nothing generates it."
    )
    if needs_phrase_similarity:
        synth = (
            "For the synthetic world, set data.synthesize: true (or -o data.synthesize=true): it is then generated into data.root "
            "on first use with the phrase-label similarities this recipe's objectives need (`vlptune data synth` does not write them)."
        )
    else:
        synth = (
            f"For the synthetic world, generate it with `{synth_command(recipe.data.root, recipe.data.synth)}` "
            "(this recipe's data.synth settings), or set data.synthesize: true (or -o data.synthesize=true) to generate it on first use."
        )
    real = (
        f"For real data (COCO, VG, Flickr30k, web tars, ...), convert it with `vlptune data convert SOURCE ... --out {recipe.data.root}` "
        f"(docs/convert.md); a dataset directory holds a {MANIFEST_NAME} and the Parquet shards it lists."
    )
    return f"{head} {synth} {real}"
