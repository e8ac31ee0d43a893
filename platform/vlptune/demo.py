"""The main job on the embedded default: ``make demo`` runs ``python -m vlptune.demo``.

Stages, each printing what it did:

1. generate the synthetic world (skipped when the directory already holds one),
2. inspect it (counts, manifest check, one decoded sample, a picture),
3. load one SOHO training batch of ``trials/demo-light.yaml`` and print its shapes,
4. pretrain demo-light's ResNet on the world's labelled images once
   (``model.backbone.init: pretrained``, the offline stand-in for ImageNet
   weights, cached under the world's ``backbones/``; skipped when it is there),
   and print its label accuracy next to its chance level,
5. run ``search_spaces/demo.yaml`` (8 trials, ASHA, Optuna TPE) on a local
   in-process Ray cluster, print the results table and the best trial's metric
   next to chance, and say how to open TensorBoard (``--no-search`` skips it
   and everything after). The search ranks by ``downstream/vqa/score``: each
   trial that completes its pretraining finetunes its final checkpoint on the
   synthetic world's VQA questions (the space's ``downstream.vqa``), ASHA
   prunes on ``val/mlm_acc``; the best VQA score is printed next to the
   majority answer's,
6. promote the best 2 trials that completed the last step to
   ``trials/demo-full.yaml`` through ``trials/fidelity/demo.yaml`` (recipes in
   ``trials/promoted/``), run them with 1 seed each as one experiment (shortened
   through the study's fixed overrides, ``--promoted-steps``), and print the
   promotion report (light vs full ranking, Spearman and Kendall),
7. print the hyperparameter importance table of the search (fANOVA and
   PED-ANOVA over the stored Optuna study).

Each stage is a plain function call into the library; nothing here is
demo-only logic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from vlptune.config import load_recipe
from vlptune.config.objectives import required_columns
from vlptune.config.recipe import CACHED_BACKBONE
from vlptune.data.dataset import build_loader
from vlptune.data.inspect import inspect_dataset
from vlptune.data.prepare import ensure_data
from vlptune.search import results as res
from vlptune.search.layout import BASE_COPY, read_meta
from vlptune.search.runner import run_search
from vlptune.study import importance as imp
from vlptune.study import promote as pr
from vlptune.study import promote_report as rep
from vlptune.study.promote import MIN_RUN_CONFIGS
from vlptune.study.promote_cli import ranged
from vlptune.train.backbone_pretrain import PROVENANCE_FILE, cache_path, is_pretrained_backbone, resolve_cached_backbone
from vlptune.train.loop import train_worker
from vlptune.train.reporting import format_duration, loop_progress

REPO = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO / "trials" / "demo-light.yaml"
DEMO_SPACE = REPO / "search_spaces" / "demo.yaml"
DEMO_TARGET = REPO / "trials" / "demo-full.yaml"
DEMO_MAP = REPO / "trials" / "fidelity" / "demo.yaml"
PROMOTE_TOP_K = 2
PROMOTE_SEEDS = 1
# The promoted runs are demo-full shortened so the whole demo stays within its time
# budget on a 2-core machine (demo-full: about 1.4 s per step on 2 cores alone; two
# runs at once on 1 CPU each). Set through the study's fixed overrides, not the files.
PROMOTED_STEPS = 30
PROMOTED_EVALS = 2  # evaluations per promoted run (eval_every = steps / evals)
PROMOTED_FIXED = {
    "train.log_every": 10,
    "optim.warmup_steps": 3,
    "eval.max_images": 16,  # as in the demo search: 16x16 image-text pairs per evaluation
    "eval.loss_batches": 2,
    "eval.vd_picture_codes": 4,
}
PROMOTED_RESOURCES = {"workers": 1, "cpus_per_worker": 1}
PROMOTED_MAX_CONCURRENT = 2


class StageClock:
    """Each stage's first line says how far into the demo it starts; the stage before it, how long it took."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start = time.perf_counter()
        self.stage_start: float | None = None

    def banner(self, text: str) -> None:
        self.done()
        self.stage_start = time.perf_counter()
        print(f"\n=== {text} ===  [{format_duration(self.stage_start - self.start)} into the demo]", flush=True)

    def done(self) -> None:
        if self.stage_start is not None:
            print(f"(stage took {format_duration(time.perf_counter() - self.stage_start)})", flush=True)
            self.stage_start = None


CLOCK = StageClock()
_banner = CLOCK.banner


