"""Search efficiency: does ASHA + TPE find what a grid finds, and for how much of its compute?

    PYTHONPATH=platform .venv/bin/python bench/search_efficiency.py [--vd-sizes 16 32 64] [--mvm-weights 0.0 0.5 1.0]
        [--seeds 2] [--budget-fraction 0.3] [--max-steps 24] [--grace-period 8] [--metric val/mlm_loss] [--mode min]
        [--out runs/bench/search_efficiency] ...   (--help lists every option)

Two experiments over the demo's SOHO knobs (``model.vd.size`` x
``objectives.mvm.weight``) on a shrunk demo-light (the synthetic world at
small size, a few dozen steps per trial), both through ``vlptune search``'s
own code path (:func:`vlptune.search.runner.run_search`: Ray Tune trials,
each a Ray Train run of the one training loop):

* **grid**: every point x every seed (``train.seed`` searched too) to
  ``train.max_steps``: the platform's ``grid`` searcher, FIFO (no stopping);
* **search**: the same values with TPE and ASHA, one seed (the first grid
  seed), ``num_samples`` sized so its *expected* compute under ASHA is
  ``budget_fraction`` of the grid's (:func:`search_samples`).

Then, from the trials' records (:func:`records_from_experiment`):
compute each spent (trial-steps: the sum of the last step each trial
reported; the trials' own wall seconds; the experiment's wall clock), the
best each reached, and their ratios (:func:`compare`). The best is judged on
the same footing for both: the grid's best point is the one with the best
mean over seeds; the search's pick is its best completed trial, and what the
pick is worth is that point's grid mean (so a lucky seed does not count).
The raw best trial of each (seed-matched: grid trials at the search's seed)
is printed too. Target (issue 17): the pick within 1% of the grid's best
with at most 30% of its trial-steps.

``--grid-from OUT`` compares a new search (another ``--searcher-seed``,
``--budget-fraction``, ...) against a previous run's grid instead of
training the grid again (the options that decide the grid's trials must
match; its wall clock is the one measured then).

Writes ``OUT/results.json`` and prints one table. The pure parts (plan,
accounting, comparison, table) are tested on hand-made records in
tests/test_search_efficiency.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlptune.io import atomic_write_text, finite

REPO = Path(__file__).resolve().parents[1]
BASE_RECIPE = REPO / "trials" / "demo-light.yaml"
VD_PATH = "model.vd.size"
MVM_PATH = "objectives.mvm.weight"
SEED_PATH = "train.seed"
GRID_NAME = "grid"
SEARCH_NAME = "search"
RESULTS_FILE = "results.json"


class Options(BaseModel):
    """Every choice of the benchmark (each a ``--flag``; lists take several values)."""

    model_config = ConfigDict(extra="forbid")

    vd_sizes: list[int] = Field([16, 32, 64], min_length=1, description="visual dictionary sizes of the grid (model.vd.size, each > 0)")
    mvm_weights: list[float] = Field([0.0, 0.5, 1.0], min_length=1, description="MVM loss weights of the grid (objectives.mvm.weight)")
    seeds: int = Field(2, ge=1, le=10, description="seeds per grid point (train.seed = seed_base + i)")
    seed_base: int = Field(0, ge=0, description="train.seed of the first grid seed; the search trains with it")
    budget_fraction: float = Field(0.3, gt=0.0, le=1.0, description="the search's expected trial-steps as a share of the grid's")
    max_steps: int = Field(24, ge=2, description="train.max_steps of every trial (the maximum fidelity)")
    grace_period: int = Field(8, ge=1, description="ASHA's first rung, in steps (also train.eval_every)")
    reduction_factor: int = Field(3, ge=2, description="ASHA's reduction factor (the top 1/r of a rung go on)")
    n_startup_trials: int = Field(3, ge=1, description="TPE's random trials before it models the space")
    searcher_seed: int = Field(0, ge=0, description="TPE's seed")
    # val/mlm_loss: continuous where MLM accuracy at a few dozen steps is mostly the majority token's share (ties)
    metric: str = Field("val/mlm_loss", description="the metric both experiments rank by (any the loop reports at an evaluation)")
    mode: Literal["max", "min"] = Field("min", description="max or min of the metric")
    max_concurrent: int = Field(2, ge=1, description="trials at once (1 worker x 1 CPU each)")
    train_images: int = Field(96, ge=8, description="synthetic world: training images")
    val_images: int = Field(24, ge=4, description="synthetic world: validation images")
    image_size: int = Field(64, ge=32, description="synthetic images and data.image_size (pixels, shorter side)")
    batch_images: int = Field(4, ge=1, description="images per training step (data.batch_images)")
    tolerance: float = Field(0.01, ge=0.0, lt=1.0, description="target: the search's pick within this share of the grid's best")
    compute_target: float = Field(0.3, gt=0.0, le=1.0, description="target: the search's trial-steps at most this share of the grid's")
    out: Path = Field(Path("runs/bench/search_efficiency"), description="output directory (experiments, data, results.json); must not hold a previous run")
    grid_from: Path | None = Field(
        None, description="a previous run's output directory: compare against its grid (same grid options) instead of training it again"
    )


# What every trial fixes besides the options, as tests/helpers.py's tiny_loop_fixed does: no warm-up
# (a few dozen steps), a small evaluation (16x16 pairs scored, 2 loss batches) and a VD picture of
# 2 codes (logged, not ranked).
CHEAP_TRIAL: dict[str, Any] = {"optim.warmup_steps": 0, "eval.max_images": 16, "eval.loss_batches": 2, "eval.vd_picture_codes": 2}
LONG_SIDE_RATIO = 1.5  # data.max_long_side over data.image_size, as tiny_loop_fixed's 64 -> 96

# The options that decide what the grid's trials train and report: a reused grid must match them.
GRID_OPTIONS = (
    "vd_sizes",
    "mvm_weights",
    "seeds",
    "seed_base",
    "max_steps",
    "grace_period",
    "metric",
    "mode",
    "train_images",
    "val_images",
    "image_size",
    "batch_images",
)


# ------------------------------------------------------------------ the plan


def grid_points(opts: Options) -> list[tuple[int, float]]:
    """Every (VD size, MVM weight) of the grid, in order."""
    return [(vd, w) for vd in opts.vd_sizes for w in opts.mvm_weights]


def grid_trial_steps(opts: Options) -> int:
    """The grid's compute: every point x every seed to the maximum fidelity."""
    return len(grid_points(opts)) * opts.seeds * opts.max_steps


