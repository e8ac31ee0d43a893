"""Checkpoints: everything a resumed run needs to continue as if never stopped, without pickle.

A checkpoint is a directory ``<root>/step_<NNNNNNNN>/`` holding

* ``model.safetensors``: the Pretrainer's state dict (the model, the VD
  buffers, every objective head). Tensors that are the same storage under two
  names (tied weights) are stored once and listed as aliases in state.json.
* ``state.safetensors``: every other tensor (optimiser moments, RNG states).
* ``state.json``: everything else: step, epoch, data position, counters,
  optimiser hyper-parameters, scheduler state, python RNG state, and a
  description of where each tensor of the nested states lives.

Nested states (optimiser state dicts, RNG tuples) are flattened by
:func:`encode_tree`: tensors and numpy arrays go to ``state.safetensors``
under a path-like key; dicts (whatever their key types), lists and tuples
become tagged JSON. Nothing is ever unpickled.

Writing is atomic (:func:`_publish`): the files go to a temporary sibling
directory (``.tmp-*``), every file and directory in it is fsynced, it is
renamed onto its final name (the directory fsynced), then the ``latest``
pointer file is replaced with ``os.replace``. A crash leaves either the
previous checkpoint or the new one, never half of one. Replacing a checkpoint
of the same step (Ray's copy installed over the local one, a re-save) writes
the new one beside the old (``step_N-r<ns>``), points ``latest`` at it, and
only then removes the old: ``latest`` never names a missing directory.
Removing is atomic too: a checkpoint is renamed out of the ``step_*`` names
(``.old-*``) before its files go. The ``.tmp-*`` / ``.old-*`` directories
of a writer that was killed are removed by the next write
(:func:`remove_interrupted`; those of live processes are left alone).

Which checkpoints stay (``train.keep_checkpoints``, ``train.keep_when_done``,
``train.keep_when_stopped``) is decided by two pure rules over
:class:`Entry` lists, shared by the loop (its own directory) and the search's
driver (Ray Train's copies, :mod:`vlptune.search.retention`):

* :func:`kept_while_running`: the N best by a metric, and always the latest
  (without a metric: the N latest). This is Ray Train's own rule for
  ``CheckpointConfig(num_to_keep=N, checkpoint_score_attribute=metric)``, so a
  search trial's copies in Ray's storage follow the same rule as the loop's.
* :func:`kept_when_ended`: ``best`` (by the metric; the latest without one),
  ``last`` or ``none``.

The metric of a checkpoint is the evaluation reported with it, saved in
``state.json`` (``extra.metrics``), so any copy of a checkpoint can be ranked
without Ray's records.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlptune.io import atomic_write_text, finite, fsync_dir, fsync_tree
from vlptune.train.reporting import Reporter

CHECKPOINT_DIR = "checkpoints"  # under the run directory
LATEST = "latest"  # pointer file: the name of the newest complete checkpoint
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
STEP_PREFIX = "step_"
STEP_DIGITS = 8
TMP_PREFIX = ".tmp-"  # a checkpoint being written
OLD_PREFIX = ".old-"  # a checkpoint being removed
REPLACEMENT_SEP = "-r"  # step_N-r<ns>: a checkpoint that replaced another of its step
METRICS_KEY = "metrics"  # in state.json's extra: the evaluation reported with the checkpoint
KEEP_BEST, KEEP_LAST, KEEP_NONE = "best", "last", "none"  # what a run keeps once it has ended
MODES = ("max", "min")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back (names the directory and the problem)."""


# ----------------------------------------------------------------- tree <-> json


def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON form of ``obj``; tensors and arrays are moved into ``tensors`` under ``key``-derived names."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[encode_tree(k, tensors, f"{key}.k{i}"), encode_tree(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {key}")