def stage_world(recipe_path: Path, out: Path, overrides: list[str]) -> Path:
    recipe = load_recipe(recipe_path, [*overrides, f"data.root={out / 'world'}"])
    _banner(f"1. synthetic world -> {recipe.data.root}")
    start = time.perf_counter()
    existed = (Path(recipe.data.root) / "manifest.json").is_file()
    root = ensure_data(recipe, required_columns(recipe))
    state = "already there" if existed else f"generated in {time.perf_counter() - start:.1f} s"
    print(f"world at {root} ({state})")
    return root


def stage_inspect(root: Path, out: Path) -> None:
    _banner("2. inspect")
    picture = out / "sample.png"
    inspect_dataset(root, split="train", index=0, image_path=picture)


def stage_batch(recipe_path: Path, root: Path, overrides: list[str]) -> None:
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


def stage_backbone(recipe_path: Path, root: Path, overrides: list[str]) -> None:
    recipe = load_recipe(recipe_path, [*overrides, f"data.root={root}"])
    b = recipe.model.backbone
    if b.init != CACHED_BACKBONE:
        return
    path = cache_path(recipe)
    _banner(f"4. pretrained backbone -> {path}")
    existed = is_pretrained_backbone(path)
    if not existed:
        print(
            f"pretraining the ResNet-{b.depth} x{b.width_mult:g} on the world's object labels ({b.pretrain_steps} steps of {b.pretrain_batch_images} images)",
            flush=True,
        )
    with loop_progress("  pretraining step "):
        resolve_cached_backbone(recipe, train_worker)
    provenance = json.loads((path / PROVENANCE_FILE).read_text())
    m = provenance.get("metrics", {})
    state = "already there" if existed else f"made in {provenance.get('seconds', float('nan')):.0f} s"
    print(
        f"backbone {state}: val label accuracy {m.get('val/bcls_acc', float('nan')):.3f} against the prior's {m.get('val/bcls_chance', float('nan')):.3f}, "
        f"F1 {m.get('val/bcls_f1', float('nan')):.3f} against {m.get('val/bcls_f1_chance', float('nan')):.3f}"
    )


def disk_usage(path: Path) -> str:
    """``1.2 GB on disk`` of everything under ``path``."""
    total = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())
    return f"{total / 1e9:.2f} GB on disk" if total >= 1e8 else f"{total / 1e6:.0f} MB on disk"


def _best_chance(trial_dir: str | None, metric: str) -> float | None:
    """The chance level of ``metric`` in a trial's last report that has one."""
    from vlptune.train.tensorboard import chance_keys  # tensorboard: heavy, only when a search has run

    result_file = Path(trial_dir) / "result.json" if trial_dir else None
    if result_file is None or not result_file.is_file():
        return None
    lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    values = [line[key] for line in lines for key in chance_keys(metric) if key in line]
    return float(values[-1]) if values else None


def stage_search(space_path: Path, root: Path, out: Path) -> tuple[int, str | None]:
    exp_dir = (out / "search").resolve()
    _banner(f"5. search {space_path.name} on a local Ray cluster -> {exp_dir}")
    if exp_dir.exists() and any(exp_dir.iterdir()):
        print(f"{exp_dir} exists: showing its results (delete it to search again)")
    else:
        run_search(space_path, exp_dir=exp_dir, overrides=[f"data.root={root.resolve()}"])
    collected = res.collect(exp_dir)
    print(res.summary(collected))
    print(res.format_table(collected))
    best = collected.best
    if best is None or best.best is None:
        print("no trial reported the metric")
        return 1, None
    chance = _best_chance(best.trial_dir, collected.metric)
    against = f" (chance: {chance:.3g}, {best.best / chance:.1f}x chance)" if chance else ""
    print(f"best trial {best.trial_id}: {collected.metric} = {best.best:.3g}{against} at step {best.fidelity}")
    print(f"compare the trials: vlptune board {exp_dir}   (TensorBoard on 127.0.0.1, HParams tab)")
    return 0, best.trial_id


