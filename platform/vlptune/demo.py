"""The main job on the embedded default: ``make demo`` runs ``python -m vlptune.demo``.

Stages, each printing what it did:

1. generate the synthetic world (skipped when the directory already holds one),
2. inspect it (counts, manifest check, one decoded sample, a picture),
3. load one SOHO training batch of ``trials/demo-light.yaml`` and print its shapes,
4. run ``search_spaces/demo.yaml`` (8 trials, ASHA, Optuna TPE) on a local
   in-process Ray cluster, print the results table and the best trial's metric
   next to chance, and say how to open TensorBoard (``--no-search`` skips it).

Each stage is a plain function call into the library; nothing here is
demo-only logic.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vlptune.config import load_recipe

REPO = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO / "trials" / "demo-light.yaml"
DEMO_SPACE = REPO / "search_spaces" / "demo.yaml"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def stage_world(recipe_path: Path, out: Path, overrides: list[str]) -> Path:
    from vlptune.data.dataset import ensure_data

    recipe = load_recipe(recipe_path, [*overrides, f"data.root={out / 'world'}"])
    _banner(f"1. synthetic world -> {recipe.data.root}")
    start = time.perf_counter()
    existed = (Path(recipe.data.root) / "manifest.json").is_file()
    root = ensure_data(recipe)
    state = "already there" if existed else f"generated in {time.perf_counter() - start:.1f} s"
    print(f"world at {root} ({state})")
    return root


def stage_inspect(root: Path, out: Path) -> None:
    from vlptune.data.inspect import inspect_dataset

    _banner("2. inspect")
    picture = out / "sample.png"
    inspect_dataset(root, split="train", index=0, image_path=picture)


def stage_batch(recipe_path: Path, root: Path, overrides: list[str]) -> None:
    from vlptune.data.dataset import build_loader

    recipe = load_recipe(recipe_path, [*overrides, f"data.root={root}"])
    _banner(f"3. one training batch of {recipe_path.name}")
    loader = build_loader(recipe, train=True)
    batch = next(iter(loader))
    print(f"{len(loader)} steps per epoch of {recipe.data.batch_images} images; first batch:")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            print(f"  {key:<12} {str(value.dtype).replace('torch.', ''):<8} {tuple(value.shape)}")
        elif isinstance(value, list):
            print(f"  {key:<12} list[{type(value[0]).__name__}] x {len(value)}  e.g. {value[0]!r}")
        else:
            print(f"  {key:<12} {value!r}")


def _best_chance(trial_dir: str | None, metric: str) -> float | None:
    """The chance level of ``metric`` reported by a trial (``retrieval/rsum`` -> ``retrieval/chance_rsum``)."""
    import json

    if trial_dir is None or "/" not in metric:
        return None
    group, name = metric.rsplit("/", 1)
    key = f"{group}/chance_{name}"
    result_file = Path(trial_dir) / "result.json"
    if not result_file.is_file():
        return None
    lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    values = [line[key] for line in lines if key in line]
    return float(values[-1]) if values else None


def stage_search(space_path: Path, root: Path, out: Path) -> int:
    from vlptune.search import results as res
    from vlptune.search.runner import run_search

    exp_dir = (out / "search").resolve()
    _banner(f"4. search {space_path.name} on a local Ray cluster -> {exp_dir}")
    if exp_dir.exists() and any(exp_dir.iterdir()):
        print(f"{exp_dir} exists: showing its results (delete it to search again)")
    else:
        run_search(space_path, exp_dir=exp_dir, overrides=[f"data.root={root.resolve()}"], verbose=1)
    collected = res.collect(exp_dir)
    print(res.summary(collected))
    print(res.format_table(collected))
    best = collected.best
    if best is None or best.best is None:
        print("no trial reported the metric")
        return 1
    chance = _best_chance(best.trial_dir, collected.metric)
    against = f" (chance: {chance:.1f})" if chance is not None else ""
    print(f"best trial {best.trial_id}: {collected.metric} = {best.best:.1f}{against} at step {best.fidelity}")
    print(f"compare the trials: vlptune board {exp_dir}   (TensorBoard on 127.0.0.1, HParams tab)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlptune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="directory for everything the demo writes")
    parser.add_argument("--recipe", default=str(DEMO_RECIPE), help="recipe of the demo")
    parser.add_argument("--space", default=str(DEMO_SPACE), help="search-space file of the search stage")
    parser.add_argument("--no-search", action="store_true", help="stop after the batch stage")
    parser.add_argument("-o", "--override", action="append", default=[], help="dotted recipe override (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = Path(args.recipe)
    start = time.perf_counter()
    root = stage_world(recipe_path, out, args.override)
    stage_inspect(root, out)
    stage_batch(recipe_path, root, args.override)
    status = 0 if args.no_search else stage_search(Path(args.space), root, out)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; outputs under {out}/")
    return status


if __name__ == "__main__":
    sys.exit(main())
