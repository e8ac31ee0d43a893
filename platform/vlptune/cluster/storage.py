"""Where a search keeps its results, and whether every node of the cluster reaches it.

A search on one machine can write its experiment directory anywhere. A search
on a cluster of several nodes cannot: each trial's workers write TensorBoard
events and checkpoints from whichever node they run on, Tune's driver reads
them back, and a restarted trial resumes from them on another node. The
storage must therefore be one that every node reaches:

- a cloud URI that pyarrow opens (``s3://bucket/dir``, ``gs://bucket/dir``,
  ``abfs://...``), or
- a directory on a filesystem that every node mounts at the same path (NFS,
  EFS, Filestore, Lustre, CephFS, GPFS, BeeGFS, a FUSE bucket mount, ...).

:func:`check_storage` is the one check; ``vlptune search`` calls it after it
has joined the cluster, so a local path on a multi-node cluster is refused
before any trial starts instead of producing results scattered over the
nodes' disks. :func:`probe_storage` goes further on a live cluster: it writes
a marker file through the storage and reads it back on every alive node.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MOUNTS_FILE = "/proc/mounts"

# Filesystem types (as /proc/mounts spells them) that several machines can mount at once.
SHARED_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "virtiofs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "glusterfs",
        "ocfs2",
        "gfs2",
        "wekafs",
        "panfs",
        "orangefs",
        "pvfs2",
        "afs",
    }
)
# FUSE filesystems are "fuse.<name>"; these are network or bucket mounts.
SHARED_FUSE_NAMES = frozenset(
    {
        "glusterfs",
        "ceph",
        "cephfs",
        "ceph-fuse",
        "gcsfuse",
        "s3fs",
        "goofys",
        "mountpoint-s3",
        "juicefs",
        "sshfs",
        "rclone",
        "blobfuse",
        "blobfuse2",
        "lustre",
        "beegfs",
        "seaweedfs",
        "alluxio-fuse",
        "geesefs",
        "efs",
    }
)

SHARED_HINT = (
    "use a storage every node reaches: --storage s3://BUCKET/DIR, --storage gs://BUCKET/DIR, or a "
    "directory on a filesystem that every node mounts at the same path (NFS/EFS/Filestore, Lustre, "
    "CephFS, a bucket mounted with gcsfuse or mountpoint-s3); see cluster/README.md, 'Storage'"
)


class StorageError(ValueError):
    """A storage path a search cannot use; the message names it and says what would do."""


@dataclass(frozen=True)
class Mount:
    """One line of the mount table: where a filesystem is mounted and its type."""

    mount_point: str
    fs_type: str
    source: str

    @property
    def shared(self) -> bool:
        if self.fs_type in SHARED_FS_TYPES:
            return True
        if self.fs_type.startswith("fuse."):
            return self.fs_type[len("fuse.") :] in SHARED_FUSE_NAMES
        return False


def is_uri(storage: str) -> bool:
    """``scheme://...`` (``file://`` included); a plain path is not a URI."""
    head, sep, _ = storage.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").replace(".", "").isalnum() and "/" not in head


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes spaces, tabs, newlines and backslashes as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def read_mounts(mounts_file: str | os.PathLike = MOUNTS_FILE) -> list[Mount]:
    """The mount table (``/proc/mounts`` format: source, mount point, type, options, ...)."""
    mounts: list[Mount] = []
    try:
        text = Path(mounts_file).read_text()
    except OSError:
        return mounts
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts.append(Mount(_unescape_mount_field(parts[1]), parts[2], _unescape_mount_field(parts[0])))
    return mounts


def mount_of(path: str | os.PathLike, mounts: Iterable[Mount]) -> Mount | None:
    """The mount holding ``path`` (absolute): the longest mount point that is a prefix of it.

    A later mount on the same point hides an earlier one, as in the kernel's table.
    """
    path = os.path.abspath(os.fspath(path))
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") or "/"
        if path == point or path.startswith(point if point.endswith("/") else point + "/"):
            if best is None or len(point) >= len(best.mount_point.rstrip("/") or "/"):
                best = mount
    return best


def alive_node_count(nodes: int | Sequence[dict[str, Any]] | None) -> int:
    """Alive nodes: given as a count, as ``ray.nodes()``'s list, or (None) asked of the Ray this process joined."""
    if isinstance(nodes, bool):
        raise TypeError("nodes: a count, a list of ray.nodes() entries, or None")
    if isinstance(nodes, int):
        if nodes < 0:
            raise ValueError(f"nodes: {nodes} is not a node count")
        return nodes
    if nodes is None:
        import ray  # ray: heavy, only when this runs

        if not ray.is_initialized():
            return 1  # no cluster joined: the search runs on this machine only
        return len([n for n in ray.nodes() if n.get("Alive")])
    return len([n for n in nodes if n.get("Alive")])


