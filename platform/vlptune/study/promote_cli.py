"""``vlptune promote`` (promotion, its run and its report) and ``vlptune importance``.

Wired into ``vlptune`` by listing ``"vlptune.study.promote_cli"`` in
``vlptune.cli.COMMAND_MODULES``; each parser's ``func`` takes the parsed
Namespace and returns the exit code; a ``PromotionError``, ``StudyError`` or
``ImportanceError`` reaches :func:`vlptune.cli.main`, which prints it
(``vlptune: ...``, exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from vlptune.config import parse_override
from vlptune.search.layout import read_meta
from vlptune.study import importance as imp
from vlptune.study import promote as pr
from vlptune.study import promote_report as rep

DEFAULT_TOP_K = 3
DEFAULT_SEEDS = 1
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_RUN_STORAGE = "runs/promoted"


def ranged(kind: Callable[[str], Any], low: float | None = None, high: float | None = None, what: str = "value") -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` within [low, high], with a message naming the range."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} ({kind.__name__}), got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if low is not None and high is not None else (f"at least {low}" if low is not None else f"at most {high}")
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {value}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _fixed(texts: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in texts:
        parts, value = parse_override(text)
        out[".".join(parts)] = value
    return out


def _promote(args: argparse.Namespace) -> int:
    if args.report:
        if args.exp_dir or args.run or args.to:
            print("error: --report PROMOTED_EXP reads a promoted run; give no EXP_DIR, --to or --run with it", file=sys.stderr)
            return 2
        report, promotion = rep.collect_report(args.report, min_correlation=args.min_correlation)
        print(rep.report_header(promotion, args.report))
        text = rep.format_report(report)
        print(text)
        path = rep.write_report(args.report, promotion, report)
        print(f"written: {path}")
        return 0
    if not args.exp_dir or not args.to:
        print(
            "error: give the search experiment and the target recipe: vlptune promote EXP_DIR --to trials/full.yaml (or --report PROMOTED_EXP)", file=sys.stderr
        )
        return 2
    promotion = pr.promote(args.exp_dir, top_k=args.top_k, target=args.to, fidelity_map=args.map, promoted_dir=args.promoted_dir)
    print(pr.format_promotion(promotion, requested=args.top_k))
    if not args.run:
        extra = (f" --map {args.map}" if args.map != str(pr.DEFAULT_MAP) else "") + (f" --promoted-dir {args.promoted_dir}" if args.promoted_dir else "")
        print(f"run them with: vlptune promote {args.exp_dir} --top-k {args.top_k} --to {args.to}{extra} --run --seeds S")
        return 0
    fixed = _fixed(args.fixed)
    resources = {
        k: v for k, v in (("workers", args.workers), ("cpus_per_worker", args.cpus_per_worker), ("gpus_per_worker", args.gpus_per_worker)) if v is not None
    }
    spec = pr.promotion_study(promotion, seeds=args.seeds, fixed=fixed, resources=resources, max_concurrent=args.max_concurrent, name=args.name)
    print(spec.describe())
    print(pr.run_note(promotion, fixed))
    from vlptune.study.ablation import default_exp_dir  # scipy (via study.stats): heavy, only when a study runs or is read

    exp_dir = default_exp_dir(spec, args.storage, args.name)
    print(f"experiment directory: {exp_dir}", flush=True)
    pr.run_promotion(promotion, spec, exp_dir=exp_dir, address=args.address, verbose=args.verbose)
    report, _ = rep.collect_report(exp_dir, min_correlation=args.min_correlation)
    print(rep.report_header(promotion, exp_dir))
    print(rep.format_report(report))
    print(f"written: {rep.write_report(exp_dir, promotion, report)}; again with: vlptune promote --report {exp_dir}")
    return 0


def _importance(args: argparse.Namespace) -> int:
    results = imp.importances(
        args.exp_dir,
        args.evaluator,
        min_trials=args.min_trials,
        seed=args.seed,
        n_trees=args.n_trees,
        target_quantile=args.target_quantile,
    )
    metric = read_meta(args.exp_dir).get("metric")
    print(imp.format_markdown(results, metric), end="")
    written = imp.write_outputs(args.exp_dir, results, metric)
    print("written: " + ", ".join(str(p) for p in written) + f" (TensorBoard text: vlptune board {args.exp_dir})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote", help="promote the best completed trials of a search onto a full recipe (fidelity map, provenance), run them, report light vs full"
    )
    p.add_argument("exp_dir", nargs="?", help="search experiment directory (printed by `vlptune search`)")
    p.add_argument(
        "--top-k",
        type=ranged(int, 1, what="a number of trials"),
        default=DEFAULT_TOP_K,
        help=f"promote the best K trials that completed the final fidelity (default {DEFAULT_TOP_K}, at least 1)",
    )
    p.add_argument("--to", metavar="RECIPE", help="the target recipe, e.g. trials/full.yaml (the promoted recipes' base:)")
    p.add_argument(
        "--map",
        default=str(pr.DEFAULT_MAP),
        metavar="FILE",
        help=f"fidelity map: how each searched parameter reaches the target (default {pr.DEFAULT_MAP.relative_to(pr.REPO)}; format in docs/promotion.md)",
    )
    p.add_argument(
        "--promoted-dir",
        metavar="DIR",
        help="where promoted recipes go, in <DIR>/<experiment>/<trial>.yaml (default: promoted/ next to the target recipe, e.g. trials/promoted)",
    )
    p.add_argument("--run", action="store_true", help="run the promoted recipes, --seeds each, as one experiment (an ablation study) on the current cluster")
    p.add_argument(
        "--seeds",
        type=ranged(int, 1, what="a number of seeds"),
        default=DEFAULT_SEEDS,
        help=f"--run: seeds per promoted recipe (default {DEFAULT_SEEDS}, at least 1)",
    )
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="--run: a recipe field set for every run but not in the promoted files (e.g. --fixed train.max_steps=2000 for a shorter check); repeatable",
    )
    p.add_argument(
        "--max-concurrent",
        type=ranged(int, 1, what="a number of trials"),
        default=DEFAULT_MAX_CONCURRENT,
        help=f"--run: runs at once (default {DEFAULT_MAX_CONCURRENT}; also bounded by the cluster)",
    )
    p.add_argument(
        "--workers", type=ranged(int, 1, what="a number of workers"), help="--run: Ray Train workers per run (default: the target recipe's resources.workers)"
    )
    p.add_argument("--cpus-per-worker", type=ranged(float, 0.001, what="CPUs"), help="--run: CPUs per worker (default: the target recipe's)")
    p.add_argument("--gpus-per-worker", type=ranged(float, 0.0, what="GPUs"), help="--run: GPUs per worker (default: the target recipe's)")
    p.add_argument("--address", help="--run: Ray cluster to join (e.g. ray://head:10001 or auto); default: a local cluster on 127.0.0.1")
    p.add_argument("--name", help="--run: experiment name (default: promoted-<experiment>-<date>-<time>)")
    p.add_argument("--storage", default=DEFAULT_RUN_STORAGE, help=f"--run: directory holding promoted runs (default {DEFAULT_RUN_STORAGE})")
    p.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="show Ray's and Tune's output on the console: -v Tune's status tables and every worker line, -vv every result too (default: one line per finished trial and a progress bar; the rest goes to EXP_DIR/vlptune.log)",
    )
    p.add_argument("--report", metavar="PROMOTED_EXP", help="compare light and full results of a promoted run: metrics, Spearman and Kendall, winners")
    p.add_argument(
        "--min-correlation",
        type=ranged(float, -1.0, 1.0, what="a correlation"),
        default=rep.DEFAULT_MIN_CORRELATION,
        help=f"report: warn when Spearman's rho is at or below this (default {rep.DEFAULT_MIN_CORRELATION}, in [-1, 1])",
    )
    p.set_defaults(func=_promote)

    q = sub.add_parser("importance", help="hyperparameter importance (fANOVA, PED-ANOVA) from a search's stored Optuna study")
    q.add_argument("exp_dir", help="search experiment directory")
    q.add_argument("--evaluator", choices=imp.EVALUATOR_CHOICES, default="both", help="fanova, ped-anova or both (default both)")
    q.add_argument(
        "--min-trials",
        type=ranged(int, imp.MIN_TRIALS_FLOOR, what="a number of trials"),
        default=imp.DEFAULT_MIN_TRIALS,
        help=f"refuse with fewer completed trials (default {imp.DEFAULT_MIN_TRIALS}, at least {imp.MIN_TRIALS_FLOOR})",
    )
    q.add_argument(
        "--seed", type=ranged(int, 0, 2**31 - 1, what="a seed"), default=imp.DEFAULT_SEED, help=f"fANOVA's random-forest seed (default {imp.DEFAULT_SEED})"
    )
    q.add_argument(
        "--n-trees",
        type=ranged(int, 1, 10_000, what="a number of trees"),
        default=imp.DEFAULT_N_TREES,
        help=f"fANOVA's trees (default {imp.DEFAULT_N_TREES}, Optuna's)",
    )
    q.add_argument(
        "--target-quantile",
        type=ranged(float, 1e-6, 1.0 - 1e-6, what="a fraction"),
        default=imp.DEFAULT_TARGET_QUANTILE,
        help=f"PED-ANOVA: importance for reaching this top fraction of trials (default {imp.DEFAULT_TARGET_QUANTILE}, Optuna's)",
    )
    q.set_defaults(func=_importance)
