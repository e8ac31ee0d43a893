"""``vlptune ablate``: run an ablation study, or re-print its table.

Wired into ``vlptune`` by listing ``"vlptune.study.ablation_cli"`` in
``vlptune.cli.COMMAND_MODULES``. A ``StudyError`` or ``ConfigError`` reaches
:func:`vlptune.cli.main`, which prints it (``vlptune: ...``, exit code 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _ablate(args: argparse.Namespace) -> int:
    from vlptune.study.ablation import (  # scipy (via study.stats): heavy, only when the command runs
        collect_study,
        default_exp_dir,
        load_study,
        run_study,
        write_study_outputs,
    )

    if args.table:
        if args.file or args.resume or args.override:
            print("error: --table EXP_DIR re-prints a study's table; give no study file, --resume or -o with it", file=sys.stderr)
            return 2
        print(write_study_outputs(args.table), end="")
        return 0
    if args.resume:
        if args.override:
            print("error: a resumed study keeps its settings; -o is not accepted with --resume", file=sys.stderr)
            return 2
        spec = load_study(args.file) if args.file else None
        exp_dir: Path | str = Path(args.resume).resolve()
        resume = True
    else:
        if args.file is None:
            print("error: give a study file (or --resume EXP_DIR, or --table EXP_DIR)", file=sys.stderr)
            return 2
        spec = load_study(args.file, args.override)  # refuse a bad file before anything starts
        if args.check:
            print(spec.describe())
            print("OK")
            return 0
        exp_dir = default_exp_dir(spec, args.storage, args.name)  # a directory, or a URI with --storage URI
        resume = False
    print(f"experiment directory: {exp_dir}", flush=True)
    local = run_study(  # the experiment's local directory (a URI study's driver mirror)
        spec,
        exp_dir=exp_dir,
        address=args.address,
        resume=resume,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        verbose=args.verbose,
        worker_log_level=args.worker_log_level,
    )
    results = collect_study(local)
    print((local / "ablation.md").read_text(), end="")
    print(
        f"written: {local / 'ablation.md'}, {local / 'ablation.csv'}; per trial: vlptune results {exp_dir}; "
        f"TensorBoard: vlptune board {exp_dir}; resume with: vlptune ablate --resume {exp_dir}"
    )
    return 0 if any(t.finished for t in results.trials) else 1  # no trial finished: nothing to compare


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="run an ablation study (variants x seeds) and print the table with intervals and Welch's t-tests")
    p.add_argument("file", nargs="?", help="study YAML, e.g. search_spaces/ablations/soho_mvm_demo.yaml (not needed with --resume or --table)")
    p.add_argument("--check", action="store_true", help="validate the study file, print the plan and exit")
    p.add_argument(
        "--table", metavar="EXP_DIR", help="re-read a study's experiment directory, rewrite ablation.md/ablation.csv/TensorBoard text and print the table"
    )
    p.add_argument("--address", help="Ray cluster to join (e.g. ray://head:10001 or auto); default: start a local cluster on 127.0.0.1")
    p.add_argument("--name", help="experiment name (default: <study name>-<date>-<time>)")
    p.add_argument("--storage", help="directory holding experiments (default: runs/ablation)")
    p.add_argument("--resume", metavar="EXP_DIR", help="continue an interrupted study: finished trials are kept, unfinished ones resume from their checkpoints")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all of this machine's)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local cluster (default: detected)")
    p.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="show Ray's and Tune's output on the console: -v Tune's status tables and every worker line, -vv every result too (default: one line per finished trial and a progress bar; the rest goes to EXP_DIR/vlptune.log)",
    )
    p.add_argument(
        "--worker-log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level of the training workers on the console"
    )
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="a recipe field applied to every variant (-o train.max_steps=30), or a study setting "
        "(-o seeds=2, -o max_concurrent=1, -o 'variants.vd-64={model.vd.size: 64}'); repeatable",
    )
    p.set_defaults(func=_ablate)
