"""The layout of an experiment directory, and finding experiments: one place for searches, studies, results, the board and promotion.

Layout of an experiment directory ``EXP_DIR`` (``--storage``/``--name``; with a URI
storage the same layout lives at the URI, and the driver keeps the Optuna study in
a local mirror: :mod:`vlptune.search.location`)::

    EXP_DIR/
      vlptune_search.json     what this experiment is (metric, mode, fidelity, study, parameters)
      search_space.yaml       the space file as given (resume reads this copy)
      base_recipe.yaml        the resolved base recipe (resources, fixed, -o applied)
      optuna.db               the Optuna study (SQLite; unless the space names another storage)
      tb/<trial_id>/          one TensorBoard run per trial: the loop's out_dir (events, checkpoints)
      train/<trial_id>/       Ray Train run storage: checkpoints reported to Ray (resume on any node)
      vlptune_trial_<...>/    Tune's trial directories (result.json, progress.csv, recipe.yaml)
      experiment_state-*.json, tuner.pkl, searcher-state-*.pkl   Tune's own state (resume)

An ablation study (:mod:`vlptune.study.ablation`) has the same layout with its
study copy instead of the space and no ``optuna.db``; a promoted run is a study
with a promotion record (:data:`PROMOTION_FILE`).

Finding experiments: every experiment holds a ``vlptune_search.json``
(:data:`META_FILE`). The commands write them under :data:`EXPERIMENTS_ROOT`
of the working directory by default (``runs/search/NAME``,
``runs/ablation/NAME``, ``runs/promoted/NAME``; the demo: ``runs/demo/search``
and ``runs/demo/promoted``). When ``results``, ``board``, ``promote``,
``importance`` or ``ablate --table`` get a path that does not exist or is not
what they read, :func:`not_an_experiment` says so and lists what is there.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from vlptune.cluster.storage import StorageError, is_uri
from vlptune.config import Recipe
from vlptune.io import atomic_write_text
from vlptune.search.location import Location, join_uri
from vlptune.search.space import TIME_ATTR, SearchSpace, load_space

log = logging.getLogger(__name__)

META_FILE = "vlptune_search.json"
SPACE_COPY = "search_space.yaml"
BASE_COPY = "base_recipe.yaml"
OPTUNA_DB = "optuna.db"
REPEAT_ATTR = "repeat_of"  # an Optuna trial told the outcome of the earlier trial of the same values (searcher.repeats: reuse)
TB_DIR = "tb"
TRAIN_DIR = "train"
TRIAL_RECIPE = "recipe.yaml"
PROMOTION_FILE = "vlptune_promotion.json"  # in a promoted run's experiment directory (vlptune.study.promote)
DEFAULT_STORAGE = "runs/search"
DRIVER_FILES = (META_FILE, SPACE_COPY, BASE_COPY)  # what the driver uploads to a URI experiment (and the study)


class SearchError(RuntimeError):
    """A search that cannot start or resume (names the directory and the problem)."""


# ------------------------------------------------------------------ experiment files


def storage_url_for(space: SearchSpace, exp_dir: Path) -> str:
    return space.storage or f"sqlite:///{(exp_dir / OPTUNA_DB).resolve()}"


def study_url(meta: dict[str, Any], exp_dir: str | Path) -> str:
    """The Optuna storage of an experiment read from ``exp_dir``: its own ``optuna.db`` when the
    study is the default SQLite one (wherever the directory now is: moved, resumed elsewhere, or a
    downloaded copy of a URI experiment), else the RDB URL the space named."""
    study_file = meta.get("study_file")
    if study_file:
        return f"sqlite:///{(Path(exp_dir) / study_file).resolve()}"
    return meta["storage_url"]


def absolute_paths(raw: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative paths of a recipe made absolute (workers may run elsewhere than the driver's cwd)."""
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    root = Path(str(data.get("root", Recipe().data.root))).expanduser()
    if not root.is_absolute():
        data["root"] = str((cwd / root).resolve())
    for section, key in (("data", "tokenizer"), ("model.backbone", "init"), ("model.fusion", "init")):
        node = raw
        for part in section.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and (cwd / value).exists():
            node[key] = str((cwd / value).resolve())
    return raw


