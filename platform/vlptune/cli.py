"""The `vlptune` command: a thin dispatcher.

Each package contributes its sub-commands through an ``add_commands(subparsers)``
function in its own ``cli`` module (listed in :data:`COMMAND_MODULES`), so a new
command group never edits this file's logic.

Bad input is reported here, once for every command (:func:`vlptune.cliutil.run_parsed`):
an error of one of the project's user-facing classes (:mod:`vlptune.errors`) becomes
``vlptune: <message>`` on stderr and exit code 2, never a traceback.
``add_override_arg`` (from :mod:`vlptune.cliutil`) stays importable from here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from vlptune.cliutil import add_override_arg, run_parsed
from vlptune.config import dump_recipe, json_schema, load_recipe
from vlptune.io import atomic_write_text

COMMAND_MODULES = (
    "vlptune.data.cli",
    "vlptune.train.cli",
    "vlptune.search.backbone",
    "vlptune.tasks.cli",
    "vlptune.search.cli",
    "vlptune.search.finetune",
    "vlptune.cluster.cli",
    "vlptune.study.ablation_cli",
    "vlptune.study.promote_cli",
)


def _config_show(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.override)
    sys.stdout.write(dump_recipe(recipe))
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="show resolved recipes and the recipe JSON schema")
    csub = config.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print a recipe with base: and overrides resolved")
    show.add_argument("recipe", help="recipe YAML file, e.g. trials/demo-light.yaml")
    add_override_arg(show)
    show.set_defaults(func=_config_show)
    schema = csub.add_parser("schema", help="print the JSON schema of recipe files (for editors)")
    schema.add_argument("--out", help="write the schema to this file instead of stdout")
    schema.set_defaults(func=_config_schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlptune",
        description="Hyperparameter search and ablations of end-to-end vision-language pretraining on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_commands(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_parsed(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