def check_storage(
    storage: str | os.PathLike,
    nodes: int | Sequence[dict[str, Any]] | None = None,
    *,
    assume_shared: bool = False,
    mounts_file: str | os.PathLike = MOUNTS_FILE,
) -> str:
    """Check that a search on this cluster can keep its results in ``storage``.

    ``storage``: a local directory (relative paths: to the working directory)
    or a URI pyarrow opens (``s3://``, ``gs://``, ``abfs://``, ``file://``...).

    ``nodes``: the cluster: ``None`` asks the Ray this process has joined
    (``ray.nodes()``; one node when Ray is not initialised), an ``int`` is the
    number of alive nodes, a list is ``ray.nodes()``'s output.

    ``assume_shared``: accept a local path on several nodes although its
    filesystem type is not one known to be shared (a shared filesystem this
    module does not know; the user says every node mounts it).

    Returns the storage to use: the URI as given, or the absolute local path.
    Raises :class:`StorageError` with a message that names the storage, the
    number of nodes and what would work:

    - a URI whose scheme or location pyarrow refuses (unknown scheme, no
      region for a bucket, missing filesystem library);
    - a local path on a cluster of more than one alive node, unless its
      filesystem (from ``mounts_file``) is a shared one or ``assume_shared``.
    """
    raw = os.fspath(storage)
    if not raw or not raw.strip():
        raise StorageError(f"storage: empty; {SHARED_HINT}")
    count = alive_node_count(nodes)
    if is_uri(raw) and not raw.startswith("file://"):
        open_uri(raw)
        return raw
    local = Path(raw[len("file://") :] if raw.startswith("file://") else raw).expanduser().resolve()
    if count <= 1 or assume_shared:
        return str(local)
    # Mount points are matched on the path itself: it may not exist yet (the search creates it).
    mount = mount_of(local, read_mounts(mounts_file))
    if mount is not None and mount.shared:
        return str(local)
    where = f"{mount.mount_point} (a {mount.fs_type} filesystem)" if mount else "a filesystem missing from the mount table"
    raise StorageError(
        f"storage {raw!r} ({local}) is on {where}, local to this machine, but the Ray cluster has "
        f"{count} alive nodes: trials on the other nodes would write their checkpoints and TensorBoard "
        f"events to their own disks, where the search cannot read them back; {SHARED_HINT}"
    )


def open_uri(uri: str):
    """``(filesystem, path)`` of a URI, or :class:`StorageError` with pyarrow's reason."""
    import pyarrow.fs  # pyarrow.fs: only for URI storage

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # ArrowInvalid (scheme), OSError (region, libjvm, credentials)
        reason = " ".join(str(exc).split())
        hint = ""
        if uri.startswith("s3://") and "region" in reason.lower():
            hint = " (name the bucket's region in the URI to skip the lookup: s3://BUCKET/DIR?region=us-west-2)"
        raise StorageError(f"storage {uri!r}: pyarrow cannot open this URI: {reason}{hint}; {SHARED_HINT}") from None


# ------------------------------------------------------------------ probing a live cluster


def _read_marker(uri_or_path: str, marker: str) -> tuple[str, str | None]:
    """On a node: read the marker file back; returns (node ip, error or None)."""
    import ray  # ray: heavy, only when this runs

    ip = ray.util.get_node_ip_address()
    try:
        if is_uri(uri_or_path) and not uri_or_path.startswith("file://"):
            import pyarrow.fs  # pyarrow.fs: only for URI storage

            fs, base = pyarrow.fs.FileSystem.from_uri(uri_or_path)
            with fs.open_input_stream(f"{base.rstrip('/')}/{marker}") as f:
                content = f.read().decode()
        else:
            content = (Path(uri_or_path) / marker).read_text()
    except Exception as exc:
        return ip, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return ip, None if content == marker else f"read {content!r} instead of the marker written"


def probe_storage(storage: str, timeout_s: float = 120.0) -> list[str]:
    """Write a marker through ``storage`` here and read it back on every alive node.

    Needs Ray initialised (joined to the cluster). Returns the IPs of the
    nodes that read it; raises :class:`StorageError` naming the nodes that did
    not and their error. The marker is removed afterwards.
    """
    import ray  # ray: heavy, only when this runs
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # ray: heavy, only when this runs

    if not ray.is_initialized():
        raise StorageError("probe_storage needs a Ray cluster: call ray.init(address=...) first")
    marker = f".vlptune-storage-probe-{uuid.uuid4().hex}"
    remote = is_uri(storage) and not storage.startswith("file://")
    if remote:
        fs, base = open_uri(storage)
        try:
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(f"{base.rstrip('/')}/{marker}") as f:
                f.write(marker.encode())
        except Exception as exc:
            raise StorageError(f"storage {storage!r}: cannot write a file there from this node: {' '.join(str(exc).split())}") from None
    else:
        local = Path(storage[len("file://") :] if storage.startswith("file://") else storage)
        try:
            local.mkdir(parents=True, exist_ok=True)
            (local / marker).write_text(marker)
        except OSError as exc:
            raise StorageError(f"storage {storage!r}: cannot write a file there from this node: {exc}") from None
        storage = str(local)
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        reader = ray.remote(num_cpus=0)(_read_marker)
        refs = [reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)).remote(storage, marker) for n in alive]
        deadline = time.monotonic() + timeout_s
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        failures = [f"{ip}: {err}" for ip, err in ray.get(ready) if err]
        for node, ref in zip(alive, refs):
            if ref in pending:
                failures.append(f"{node.get('NodeManagerAddress', node['NodeID'])}: no answer within {timeout_s:g} s")
        if failures:
            raise StorageError(
                f"storage {storage!r}: {len(failures)} of {len(alive)} node(s) cannot read a file written there "
                f"from this node: " + "; ".join(failures) + f"; {SHARED_HINT}"
            )
        return sorted(ip for ip, _ in ray.get(ready))
    finally:
        try:
            if remote:
                fs.delete_file(f"{base.rstrip('/')}/{marker}")
            else:
                (Path(storage) / marker).unlink(missing_ok=True)
        except Exception:
            pass