def rungs(max_steps: int, grace_period: int, reduction_factor: int) -> list[int]:
    """ASHA's milestones below the maximum fidelity: grace, grace*r, ... (< max_steps)."""
    out, t = [], grace_period
    while t < max_steps:
        out.append(t)
        t *= reduction_factor
    return out


def expected_asha_steps(max_steps: int, grace_period: int, reduction_factor: int) -> float:
    """Expected steps of one ASHA trial if each rung keeps exactly 1/r of the trials that reach it
    (asynchronous ASHA promotes more while few trials have reported, so the measured figure may be higher)."""
    marks = [*rungs(max_steps, grace_period, reduction_factor), max_steps]
    total, prev, share = 0.0, 0, 1.0
    for mark in marks:
        total += share * (mark - prev)
        prev, share = mark, share / reduction_factor
    return total


def search_samples(opts: Options) -> int:
    """The search's num_samples: as many trials as fit ``budget_fraction`` of the grid's trial-steps at ASHA's expected cost."""
    per_trial = expected_asha_steps(opts.max_steps, opts.grace_period, opts.reduction_factor)
    return max(1, int(opts.budget_fraction * grid_trial_steps(opts) / per_trial + 1e-9))


def _fixed(opts: Options, data_root: Path) -> dict[str, Any]:
    """``fixed:`` paths shrinking demo-light to a cheap trial (the pattern of tests/helpers.py ``tiny_loop_fixed``)."""
    return {
        "data.root": str(data_root),
        "data.synth": {"train": opts.train_images, "val": opts.val_images, "test": 0, "image_size": opts.image_size, "seed": 0, "caption_style": "descriptive"},
        "data.image_size": opts.image_size,
        "data.max_long_side": int(opts.image_size * LONG_SIDE_RATIO),
        "data.batch_images": opts.batch_images,
        "train.max_steps": opts.max_steps,
        "train.eval_every": opts.grace_period,
        "train.log_every": opts.grace_period,
        "train.keep_when_done": "none",
        **CHEAP_TRIAL,
    }