def decode_tree(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(decode_tree(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_hashable(decode_tree(k, tensors)): decode_tree(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


# ----------------------------------------------------------------- RNG states


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy, torch (CPU and every CUDA device) and the named generators' states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"checkpoint has no state for generator {name!r} (it has {sorted(saved)})")
        gen.set_state(saved[name])


# ----------------------------------------------------------------- model tensors


def _model_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict on CPU without duplicated storage; ``aliases`` maps a dropped name to its twin."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name, value in module.state_dict().items():
        value = value.detach()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if value.numel() > 0 and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = value.cpu().contiguous().clone()  # clone: no two entries share memory
    return tensors, aliases


# ----------------------------------------------------------------- save / load


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    module: nn.Module,
    optimizers: Any,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
    keep: int = 1,
) -> Path:
    """Write the checkpoint of ``step`` atomically; returns its directory.

    ``module`` is the unwrapped Pretrainer; ``optimizers`` an
    :class:`~vlptune.train.optim.Optimizers`; ``extra`` JSON-able loop state
    (epoch, data position, counters; ``extra[METRICS_KEY]`` the evaluation of
    this step). Then only the ``keep`` newest checkpoints of the directory
    stay (the new one among them): the loop ranks by no metric.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_interrupted(root)
    tmp = _tmp_dir(root, step)
    tmp.mkdir()
    try:
        model_tensors, aliases = _model_tensors(module)
        save_file(model_tensors, str(tmp / MODEL_FILE), metadata={"format": "vlptune", "step": str(step)})
        other: dict[str, torch.Tensor] = {}
        nested = {
            "optimizers": {side: opt.state_dict() for side, opt in optimizers.optimizers.items()},
            "schedulers": {side: sched.state_dict() for side, sched in optimizers.schedulers.items()},
            "rng": capture_rng(generators),
        }
        state = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "aliases": aliases,
            "extra": extra or {},
            "nested": encode_tree(nested, other, "s"),
        }
        save_file(other, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        final = _publish(root, tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entries = local_entries(root)
    kept = kept_while_running(entries, keep) | {final.name}
    for old in _step_dirs(root):
        if old.name not in kept:
            remove_checkpoint(old)
    return final


def _tmp_dir(root: Path, step: int) -> Path:
    """A fresh temporary directory name for a checkpoint of ``step`` being written by this process."""
    return root / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-{time.monotonic_ns()}"


def _same_step(name: str, step: int) -> bool:
    """Is ``name`` a checkpoint directory name of ``step`` (``step_N`` or ``step_N-r<ns>``)?"""
    base = step_dir_name(step)
    return name == base or name.startswith(base + REPLACEMENT_SEP)


def _publish(root: Path, tmp: Path, step: int) -> Path:
    """Make the complete checkpoint in ``tmp`` the checkpoint of ``step`` and the ``latest``; returns it.

    Its files and directories are fsynced first; a checkpoint of the same step
    already there stays until ``latest`` names the new one (which takes the
    name ``step_N-r<ns>`` beside it), then goes: at no moment does ``latest``
    name a missing or partial directory.
    """
    fsync_tree(tmp)
    final = root / step_dir_name(step)
    if final.exists():
        final = root / f"{final.name}{REPLACEMENT_SEP}{time.monotonic_ns()}"
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in _step_dirs(root):
        if old != final and _same_step(old.name, step):
            remove_checkpoint(old)
    return final


def _writer_pid(name: str) -> int | None:
    """The process id in a ``.tmp-<name>-<pid>-<ns>`` / ``.old-<name>-<pid>-<ns>`` name, or None."""
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_interrupted(root: str | Path) -> list[str]:
    """Remove the ``.tmp-*`` (writes) and ``.old-*`` (removals) directories under a ``checkpoints/``
    directory whose process is gone (killed mid-way); returns their names.

    Those of this process and of other live processes on this machine (a
    concurrent installer) are left alone; none is ever a checkpoint."""
    root = Path(root)
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if not (path.is_dir() and path.name.startswith((TMP_PREFIX, OLD_PREFIX))):
            continue
        pid = _writer_pid(path.name)
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _discard(path: Path) -> None:
    """Rename ``path`` out of the checkpoint names (atomic), then delete it."""
    trash = path.parent / f"{OLD_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def remove_checkpoint(path: str | Path) -> None:
    """Remove one checkpoint directory atomically; a ``latest`` pointer naming it goes too.

    After a crash at any point the directory is either a complete checkpoint
    or no checkpoint at all (a leftover ``.old-*`` directory is no checkpoint).
    """
    path = Path(path)
    _discard(path)
    pointer = path.parent / LATEST
    try:
        if pointer.read_text().strip() == path.name:
            pointer.unlink()
    except FileNotFoundError:
        pass


def finish_checkpoints(run_dir: str | Path, policy: str, metric: str | None = None, mode: str | None = None) -> Path | None:
    """Apply a run-end policy (:func:`kept_when_ended`) to a run directory's checkpoints.

    Everything else under ``checkpoints/`` goes, half-written (``.tmp-*``) and
    half-removed (``.old-*``) directories included, so call it only when
    nothing writes there any more (the run has ended). ``latest`` then names
    the newest checkpoint kept, or is gone. Returns that checkpoint, or None.
    """
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    entries = local_entries(root)
    kept = kept_when_ended(entries, policy, metric, mode)
    for path in [p for p in root.iterdir() if p.is_dir() and p.name not in kept]:
        if path.name.startswith(STEP_PREFIX):
            remove_checkpoint(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    if not kept:
        (root / LATEST).unlink(missing_ok=True)
        return None
    newest = _latest(e for e in entries if e.name in kept).name
    atomic_write_text(root / LATEST, newest + "\n")
    return root / newest


# ----------------------------------------------------------------- which checkpoints stay


@dataclass(frozen=True)
class Entry:
    """One complete checkpoint: its directory name, step and the evaluation saved with it."""

    name: str
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)


def parse_entry(name: str, state_text: str) -> Entry:
    """The :class:`Entry` of a checkpoint directory ``name`` from its ``state.json`` text."""
    state = json.loads(state_text)
    metrics = state.get("extra", {}).get(METRICS_KEY) or {}
    return Entry(name, int(state["step"]), metrics if isinstance(metrics, dict) else {})


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX))


def local_entries(root: Path) -> list[Entry]:
    """The complete checkpoints (those with a ``state.json``) of a ``checkpoints/`` directory."""
    entries = []
    for path in _step_dirs(root):
        try:
            entries.append(parse_entry(path.name, (path / STATE_FILE).read_text()))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            continue  # not a complete checkpoint: never kept
    return entries


def _rank(entry: Entry, metric: str | None, mode: str | None) -> tuple[int, float, int, str]:
    """Sort key, better last: a finite score before none (missing, NaN, infinite, no metric: a
    non-finite score is never a good one), then the score in ``mode``'s direction, then the later
    step (Ray breaks ties by report order)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    value = entry.metrics.get(metric) if metric and mode else None
    if not finite(value):
        return (0, 0.0, entry.step, entry.name)
    return (1, float(value) if mode == "max" else -float(value), entry.step, entry.name)


def _latest(entries: Iterable[Entry]) -> Entry:
    return max(entries, key=lambda e: (e.step, e.name))


def kept_while_running(entries: list[Entry], keep: int, metric: str | None = None, mode: str | None = None) -> set[str]:
    """Names of the checkpoints a running run keeps: the ``keep`` best by ``metric`` in ``mode``
    (``max``/``min``) and the latest; with no metric (or no checkpoint scored), the ``keep`` latest."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, not {keep}")
    if not entries:
        return set()
    ranked = sorted(entries, key=lambda e: _rank(e, metric, mode))
    return {e.name for e in ranked[-keep:]} | {_latest(entries).name}


def kept_when_ended(entries: list[Entry], policy: str, metric: str | None = None, mode: str | None = None) -> set[str]:
    """Names of the checkpoints an ended run keeps: ``best`` (by ``metric`` in ``mode``; the latest
    when none is scored), ``last`` (the latest) or ``none``."""
    if policy not in (KEEP_BEST, KEEP_LAST, KEEP_NONE):
        raise ValueError(f"policy must be one of {KEEP_BEST!r}, {KEEP_LAST!r}, {KEEP_NONE!r}, not {policy!r}")
    if not entries or policy == KEEP_NONE:
        return set()
    if policy == KEEP_LAST:
        return {_latest(entries).name}
    return {max(entries, key=lambda e: _rank(e, metric, mode)).name}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def checkpoint_step(path: str | Path) -> int | None:
    """The step of the checkpoint directory ``path`` (its ``state.json``), or None if it holds none."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        return None
    return int(json.loads(state_file.read_text())["step"])


def install_checkpoint(run_dir: str | Path, src: str | Path) -> Path:
    """Copy the complete checkpoint directory ``src`` (a copy kept elsewhere, e.g. by Ray Train)
    into ``run_dir`` as the checkpoint of its step, and make it the ``latest``; returns its directory.

    The same protocol as :func:`save_checkpoint` (:func:`_publish`): the files
    are copied to a temporary sibling (``.tmp-*``), fsynced and renamed into
    place, ``latest`` repointed, and only then an existing checkpoint of that
    step removed. A crash leaves the previous checkpoint or the new one, never
    half of one. The caller keeps other
    writers of ``run_dir`` out (the loop's own saves, another installer).
    """
    step = checkpoint_step(src)
    if step is None:
        raise CheckpointError(f"{src}: not a checkpoint ({STATE_FILE} is missing)")
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_interrupted(root)
    tmp = _tmp_dir(root, step)
    try:
        shutil.copytree(src, tmp)
        return _publish(root, tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(
    path: str | Path,
    module: nn.Module,
    optimizers: Any | None = None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng_state: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint directory into ``module`` (and the optimisers, RNGs); returns its state.

    The returned dict has ``step`` and ``extra`` (the loop state given to
    :func:`save_checkpoint`).
    """
    path = Path(path)
    for name in (MODEL_FILE, TENSORS_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a complete checkpoint ({name} is missing)")
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {state.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    model_tensors = load_file(str(path / MODEL_FILE))
    for alias, source in state["aliases"].items():
        model_tensors[alias] = model_tensors[source]
    missing, unexpected = module.load_state_dict(model_tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the checkpoint does not fit this model (missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}); was it written by another recipe?"
        )
    nested = decode_tree(state["nested"], load_file(str(path / TENSORS_FILE)))
    if optimizers is not None:
        if sorted(nested["optimizers"]) != sorted(optimizers.optimizers):
            raise CheckpointError(f"{path}: optimisers {sorted(nested['optimizers'])} saved, this run has {sorted(optimizers.optimizers)}")
        for side, opt in optimizers.optimizers.items():
            opt.load_state_dict(nested["optimizers"][side])
        for side, sched in optimizers.schedulers.items():
            sched.load_state_dict(nested["schedulers"][side])
    if restore_rng_state:
        restore_rng(nested["rng"], generators)
    return {"step": state["step"], "extra": state["extra"], "rng": nested["rng"]}


def drop_persisted_copy(reporter: Reporter, checkpoint_dir: str | None, run_dir: Path) -> None:
    """Remove this run's checkpoint ``checkpoint_dir`` once the reporter says it holds a copy.

    A reporter with a ``persisted(checkpoint_dir) -> bool`` method (the Ray
    Train one) stores each reported checkpoint where a restarted run finds it
    (Ray's run storage): the local copy would be a second one. Checkpoints
    outside this run's ``checkpoints/`` (a ``resume`` path given) are never removed.
    """
    persisted = getattr(reporter, "persisted", None)
    if checkpoint_dir is None or not callable(persisted):
        return
    path = Path(checkpoint_dir)
    if path.parent.resolve() != checkpoint_root(run_dir).resolve():
        return
    if persisted(checkpoint_dir):
        remove_checkpoint(path)
