"""Helpers shared by the command-line modules of every package (below :mod:`vlptune.cli`, which any of them may use).

* :func:`add_override_arg`: the ``-o PATH=VALUE`` flag of commands that take a recipe;
* :func:`run_parsed`: run a parsed command, reporting bad input (:mod:`vlptune.errors`)
  as ``vlptune: <message>`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from vlptune.errors import EXIT_USER_ERROR, is_user_error

RECIPE_OVERRIDE_HELP = "dotted override of a recipe field, e.g. -o model.vd.size=4096 (repeatable)"


def add_override_arg(parser: argparse.ArgumentParser, help: str = RECIPE_OVERRIDE_HELP) -> None:
    """``-o/--override PATH=VALUE``, repeatable, collected in ``args.override``."""
    parser.add_argument("-o", "--override", action="append", default=[], metavar="PATH=VALUE", help=help)


def run_parsed(args: argparse.Namespace) -> int:
    """Run ``args.func(args)``; a user-facing error becomes one line on stderr and :data:`EXIT_USER_ERROR`."""
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"vlptune: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
