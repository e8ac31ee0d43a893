"""Finding experiments on disk, for the messages of commands given a wrong directory.

Every experiment (a search, an ablation study, a promoted run) holds a
``vlptune_search.json`` (:data:`vlptune.search.runner.META_FILE`). The commands
write them under :data:`EXPERIMENTS_ROOT` of the working directory by default
(``runs/search/NAME``, ``runs/ablation/NAME``, ``runs/promoted/NAME``; the demo:
``runs/demo/search`` and ``runs/demo/promoted``). When ``results``, ``board``,
``promote``, ``importance`` or ``ablate --table`` get a path that does not exist
or is not what they read, :func:`not_an_experiment` says so and lists what is
there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlptune.search.runner import META_FILE

EXPERIMENTS_ROOT = Path("runs")  # parent of every command's default storage (see the module docstring)
SEARCH_DEPTH = 3  # directory levels below the root searched for experiments (runs/demo/search is 2)
MAX_LISTED = 10  # experiments named in a message; the rest are counted
DEFAULT_KIND = "search"  # a search's meta file has no "kind" (ablation studies and promoted runs say "ablation")
PROMOTED_KIND = "promoted run"  # an ablation study that `vlptune promote --run` wrote (`promote --report` reads it)


def find_experiments(root: str | os.PathLike = EXPERIMENTS_ROOT, depth: int = SEARCH_DEPTH) -> list[Path]:
    """Directories under ``root``, at most ``depth`` levels down, that hold a meta file; sorted.

    An experiment's own subdirectories (trials) are not searched; hidden
    directories, symbolic links and unreadable directories are skipped.
    """
    found: list[Path] = []

    def walk(directory: Path, levels_left: int) -> None:
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if (path / META_FILE).is_file():
                found.append(path)
            elif levels_left > 1:
                walk(path, levels_left - 1)

    walk(Path(root), depth)
    return sorted(found)


def experiment_kind(exp_dir: Path) -> str:
    """``search``, ``ablation`` or ``promoted run`` (an ablation study with a promotion record)."""
    from vlptune.study.promote import PROMOTION_FILE

    try:
        meta = json.loads((exp_dir / META_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        return f"unreadable {META_FILE}"
    if (exp_dir / PROMOTION_FILE).is_file():
        return PROMOTED_KIND
    return str(meta.get("kind", DEFAULT_KIND))


def format_listing(root: str | os.PathLike = EXPERIMENTS_ROOT, depth: int = SEARCH_DEPTH, limit: int = MAX_LISTED) -> str:
    """What experiments exist under ``root``: a header line and one indented line each, at most ``limit``."""
    root = Path(root)
    if not root.is_dir():
        return f"no experiments to list: there is no {root}/ directory in {Path.cwd()}"
    found = find_experiments(root, depth)
    if not found:
        return f"no experiments under {root}/ (no directory down to {depth} levels holds {META_FILE})"
    width = max(len(str(p)) for p in found[:limit])
    lines = [f"experiments under {root}/ ({len(found)}):"]
    lines += [f"  {str(p):<{width}}  ({experiment_kind(p)})" for p in found[:limit]]
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more")
    return "\n".join(lines)


def not_an_experiment(path: str | os.PathLike, problem: str) -> str:
    """The message for a command given ``path``: it does not exist, or ``problem``; then the listing."""
    path = Path(path)
    if not path.exists():
        where = "" if path.is_absolute() else f" (in {Path.cwd()})"
        head = f"{path} does not exist{where}"
    else:
        head = f"{path}: {problem}"
    return f"{head}\n{format_listing()}"
