"""Where an experiment lives: a local directory, or a URI opened with pyarrow (s3://, gs://, file://...).

A local experiment is one directory (``EXP_DIR``, see :mod:`vlptune.search.layout`).

A URI experiment (``--storage s3://BUCKET/DIR``) is split in two:

* **the URI** (``s3://BUCKET/DIR/NAME``) is the experiment of record. Ray Tune
  keeps its state and the trials' results there (``storage_path``), Ray Train
  the checkpoints each trial reports (``NAME/train/<trial_id>``), every trial's
  rank 0 uploads its TensorBoard run (``NAME/tb/<trial_id>``, its
  ``checkpoints/`` left out: Ray Train already stores them) after each report
  and when it ends, and the driver uploads its own files (``vlptune_search.json``,
  ``search_space.yaml``, ``base_recipe.yaml``, a consistent snapshot of the
  SQLite ``optuna.db``) when the search starts, after every finished trial and
  at the end;
* **the driver mirror**, a local directory on the machine of the search's
  driver (``<mirror root>/driver/<scheme>/<bucket>/<path>``), holds what cannot
  live on an object store: the SQLite Optuna study (only the driver opens it,
  so a multi-node search needs nothing more) and the experiment files the
  driver reads; it is also where each node's trial workers write their
  TensorBoard run before it is uploaded.

``vlptune search --resume URI`` downloads the driver files into the mirror (the
study only when the URI's copy is newer than the mirror's) and restores Tune
from the URI; ``vlptune results URI`` and ``vlptune board URI`` download a
read-only view (``<mirror root>/view/...``, never the driver mirror, whose
TensorBoard files may be open) and read it like a local experiment.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from vlptune.cluster.storage import StorageError, is_uri, open_uri
from vlptune.io import atomic_write_bytes

# Default root of the local mirrors of URI experiments (the --mirror-dir flag).
DEFAULT_MIRROR_ROOT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlptune" / "mirrors"


def join_uri(uri: str, *parts: str) -> str:
    """``s3://b/dir?region=x`` + ``name`` -> ``s3://b/dir/name?region=x`` (the query stays at the end)."""
    split = urlsplit(uri)
    path = split.path.rstrip("/")
    for part in parts:
        path = f"{path}/{part.strip('/')}"
    return urlunsplit((split.scheme, split.netloc, path, split.query, split.fragment))


def uri_parent(uri: str) -> tuple[str, str]:
    """``s3://b/dir/name?q`` -> (``s3://b/dir?q``, ``name``)."""
    split = urlsplit(uri)
    path = PurePosixPath(split.path.rstrip("/") or "/")
    if not path.name:
        raise StorageError(f"storage {uri!r}: names no directory below the bucket or root; give s3://BUCKET/DIR/NAME")
    return urlunsplit((split.scheme, split.netloc, str(path.parent), split.query, split.fragment)), path.name


def mirror_key(uri: str) -> Path:
    """A relative local path for a URI: scheme, host/bucket and path (no query), safe characters only."""
    split = urlsplit(uri)
    parts = [split.scheme, split.netloc or "_", *[p for p in split.path.split("/") if p]]
    safe = [re.sub(r"[^A-Za-z0-9._=-]", "_", p) or "_" for p in parts]
    safe = ["_" if p in (".", "..") else p for p in safe]
    return Path(*safe)


# ------------------------------------------------------------------ file transfer through pyarrow


def _fs_and_path(uri: str):
    fs, path = open_uri(uri)
    return fs, path.rstrip("/") or "/"


def upload_bytes(fs, path: str, data: bytes) -> None:
    """Write one file: object stores replace an object atomically; a local or mounted
    filesystem gets a temporary sibling renamed over the target."""
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if fs.type_name not in ("local", "mock"):
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:
            pass
        raise


def _write_local_atomic(path: Path, data: bytes) -> None:

    atomic_write_bytes(path, data)


def list_files(fs, base: str) -> dict[str, tuple[int, float | None]]:
    """Relative POSIX path -> (size, mtime seconds or None) of every file under ``base`` (empty if none)."""
    import pyarrow.fs as pafs  # pyarrow.fs: only for URI storage

    out: dict[str, tuple[int, float | None]] = {}
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return out
    prefix = base.rstrip("/") + "/"
    for info in infos:
        if info.type == pafs.FileType.File and info.path.startswith(prefix):
            mtime = info.mtime.timestamp() if info.mtime is not None else None
            out[info.path[len(prefix) :]] = (info.size or 0, mtime)
    return out