def space_specs(opts: Options, data_root: Path) -> dict[str, dict[str, Any]]:
    """The two search-space files (as mappings): the grid and ASHA + TPE over the same values."""
    common = {
        "base": str(BASE_RECIPE),
        "metric": opts.metric,
        "mode": opts.mode,
        "max_concurrent": opts.max_concurrent,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "failures": {"max_failures": 1},
    }
    values = {VD_PATH: {"categorical": list(opts.vd_sizes)}, MVM_PATH: {"categorical": list(opts.mvm_weights)}}
    grid = {
        **common,
        "name": GRID_NAME,
        "num_samples": len(grid_points(opts)) * opts.seeds,
        "scheduler": {"type": "fifo"},
        "searcher": {"type": "grid", "seed": opts.searcher_seed},
        "fixed": _fixed(opts, data_root),
        "parameters": {**values, SEED_PATH: {"categorical": [opts.seed_base + i for i in range(opts.seeds)]}},
    }
    search = {
        **common,
        "name": SEARCH_NAME,
        "num_samples": search_samples(opts),
        "scheduler": {"type": "asha", "grace_period": opts.grace_period, "reduction_factor": opts.reduction_factor},
        "searcher": {"type": "tpe", "seed": opts.searcher_seed, "multivariate": True, "constant_liar": True, "n_startup_trials": opts.n_startup_trials},
        "fixed": {**_fixed(opts, data_root), SEED_PATH: opts.seed_base},
        "parameters": values,
    }
    return {GRID_NAME: grid, SEARCH_NAME: search}


def grid_mismatch(opts: Options, previous: dict[str, Any]) -> list[str]:
    """What differs between ``opts`` and a previous run's options (its results.json) among :data:`GRID_OPTIONS`."""
    now = json.loads(opts.model_dump_json(include=set(GRID_OPTIONS)))
    return [f"{k}: {previous.get(k)!r} there, {now[k]!r} here" for k in GRID_OPTIONS if previous.get(k) != now[k]]


# ------------------------------------------------------------------ records and accounting


@dataclass
class TrialRecord:
    """One finished trial: its point, seed, the last step it reported, its final metric, its wall seconds."""

    vd_size: int
    mvm_weight: float
    seed: int
    steps: int
    metric: float | None
    wall_s: float
    status: str  # completed | pruned | ... (vlptune results' words)

    @property
    def point(self) -> tuple[int, float]:
        return (self.vd_size, self.mvm_weight)


@dataclass
class Compute:
    trials: int
    trial_steps: int
    trial_wall_s: float  # sum of the trials' own wall seconds
    wall_s: float  # the experiment's wall clock


def account(records: list[TrialRecord], wall_s: float) -> Compute:
    """What an experiment spent: trial-steps (the last step each trial reported) and seconds."""
    return Compute(len(records), sum(r.steps for r in records), sum(r.wall_s for r in records), wall_s)


def records_from_experiment(exp_dir: Path, seed: int | None = None) -> list[TrialRecord]:
    """The trials of a finished experiment, read as ``vlptune results`` reads them; ``seed``: the
    train.seed of trials that do not search it."""
    from vlptune.search.results import collect  # imports the search package: only when an experiment is read

    out = []
    for row in collect(exp_dir).rows:
        if row.fidelity is None:
            continue  # never reported: no compute to count, no metric
        out.append(
            TrialRecord(
                vd_size=int(row.params[VD_PATH]),
                mvm_weight=float(row.params[MVM_PATH]),
                seed=int(row.params.get(SEED_PATH, seed if seed is not None else -1)),
                steps=row.fidelity,
                metric=float(row.metric) if finite(row.metric) else None,
                wall_s=float(row.wall_s or 0.0),
                status=row.status,
            )
        )
    return out


# ------------------------------------------------------------------ the comparison


@dataclass
class Comparison:
    metric: str
    mode: str
    grid: Compute
    search: Compute
    grid_best_point: tuple[int, float]
    grid_best: float  # mean over seeds of the grid's best point
    search_pick: tuple[int, float] | None  # the search's best completed trial's point
    search_pick_value: float | None  # what the pick is worth: its point's grid mean
    search_best_trial: float | None  # the raw metric of that trial
    grid_best_trial_same_seed: float | None  # the grid's best trial at the search's seed
    quality_ratio: float | None  # pick's grid mean / grid best (for min: grid best / pick's)
    compute_ratio: float  # trial-steps, search / grid
    wall_ratio: float  # experiment wall clock, search / grid
    trial_wall_ratio: float  # sum of the trials' wall seconds, search / grid
    quality_met: bool
    compute_met: bool
    point_means: dict[str, float]  # "vd/mvm" -> grid mean over seeds
    grid_points: int  # distinct points each experiment trained (the search's searcher may repeat one)
    search_points: int


