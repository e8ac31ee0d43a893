"""Sub-commands of the search: ``space check``, ``search``, ``results``, ``board``.

Wired into ``vlptune`` by listing ``"vlptune.search.cli"`` in
``vlptune.cli.COMMAND_MODULES``; each parser's ``func`` takes the parsed
Namespace and returns the exit code; a ``SearchError`` or ``ConfigError`` reaches
:func:`vlptune.cli.main`, which prints it (``vlptune: ...``, exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlptune.cliutil import add_override_arg, run_parsed
from vlptune.cluster.storage import is_uri
from vlptune.search import results as res
from vlptune.search.board import serve_forever
from vlptune.search.layout import default_exp_dir, experiment_location
from vlptune.search.location import DEFAULT_MIRROR_ROOT
from vlptune.search.runner import run_search
from vlptune.search.space import load_space

KEEP_PRUNED_OVERRIDE = "train.keep_when_stopped=last"  # what --keep-pruned means

SPACE_OVERRIDE_HELP = (
    "a recipe field applied to every trial (-o train.max_steps=30), or a space setting "
    "(-o num_samples=4, -o scheduler.grace_period=10, -o searcher.seed=3); repeatable"
)


def _override_arg(parser: argparse.ArgumentParser) -> None:
    add_override_arg(parser, SPACE_OVERRIDE_HELP)


def _mirror_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mirror-dir",
        default=None,
        metavar="DIR",
        help="local root for URI experiments: the search driver's files and Optuna study (DIR/driver/...), and the "
        f"copies results/board download (DIR/view/...); default: {DEFAULT_MIRROR_ROOT}",
    )


def _space_check(args: argparse.Namespace) -> int:
    space = load_space(args.file, args.override)
    print(space.describe())
    print(f"  corners checked: {len(space.corner_values())} recipe(s) validated")
    print("OK")
    return 0


def _search(args: argparse.Namespace) -> int:
    common = {
        "address": args.address,
        "num_cpus": args.num_cpus,
        "num_gpus": args.num_gpus,
        "verbose": args.verbose,
        "worker_log_level": args.worker_log_level,
        "mirror_dir": args.mirror_dir,
        "shared_storage": args.shared_storage,
    }
    overrides = [*args.override, KEEP_PRUNED_OVERRIDE] if args.keep_pruned else args.override
    if args.resume:
        if args.keep_pruned:
            print("error: --keep-pruned applies to a new search (a resumed one keeps its saved settings)", file=sys.stderr)
            return 2
        grid = run_search(args.file, exp_dir=args.resume, resume=True, **common)
        exp_dir = args.resume if is_uri(args.resume) else Path(args.resume).resolve()
    else:
        if args.file is None:
            print("error: give a search-space file (or --resume EXP_DIR)", file=sys.stderr)
            return 2
        space = load_space(args.file, overrides)  # refuse a bad file before anything starts
        exp_dir = default_exp_dir(space, args.storage, args.name)
        if is_uri(str(exp_dir)):
            mirror = experiment_location(exp_dir, args.mirror_dir).local
            print(f"experiment: {exp_dir} (the driver's files and the Optuna study: {mirror}, uploaded there)", flush=True)
        else:
            print(f"experiment directory: {exp_dir}", flush=True)
        grid = run_search(args.file, exp_dir=exp_dir, overrides=overrides, **common)
    collected = res.collect(exp_dir, args.mirror_dir)
    print(res.summary(collected))
    print(res.format_table(collected))
    print(f"resume with: vlptune search --resume {exp_dir}; compare with: vlptune board {exp_dir}")
    return 1 if grid.num_errors and grid.num_errors == len(grid) else 0


def _results(args: argparse.Namespace) -> int:
    collected = res.collect(args.exp_dir, args.mirror_dir)
    print(res.summary(collected))
    print(res.format_table(collected))
    if args.csv:
        res.write_csv(collected, args.csv)
        print(f"wrote {args.csv}")
    if args.json:
        res.write_json(collected, args.json)
        print(f"wrote {args.json}")
    if args.startup:
        print()
        print(res.format_startup(collected))
    if not args.no_recipe:
        print()
        print(res.format_best(collected), end="")
    return 0


def _board(args: argparse.Namespace) -> int:
    return serve_forever(args.exp_dir, args.port, args.mirror_dir)


def add_commands(sub: argparse._SubParsersAction) -> None:
    space = sub.add_parser("space", help="check search-space files")
    ssub = space.add_subparsers(dest="space_command", required=True)
    check = ssub.add_parser("check", help="validate a search-space file against the recipe schema and print what will be searched")
    check.add_argument("file", help="search-space YAML, e.g. search_spaces/demo.yaml")
    _override_arg(check)
    check.set_defaults(func=_space_check)

    search = sub.add_parser("search", help="run (or resume) a hyperparameter search on Ray Tune")
    search.add_argument("file", nargs="?", help="search-space YAML (not needed with --resume)")
    search.add_argument(
        "--address",
        help="Ray cluster to join (auto, HEAD:6379, ray://HEAD:10001); default: $RAY_ADDRESS when set to a cluster "
        "(inside a Ray job it is the job's cluster), else start a local cluster on 127.0.0.1; the cluster joined is printed",
    )
    search.add_argument("--name", help="experiment name (default: <space name>-<date>-<time>)")
    search.add_argument(
        "--storage",
        help="where experiments go: a directory (default: runs/search), or a URI pyarrow opens (s3://BUCKET/DIR, "
        "gs://BUCKET/DIR, abfs://..., file:///DIR); on a cluster of several nodes a directory must be on a filesystem "
        "every node mounts (NFS, Lustre, CephFS...)",
    )
    search.add_argument(
        "--shared-storage",
        action="store_true",
        help="accept a --storage directory on a multi-node cluster although its filesystem type is not one known to be "
        "shared (you know every node mounts it at the same path); default: refuse it",
    )
    _mirror_arg(search)
    search.add_argument(
        "--resume",
        metavar="EXP_DIR",
        help="continue an interrupted experiment (a directory or a URI): finished trials are kept, unfinished ones resume from their checkpoints. "
        "Ray Tune's restore unpickles the experiment's tuner.pkl and search-state files: resume only experiments you trust "
        "(reading commands such as results, board, promote, importance unpickle nothing; docs/search.md, 'Trust boundary')",
    )
    search.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all of this machine's)")
    search.add_argument("--num-gpus", type=int, help="GPUs of the local cluster (default: detected)")
    search.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="show Ray's and Tune's output on the console: -v Tune's status tables and every worker line, -vv every result too (default: one line per finished trial and a progress bar; the rest goes to EXP_DIR/vlptune.log)",
    )
    search.add_argument(
        "--worker-log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="log level of the training workers on the console (INFO shows the loop's step lines); full logs stay in Ray's session directory",
    )
    _override_arg(search)
    search.add_argument(
        "--keep-pruned",
        action="store_true",
        help="keep the last checkpoint of every trial that ends before train.max_steps (pruned by the scheduler, stopped, failed): "
        f"the same as -o {KEEP_PRUNED_OVERRIDE}; by default they are removed when the trial ends (train.keep_when_stopped=none)",
    )
    search.set_defaults(func=_search)

    results = sub.add_parser("results", help="table of a search's trials, sorted by the metric, and the best trial's recipe")
    results.add_argument("exp_dir", help="experiment directory or URI (printed by `vlptune search`)")
    _mirror_arg(results)
    results.add_argument("--csv", help="also write the table to this CSV file")
    results.add_argument("--json", help="also write trials, histories and the best recipe to this JSON file")
    results.add_argument("--startup", action="store_true", help="also print where the trials' start-up went (Ray, imports, model, data, first step)")
    results.add_argument("--no-recipe", action="store_true", help="do not print the best trial's full recipe")
    results.set_defaults(func=_results)

    board = sub.add_parser("board", help="TensorBoard over a search (one run per trial, HParams compare), on 127.0.0.1")
    board.add_argument("exp_dir", help="experiment directory or URI (a URI is downloaded once, when the board starts)")
    _mirror_arg(board)
    board.add_argument("--port", type=int, default=6006, help="port on 127.0.0.1 (0: any free port)")
    board.set_defaults(func=_board)


def main(argv: list[str] | None = None) -> int:
    """``python -m vlptune.search.cli ...``: these sub-commands on their own (the `vlptune` command wires the same parsers)."""
    parser = argparse.ArgumentParser(prog="vlptune")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return run_parsed(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