def download_tree(uri: str, local: Path, keep: Callable[[str], bool] = lambda rel: True) -> int:
    """Copy every file under ``uri`` for which ``keep(relative path)`` into ``local``; returns the count."""
    fs, base = _fs_and_path(uri)
    count = 0
    for rel in sorted(list_files(fs, base)):
        if not keep(rel):
            continue
        with fs.open_input_stream(f"{base}/{rel}") as src:
            data = src.read()
        _write_local_atomic(local / rel, data)
        count += 1
    return count


def sqlite_snapshot(db: Path) -> bytes:
    """A consistent copy of a SQLite database that another connection may be writing (backup API)."""
    with tempfile.TemporaryDirectory(prefix="vlptune-db-") as tmp:
        copy = Path(tmp) / db.name
        src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(copy)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        return copy.read_bytes()


class DirUploader:
    """Upload a local directory to a URI, file by file, only what changed since the last call.

    ``exclude``: first path components left out (``checkpoints``: Ray Train stores those).
    Names starting with ``.`` (locks, temporary files) are left out too.
    """

    def __init__(self, local: str | Path, uri: str, exclude: Iterable[str] = ()):
        self.local = Path(local)
        self.uri = uri
        self.exclude = frozenset(exclude)
        self._sent: dict[str, tuple[int, int]] = {}
        self._fs = None

    def _skip(self, rel: PurePosixPath) -> bool:
        return rel.parts[0] in self.exclude or any(p.startswith(".") for p in rel.parts)

    def sync(self) -> int:
        """Upload new and changed files; returns how many were sent."""
        if not self.local.is_dir():
            return 0
        if self._fs is None:
            self._fs, self._base = _fs_and_path(self.uri)
        sent = 0
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = PurePosixPath(path.relative_to(self.local).as_posix())
            if self._skip(rel):
                continue
            try:
                stat = path.stat()
                data = path.read_bytes()
            except FileNotFoundError:  # removed in between (a pruned checkpoint, a temporary file)
                continue
            key = (stat.st_size, stat.st_mtime_ns)
            if self._sent.get(str(rel)) == key:
                continue
            upload_bytes(self._fs, f"{self._base}/{rel}", data)
            self._sent[str(rel)] = key
            sent += 1
        return sent


# ------------------------------------------------------------------ an experiment's location