def _better(mode: str):
    return max if mode == "max" else min


def point_means(grid: list[TrialRecord], max_steps: int) -> dict[tuple[int, float], float]:
    """Each grid point's mean metric over its seeds that completed with a finite metric."""
    by_point: dict[tuple[int, float], list[float]] = {}
    for r in grid:
        if r.steps >= max_steps and r.metric is not None:
            by_point.setdefault(r.point, []).append(r.metric)
    return {p: mean(v) for p, v in by_point.items()}


def _ratio(value: float, best: float, mode: str) -> float:
    """How close ``value`` is to ``best`` as a share (1.0 = as good; below 1 = worse), for either mode."""
    if mode == "max":
        return value / best if best else (1.0 if value == best else math.inf)
    return best / value if value else (1.0 if value == best else math.inf)


def compare(
    grid: list[TrialRecord],
    search: list[TrialRecord],
    *,
    metric: str,
    mode: str,
    max_steps: int,
    search_seed: int,
    grid_wall_s: float,
    search_wall_s: float,
    tolerance: float,
    compute_target: float,
) -> Comparison:
    """The two experiments side by side (see the module docstring for how each best is judged)."""
    pick = _better(mode)
    means = point_means(grid, max_steps)
    if not means:
        raise ValueError("no grid point completed with a finite metric: nothing to compare against")
    best_point = pick(means, key=lambda p: means[p])
    done = [r for r in search if r.steps >= max_steps and r.metric is not None]
    best_trial = pick(done, key=lambda r: r.metric) if done else None
    pick_point = best_trial.point if best_trial else None
    pick_value = means.get(pick_point) if pick_point is not None else None
    same_seed = [r.metric for r in grid if r.seed == search_seed and r.steps >= max_steps and r.metric is not None]
    g, s = account(grid, grid_wall_s), account(search, search_wall_s)
    quality = _ratio(pick_value, means[best_point], mode) if pick_value is not None else None
    compute_ratio = s.trial_steps / g.trial_steps if g.trial_steps else math.inf
    return Comparison(
        metric=metric,
        mode=mode,
        grid=g,
        search=s,
        grid_best_point=best_point,
        grid_best=means[best_point],
        search_pick=pick_point,
        search_pick_value=pick_value,
        search_best_trial=best_trial.metric if best_trial else None,
        grid_best_trial_same_seed=pick(same_seed) if same_seed else None,
        quality_ratio=quality,
        compute_ratio=compute_ratio,
        wall_ratio=s.wall_s / g.wall_s if g.wall_s else math.inf,
        trial_wall_ratio=s.trial_wall_s / g.trial_wall_s if g.trial_wall_s else math.inf,
        quality_met=quality is not None and quality >= 1.0 - tolerance,
        compute_met=compute_ratio <= compute_target,
        point_means={f"{vd}/{w:g}": v for (vd, w), v in sorted(means.items())},
        grid_points=len({r.point for r in grid}),
        search_points=len({r.point for r in search}),
    )


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _pt(point: tuple[int, float] | None) -> str:
    return "-" if point is None else f"vd {point[0]}, mvm {point[1]:g}"