def write_experiment_files(space: SearchSpace, exp_dir: Path, space_path: Path, address: str | None, location: str | None = None) -> dict[str, Any]:
    """The experiment's own files in ``exp_dir`` (the directory, or the driver mirror of a URI experiment).

    ``location``: where the experiment lives (its URI, or the directory; default ``exp_dir``).
    """
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp_dir / SPACE_COPY, Path(space_path).read_text())
    write_base_copy(exp_dir, space.base_raw)
    meta = {
        "name": exp_dir.name,
        "space_file": str(space_path.resolve()),
        "base_file": space.base_file,
        "overrides": space.overrides,
        "metric": space.metric,
        "mode": space.mode,
        "max_fidelity": space.max_fidelity,
        "time_attr": TIME_ATTR,
        "parameters": [p.path for p in space.params],
        "storage_url": storage_url_for(space, exp_dir),
        "study_file": None if space.storage else OPTUNA_DB,
        "study_name": exp_dir.name,
        "location": location or str(exp_dir),
        "scheduler": space.scheduler.type,
        "searcher": space.searcher.type,
        "num_samples": space.num_samples,
        "address": address,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    return write_meta(exp_dir, meta)


def write_base_copy(exp_dir: Path, base_raw: dict[str, Any]) -> None:
    """The resolved base recipe an experiment's trials start from (:data:`BASE_COPY`)."""
    atomic_write_text(exp_dir / BASE_COPY, yaml.safe_dump(base_raw, sort_keys=False))


def write_meta(exp_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write what an experiment is (:data:`META_FILE`, what results, board and promotion read); returns ``meta``."""
    atomic_write_text(exp_dir / META_FILE, json.dumps(meta, indent=1) + "\n")
    return meta


def read_meta(exp_dir: str | Path) -> dict[str, Any]:
    path = Path(exp_dir) / META_FILE
    if not path.is_file():
        raise SearchError(not_an_experiment(exp_dir, f"not a vlptune search experiment ({META_FILE} is missing)"))
    return json.loads(path.read_text())


def load_experiment_space(exp_dir: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """The space of an experiment, from the copies saved in its directory."""
    exp_dir = Path(exp_dir)
    meta = read_meta(exp_dir)
    base_raw = yaml.safe_load((exp_dir / BASE_COPY).read_text())
    space = load_space(exp_dir / SPACE_COPY, overrides=overrides, base_raw=base_raw)
    space.base_file = meta.get("base_file", space.base_file)
    space.overrides = list(meta.get("overrides", []))
    return space


def default_exp_dir(source: Any, storage: str | Path | None, name: str | None, default_storage: str = DEFAULT_STORAGE) -> Path | str:
    """``STORAGE/NAME``: an absolute directory, or a URI when ``storage`` is one (``s3://B/DIR/NAME``).

    ``source``: the experiment (a :class:`SearchSpace`, a study); without ``name``
    the leaf is its ``name`` and the time. ``default_storage``: without ``storage``
    (a search's :data:`DEFAULT_STORAGE`; a study passes its own).
    """
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    leaf = name or f"{source.name}-{stamp}"
    root = os.fspath(storage) if storage else default_storage
    if is_uri(root):
        return join_uri(root, leaf)
    return (Path(root) / leaf).resolve()


def experiment_location(exp: str | Path, mirror_dir: str | Path | None = None) -> Location:
    """The :class:`Location` of an experiment given as a directory or a URI (a bad URI: :class:`SearchError`)."""
    try:
        return Location.of(exp, mirror_dir)
    except StorageError as exc:
        raise SearchError(str(exc)) from None


def check_fresh(location: Location) -> None:
    """Refuse (:class:`SearchError`) to start a new experiment where one exists: a non-empty
    directory, or a URI holding files (or whose driver mirror is not empty)."""
    exp_dir = location.local
    if location.remote:
        try:
            existing = location.remote_files()
        except Exception as exc:
            raise SearchError(f"{location.uri}: cannot list the storage: {' '.join(str(exc).split())}") from None
        if existing:
            raise SearchError(f"{location.uri}: already holds {len(existing)} file(s); continue it with --resume {location.uri}, or choose another --name")
        if exp_dir.exists() and any(exp_dir.iterdir()):
            raise SearchError(
                f"{exp_dir}: the local mirror of {location.uri} is not empty (left by an earlier search of that URI, "
                "which left nothing at the URI); delete it, or choose another --name or --mirror-dir"
            )
    elif exp_dir.exists() and any(exp_dir.iterdir()):
        raise SearchError(f"{exp_dir}: already exists; continue it with --resume {exp_dir}, or choose another --name")


def download_for_resume(location: Location, names: tuple[str, ...] = DRIVER_FILES) -> None:
    """Into the driver mirror of a URI experiment: its experiment files (``names``), and its SQLite
    study unless the mirror's own copy is newer (this machine ran the driver last)."""
    try:
        got = location.download_driver_files(names, OPTUNA_DB)
    except Exception as exc:
        raise SearchError(f"{location.uri}: cannot download the experiment files: {' '.join(str(exc).split())}") from None
    if META_FILE not in got:
        raise SearchError(f"{location.uri}: not a vlptune search experiment ({META_FILE} is missing there)")
    log.info("downloaded %s from %s into %s", ", ".join(got), location.uri, location.local)


def local_view(exp: str | Path, mirror_dir: str | Path | None = None, tensorboard: bool = False) -> Path:
    """A directory to read an experiment from: the directory itself, or for a URI a fresh
    download of it (``<mirror root>/view/...``): everything but Ray Train's checkpoints
    (``train/``) and the trials' ``checkpoints/``; TensorBoard events only with ``tensorboard``
    (else each trial's ``recipe.yaml``)."""
    loc = experiment_location(exp, mirror_dir)
    if not loc.remote:
        return loc.local

    def keep(rel: str) -> bool:
        parts = rel.split("/")
        if parts[0] == TRAIN_DIR:
            return False
        if parts[0] == TB_DIR:
            if "checkpoints" in parts[1:]:
                return False
            return tensorboard or parts[-1] == TRIAL_RECIPE
        return True

    try:
        view = loc.download_view(keep)
    except Exception as exc:
        raise SearchError(f"{loc.uri}: cannot download the experiment: {' '.join(str(exc).split())}") from None
    if not (view / META_FILE).is_file():
        raise SearchError(f"{loc.uri}: not a vlptune search experiment ({META_FILE} is missing there)")
    log.info("downloaded %s into %s", loc.uri, view)
    return view


def kept_log_path(exp_dir: Path) -> Path:
    """Where the log of a fresh experiment that failed before Tune saved its state is kept: ``EXP_DIR.log``."""
    return exp_dir.with_name(exp_dir.name + ".log")


# ------------------------------------------------------------------ finding experiments


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