@dataclass
class Location:
    """An experiment: ``uri`` (None for a local experiment) and ``local`` (the directory, or the driver mirror)."""

    local: Path
    uri: str | None = None
    mirror_root: Path | None = field(default=None, repr=False)

    @classmethod
    def of(cls, exp: str | os.PathLike, mirror_root: str | os.PathLike | None = None) -> Location:
        raw = os.fspath(exp)
        if is_uri(raw):
            uri_parent(raw)  # refuses a URI without a directory name
            open_uri(raw)  # refuses a scheme or location pyarrow cannot open (StorageError)
            root = Path(mirror_root).expanduser().resolve() if mirror_root else DEFAULT_MIRROR_ROOT
            return cls(local=root / "driver" / mirror_key(raw), uri=raw, mirror_root=root)
        return cls(local=Path(raw).expanduser().resolve())

    @property
    def remote(self) -> bool:
        return self.uri is not None

    @property
    def remote_uri(self) -> str:
        """The URI of a remote experiment (asking a local one is a bug)."""
        if self.uri is None:
            raise ValueError(f"{self.local}: a local experiment has no URI")
        return self.uri

    @property
    def name(self) -> str:
        return uri_parent(self.uri)[1] if self.uri else self.local.name

    @property
    def path(self) -> str:
        """What Tune restores from and what a user passes to results/board/--resume: the URI or the directory."""
        return self.uri or str(self.local)

    @property
    def tune_storage_path(self) -> str:
        """Tune's ``storage_path`` (the experiment is ``storage_path/name``)."""
        return uri_parent(self.uri)[0] if self.uri else str(self.local.parent)

    def join(self, *parts: str) -> str:
        return join_uri(self.uri, *parts) if self.uri else str(self.local.joinpath(*parts))

    @property
    def view(self) -> Path:
        """Where results/board download a URI experiment (kept apart from the driver mirror)."""
        if not self.uri:
            return self.local
        root = self.mirror_root if self.mirror_root is not None else DEFAULT_MIRROR_ROOT
        return root / "view" / mirror_key(self.uri)

    # -------------------------------------------------------------- remote state

    def remote_files(self) -> dict[str, tuple[int, float | None]]:
        fs, base = _fs_and_path(self.remote_uri)
        return list_files(fs, base)

    def delete_files(self, names: Iterable[str]) -> None:
        """Remove these files at the URI (those that are not there are skipped)."""
        fs, base = _fs_and_path(self.remote_uri)
        for name in names:
            try:
                fs.delete_file(f"{base}/{name}")
            except FileNotFoundError:
                pass

    def upload_driver_files(self, names: Iterable[str], study_db: str | None) -> None:
        """Upload the driver's experiment files, and a snapshot of the SQLite study (if it exists)."""
        fs, base = _fs_and_path(self.remote_uri)
        for name in names:
            path = self.local / name
            if path.is_file():
                upload_bytes(fs, f"{base}/{name}", path.read_bytes())
        if study_db and (self.local / study_db).is_file():
            upload_bytes(fs, f"{base}/{study_db}", sqlite_snapshot(self.local / study_db))

    def download_driver_files(self, names: Iterable[str], study_db: str | None) -> list[str]:
        """Into the driver mirror: the experiment files, and the study unless the mirror's copy is newer."""
        fs, base = _fs_and_path(self.remote_uri)
        remote = list_files(fs, base)
        got = []
        for name in names:
            if name in remote:
                with fs.open_input_stream(f"{base}/{name}") as src:
                    _write_local_atomic(self.local / name, src.read())
                got.append(name)
        if study_db and study_db in remote:
            local_db = self.local / study_db
            remote_mtime = remote[study_db][1]
            if not local_db.is_file() or remote_mtime is None or remote_mtime > local_db.stat().st_mtime:
                with fs.open_input_stream(f"{base}/{study_db}") as src:
                    _write_local_atomic(local_db, src.read())
                got.append(study_db)
        return got

    def download_view(self, keep: Callable[[str], bool]) -> Path:
        """A fresh local copy of the URI's files that ``keep`` selects; returns its directory."""

        view = self.view
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(parents=True, exist_ok=True)
        download_tree(self.remote_uri, view, keep)
        return view


# ------------------------------------------------------------------ the driver's uploads


# URI -> the driver mirror of the experiment this process runs. A resumed experiment's
# DriverSync comes back from Tune's saved state with the mirror path of the first run;
# this says where the mirror is now.
ACTIVE_MIRRORS: dict[str, Path] = {}


class DriverSync:
    """Uploads the driver's files of a URI experiment (the experiment files and a snapshot of
    the SQLite study): when Tune starts, after each finished trial, and at the end."""

    def __init__(self, location: Location, names: Iterable[str], study_db: str | None):
        self.uri = location.uri
        self.local = location.local
        self.names = tuple(names)
        self.study_db = study_db
        self.uploads = 0

    @property
    def location(self) -> Location:
        return Location(local=ACTIVE_MIRRORS.get(self.uri, self.local) if self.uri else self.local, uri=self.uri)

    def upload(self, strict: bool = False) -> bool:
        """Upload now; a failure raises :class:`StorageError` when ``strict``, else is logged."""

        try:
            self.location.upload_driver_files(self.names, self.study_db)
        except Exception as exc:
            message = f"cannot upload the experiment files of {self.location.local} to {self.uri}: {' '.join(str(exc).split())}"
            if strict:
                raise StorageError(message) from exc
            logging.getLogger(__name__).warning("%s (retried after the next finished trial and at the end)", message)
            return False
        self.uploads += 1
        return True

    def callback(self):
        """A Tune callback running :meth:`upload` at the experiment's start, after each finished
        trial (at the end of the step in which the searcher was told) and at the end."""
        return _driver_sync_callback_class()(self)


def _driver_sync_callback_class():
    from ray.tune import Callback  # ray: heavy, only when this runs

    class DriverSyncCallback(Callback):
        def __init__(self, sync: DriverSync) -> None:
            self.sync = sync
            self.pending = False

        def setup(self, **info) -> None:
            self.sync.upload()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.pending = True

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.pending = True

        def on_step_end(self, iteration, trials, **info) -> None:
            if self.pending:
                self.pending = not self.sync.upload()

        def on_experiment_end(self, trials, **info) -> None:
            self.sync.upload()

    return DriverSyncCallback