def format_report(c: Comparison, tolerance: float, compute_target: float) -> str:
    """One table: each experiment's best and compute, then the ratios and whether the targets were met."""
    rows = [
        ("", "grid", "ASHA+TPE", "ratio"),
        ("trials", str(c.grid.trials), str(c.search.trials), ""),
        ("distinct points", str(c.grid_points), str(c.search_points), ""),
        ("trial-steps", str(c.grid.trial_steps), str(c.search.trial_steps), f"{c.compute_ratio:.3f}"),
        ("trials' wall s (sum)", f"{c.grid.trial_wall_s:.0f}", f"{c.search.trial_wall_s:.0f}", f"{c.trial_wall_ratio:.3f}"),
        ("experiment wall s", f"{c.grid.wall_s:.0f}", f"{c.search.wall_s:.0f}", f"{c.wall_ratio:.3f}"),
        ("best point", _pt(c.grid_best_point), _pt(c.search_pick), ""),
        (f"{c.metric} of it (grid mean)", _num(c.grid_best), _num(c.search_pick_value), _num(c.quality_ratio)),
        ("best trial, seed-matched", _num(c.grid_best_trial_same_seed), _num(c.search_best_trial), ""),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    q = "met" if c.quality_met else "NOT met"
    k = "met" if c.compute_met else "NOT met"
    lines.append(f"target: pick within {100 * tolerance:g}% of the grid's best ({q}), at most {100 * compute_target:g}% of its trial-steps ({k})")
    return "\n".join(lines)


def results_payload(opts: Options, c: Comparison, grid: list[TrialRecord], search: list[TrialRecord]) -> dict[str, Any]:
    return {
        "options": json.loads(opts.model_dump_json()),
        "comparison": asdict(c),
        "grid_trials": [asdict(r) for r in grid],
        "search_trials": [asdict(r) for r in search],
    }


# ------------------------------------------------------------------ running it


def run_one(spec: dict[str, Any], out: Path) -> tuple[list[TrialRecord], float]:
    """One experiment through ``vlptune search``'s code path; its trial records and wall seconds."""
    from vlptune.search.runner import run_search  # imports Ray: only when the benchmark runs

    name = spec["name"]
    space_file = out / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    exp_dir = out / name
    start = time.perf_counter()
    run_search(space_file, exp_dir=exp_dir, num_cpus=spec["max_concurrent"])
    wall = time.perf_counter() - start
    seed = spec["fixed"].get(SEED_PATH)
    return records_from_experiment(exp_dir, seed), wall


def run(opts: Options) -> Comparison:
    out = opts.out.resolve()
    if any((out / n).exists() for n in (GRID_NAME, SEARCH_NAME, RESULTS_FILE)):
        raise SystemExit(f"{out} holds a previous run; give another --out")
    previous = None
    if opts.grid_from is not None:
        previous = json.loads((opts.grid_from / RESULTS_FILE).read_text())
        problems = grid_mismatch(opts, previous["options"])
        if problems:
            raise SystemExit(f"{opts.grid_from}: its grid was trained with other options:\n  " + "\n  ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    # a reused grid: the search trains on its world (the same synthetic seed would rebuild the same one)
    specs = space_specs(opts, (opts.grid_from.resolve() if opts.grid_from else out) / "data")
    print(
        f"grid: {len(grid_points(opts))} points x {opts.seeds} seeds = {specs[GRID_NAME]['num_samples']} trials, "
        f"{grid_trial_steps(opts)} trial-steps; ASHA+TPE: {specs[SEARCH_NAME]['num_samples']} samples "
        f"(expected {expected_asha_steps(opts.max_steps, opts.grace_period, opts.reduction_factor):.1f} steps each)",
        flush=True,
    )
    if opts.grid_from is not None and previous is not None:
        grid, grid_wall = records_from_experiment(opts.grid_from.resolve() / GRID_NAME), float(previous["comparison"]["grid"]["wall_s"])
        print(f"grid: {len(grid)} trials of {opts.grid_from / GRID_NAME}, not trained again", flush=True)
    else:
        grid, grid_wall = run_one(specs[GRID_NAME], out)
    search, search_wall = run_one(specs[SEARCH_NAME], out)
    c = compare(
        grid,
        search,
        metric=opts.metric,
        mode=opts.mode,
        max_steps=opts.max_steps,
        search_seed=opts.seed_base,
        grid_wall_s=grid_wall,
        search_wall_s=search_wall,
        tolerance=opts.tolerance,
        compute_target=opts.compute_target,
    )
    atomic_write_text(out / RESULTS_FILE, json.dumps(results_payload(opts, c, grid, search), indent=2) + "\n")
    print(format_report(c, opts.tolerance, opts.compute_target))
    print(f"results: {out / RESULTS_FILE}")
    return c


def parser() -> argparse.ArgumentParser:
    """One ``--flag`` per :class:`Options` field (values are validated by the model, not argparse)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, info in Options.model_fields.items():
        is_list = typing.get_origin(info.annotation) is list
        ap.add_argument(
            f"--{name.replace('_', '-')}", dest=name, nargs="+" if is_list else None, default=None, help=f"{info.description} (default {info.default})"
        )
    return ap


def parse_options(argv: list[str] | None = None) -> Options:
    args = parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        opts = Options.model_validate(given)
    except ValidationError as exc:
        raise SystemExit(f"invalid options:\n{exc}") from None
    if any(v <= 0 for v in opts.vd_sizes):
        raise SystemExit("--vd-sizes: every size must be > 0 (MVM predicts the VD's codes)")
    if opts.grace_period >= opts.max_steps:
        raise SystemExit(f"--grace-period {opts.grace_period} must be below --max-steps {opts.max_steps} (else ASHA never stops a trial)")
    return opts


def main(argv: list[str] | None = None) -> int:
    run(parse_options(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