def stage_promote(search_dir: Path, root: Path, out: Path, steps: int, top_k: int) -> int:
    run_dir = (out / "promoted").resolve()
    _banner(f"6. promote the best {top_k} demo trials to {DEMO_TARGET.name} and run them -> {run_dir}")
    if run_dir.exists() and any(run_dir.iterdir()):
        print(f"{run_dir} exists: showing its report (delete it to promote and run again)")
        promotion, _ = pr.read_promotion_record(run_dir)
    else:
        try:
            promotion = pr.promote(search_dir, top_k=top_k, target=DEMO_TARGET, fidelity_map=DEMO_MAP)
        except pr.PromotionError as exc:
            print(f"cannot promote: {exc}")
            return 1
        print(pr.format_promotion(promotion, requested=top_k))
        fixed = {
            **PROMOTED_FIXED,
            "data.root": str(root.resolve()),
            "train.max_steps": steps,
            "train.eval_every": max(1, steps // PROMOTED_EVALS),
        }
        downstream = (yaml.safe_load((search_dir / BASE_COPY).read_text()) or {}).get("downstream")
        if downstream:  # ranked by a downstream metric: the promoted runs finetune with the search's budget, not the papers' epochs
            fixed["downstream"] = downstream
        try:
            spec = pr.promotion_study(
                promotion, seeds=PROMOTE_SEEDS, fixed=fixed, resources=PROMOTED_RESOURCES, max_concurrent=PROMOTED_MAX_CONCURRENT, name="promoted"
            )
        except pr.PromotionError as exc:
            print(f"cannot run the promoted recipes: {exc}")
            return 1
        print(pr.run_note(promotion, fixed))
        print(f"(the demo shortens the runs so it fits its time budget: --promoted-steps {steps}; the promoted files keep demo-full's own length)")
        from vlptune.study.ablation import StudyError  # scipy (via study.stats): heavy, only when promoted runs start

        try:
            pr.run_promotion(promotion, spec, exp_dir=run_dir)
        except StudyError as exc:
            print(f"the promoted run failed: {exc}")
            return 1
    report, _ = rep.collect_report(run_dir)
    print(rep.report_header(promotion, run_dir))
    print(rep.format_report(report))
    print(f"written: {rep.write_report(run_dir, promotion, report)}; again with: vlptune promote --report {run_dir}")
    return 0


def stage_importance(search_dir: Path) -> int:
    _banner(f"7. hyperparameter importance of the demo search ({', '.join(imp.EVALUATORS)})")
    try:
        results = imp.importances(search_dir, "both")
    except imp.ImportanceError as exc:
        print(f"no importance table: {exc}")
        return 0  # a refusal with its reason is a result of the demo, not a failure
    metric = read_meta(search_dir).get("metric")
    print(imp.format_markdown(results, metric), end="")
    written = imp.write_outputs(search_dir, results, metric)
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlptune.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="directory for everything the demo writes")
    parser.add_argument("--recipe", default=str(DEMO_RECIPE), help="recipe of the demo")
    parser.add_argument("--space", default=str(DEMO_SPACE), help="search-space file of the search stage")
    parser.add_argument("--no-search", action="store_true", help="stop after the batch stage (no search, promotion or importance)")
    parser.add_argument(
        "--top-k",
        type=ranged(int, MIN_RUN_CONFIGS, what="a number of trials"),
        default=PROMOTE_TOP_K,
        metavar="K",
        help=f"trials to promote to {DEMO_TARGET.name} (default {PROMOTE_TOP_K}, at least {MIN_RUN_CONFIGS})",
    )
    parser.add_argument(
        "--promoted-steps",
        type=ranged(int, PROMOTED_EVALS, what="a number of steps"),
        default=PROMOTED_STEPS,
        metavar="N",
        help=f"train.max_steps of the promoted runs, set through the study's fixed overrides (default {PROMOTED_STEPS}, at least {PROMOTED_EVALS}; demo-full's own is longer)",
    )
    parser.add_argument("-o", "--override", action="append", default=[], help="dotted recipe override (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = Path(args.recipe)
    CLOCK.restart()
    start = CLOCK.start
    root = stage_world(recipe_path, out, args.override)
    stage_inspect(root, out)
    stage_batch(recipe_path, root, args.override)
    status = 0
    if not args.no_search:
        stage_backbone(recipe_path, root, args.override)
        status, _ = stage_search(Path(args.space), root, out)
        search_dir = (out / "search").resolve()
        if status == 0:
            status = stage_promote(search_dir, root, out, args.promoted_steps, args.top_k)
        status = max(status, stage_importance(search_dir))
    CLOCK.done()
    print(f"\ndemo finished in {format_duration(time.perf_counter() - start)}; outputs under {out}/ ({disk_usage(out)})")
    return status


if __name__ == "__main__":
    sys.exit(main())
