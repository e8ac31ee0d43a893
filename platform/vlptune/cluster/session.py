"""The Ray cluster a command runs on: join one, or start a local one on 127.0.0.1 (and stop it again).

* :func:`cluster_address`: which cluster (``--address``, else ``RAY_ADDRESS``,
  else a new local one), and why;
* :func:`connect`: join it, or start the local cluster (:func:`start_local`),
  saying which in one line; :func:`describe_cluster` is that line's figures;
* :data:`RAY_ENV`: the environment every Ray process of the search gets (a
  local cluster's processes inherit it, a joined cluster's job gets it as its
  ``runtime_env``); :func:`set_local_env` sets it, with what a local cluster
  needs besides (:data:`LOCAL_ENV_KEYS`);
* :class:`LocalSession`: undoes what starting a local cluster did to this process;
* :func:`ray_session`: a command's whole stay on a cluster (connect, run, shut
  Ray down, and undo a local cluster's changes to this process).

Used by :mod:`vlptune.search` (searches and studies); imports nothing of it.
Ray is imported inside the functions that use it (heavy dependency kept lazy).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

NO_AUTOSCALER_ENV = "VLPTUNE_NO_AUTOSCALER"  # set in every process of a local cluster the search started (search/lean_train.py)


class SessionError(RuntimeError):
    """A Ray cluster that cannot be joined (names the address, why it was chosen, and the problem)."""


# Environment of every Ray process of a local cluster (set before ray.init, inherited),
# or of the job's processes on a cluster joined with --address (runtime_env).
RAY_ENV = {
    # Workers keep the driver's working directory: relative paths in recipes keep working.
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # One actor process less per trial (preemption watching matters on spot clusters only).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The Train controller polls workers (and forwards their reports) every 2 s by default.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # No Prometheus metrics of Train runs (a callback on the controller and on each worker).
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # Train V2 (the default in Ray 2.60; stated so an older environment default cannot flip it).
    "RAY_TRAIN_V2_ENABLED": "1",
    # No Ray usage statistics, nothing leaves the machine.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Tune's own TensorBoard logger would add a second run per trial; CSV/JSON are added explicitly.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TRANSFORMERS_OFFLINE": os.environ.get("TRANSFORMERS_OFFLINE", "1"),
}


LOCAL_ENV_KEYS = (*RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT", NO_AUTOSCALER_ENV)


def set_local_env() -> None:
    """Environment for a local cluster: inherited by every Ray process it starts."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    # Bind the local cluster to the loopback interface: with clustering disabled Ray
    # uses 127.0.0.1 as the node address (GCS, raylet, object manager, dashboard).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # a local cluster has no autoscaler: trials make no resource requests (vlptune.search.lean_train)
    os.environ[NO_AUTOSCALER_ENV] = "1"
    _set_cluster_flag(os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false", "False"))


def _set_cluster_flag(enabled: bool) -> None:
    try:
        import ray._private.ray_constants as rc  # heavy dependency kept lazy

        rc.ENABLE_RAY_CLUSTER = enabled
    except (ImportError, AttributeError):  # pragma: no cover - layout of a future Ray
        pass


class LocalSession:
    """Undo what starting a local cluster did to this process (env, Ray's node-address
    flag), and stop the cluster: a later ``ray.init()`` in the same process (a test,
    a notebook) must not find a RAY_ADDRESS pointing at a cluster that is gone."""

    def __init__(self) -> None:
        self.saved = {key: os.environ.get(key) for key in LOCAL_ENV_KEYS}
        try:
            import ray._private.ray_constants as rc  # heavy dependency kept lazy

            self.flag = rc.ENABLE_RAY_CLUSTER
        except (ImportError, AttributeError):  # pragma: no cover
            self.flag = True

    def close(self) -> None:
        import ray  # heavy dependency kept lazy

        if ray.is_initialized():
            ray.shutdown()
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _set_cluster_flag(self.flag)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Set by Ray's job supervisor in the environment of a job's entrypoint (with RAY_ADDRESS, the
# cluster's GCS address): `vlptune submit -- search ...` runs with both.
RAY_JOB_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def cluster_address(address: str | None, environ: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The Ray cluster a search joins, and why: ``(address, source)``; ``None``: start a local one.

    ``--address`` first; else ``RAY_ADDRESS`` (inside a Ray job the supervisor
    sets it to the job's cluster, so the search runs on that cluster); a
    ``RAY_ADDRESS`` that is a dashboard URL (``http://HEAD:8265``, what
    ``vlptune submit`` and ``ray job`` use) names no cluster to join and is
    ignored; else a new local cluster.
    """
    env_map: Mapping[str, str] = os.environ if environ is None else environ
    if address:
        return address, "--address"
    env = (env_map.get("RAY_ADDRESS") or "").strip()
    if not env:
        return None, "no --address and no RAY_ADDRESS"
    if env.lower().startswith(("http://", "https://")):
        return None, (
            f"no --address; RAY_ADDRESS={env} is a dashboard (job API) address, not a cluster to join, so it is "
            "ignored here; pass --address auto (or the GCS address HEAD:6379, or ray://HEAD:10001) to join a cluster"
        )
    if env_map.get(RAY_JOB_ENV_VAR):
        return env, "RAY_ADDRESS, set by the Ray job that runs this search"
    return env, "RAY_ADDRESS from the environment; unset it to start a local cluster on this machine instead"


def _unreachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why ``HOST:PORT`` (or ``ray://HOST:PORT``) cannot be reached, or None (reached, or not that form:
    ``auto`` is Ray's to resolve). Ray itself retries a dead address for many minutes."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or exc})"


def describe_cluster() -> str:
    """``N alive node(s), C CPU, G GPU`` of the Ray this process joined."""
    import ray  # heavy dependency kept lazy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return f"{len(alive)} alive node(s), {float(total.get('CPU', 0)):g} CPU, {float(total.get('GPU', 0)):g} GPU"


def connect(
    address: str | None, num_cpus: int | None = None, num_gpus: int | None = None, worker_log_level: str = "WARNING", say: Callable[[str], None] | None = None
) -> str | None:
    """Join a cluster or start a local in-process one on 127.0.0.1 (with its dashboard).

    Which: :func:`cluster_address` (``address``, else ``RAY_ADDRESS``, else a
    local cluster). Prints one line saying which cluster this is and why, so a
    ``RAY_ADDRESS`` left in a shell cannot silently send a search elsewhere.
    Returns the address joined (``None``: a local cluster, or Ray was already
    initialised by the caller).

    ``worker_log_level``: Python logging level on every worker of the job (the
    loop's per-step INFO lines of many trials would drown Tune's status table;
    TensorBoard has them all). Ray keeps every worker's full log in its
    session directory either way. ``say``: where the one line goes (default: print).
    A cluster that cannot be joined: :class:`SessionError`.
    """
    say = say or (lambda line: print(line, flush=True))
    import ray  # heavy dependency kept lazy

    if ray.is_initialized():
        return None
    logging_config = ray.LoggingConfig(log_level=worker_log_level.upper())
    target, source = cluster_address(address)
    if target:
        unreachable = _unreachable(target)
        if unreachable:
            raise SessionError(f"cannot join the Ray cluster at {target} ({source}): {unreachable}")
        try:
            ray.init(address=target, runtime_env={"env_vars": dict(RAY_ENV)}, log_to_driver=True, logging_config=logging_config)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise SessionError(f"cannot join the Ray cluster at {target} ({source}): {' '.join(str(exc).split())}") from None
        say(f"ray cluster: joined {target} ({source}): {describe_cluster()}")
        return target
    start_local(num_cpus, num_gpus, logging_config)
    say(f"ray cluster: started a local cluster at {os.environ.get('RAY_ADDRESS')} ({source}): {describe_cluster()}")
    return None


def local_session_for(address: str | None) -> LocalSession | None:
    """A :class:`LocalSession` when :func:`connect` with ``address`` will start a local cluster (no cluster to join,
    Ray not yet initialised), else None: what its caller must undo afterwards."""
    import ray  # heavy dependency kept lazy

    target, _ = cluster_address(address)
    return None if (target or ray.is_initialized()) else LocalSession()


@contextlib.contextmanager
def ray_session(address: str | None, **kwargs: Any) -> Iterator[str | None]:
    """:func:`connect` (``kwargs`` are its own) for the body of a ``with``; after it, whatever happened, Ray is shut
    down and a local cluster this started is undone (:class:`LocalSession`: ``RAY_ADDRESS`` and the rest of its
    environment as they were, so a second command in the same process starts its own cluster instead of joining the
    one that is gone). Yields what :func:`connect` returns."""
    import ray  # heavy dependency kept lazy

    local = local_session_for(address)
    try:
        yield connect(address, **kwargs)
    finally:
        if local is not None:
            local.close()
        elif ray.is_initialized():
            ray.shutdown()


def start_local(num_cpus: int | None, num_gpus: int | None, logging_config: Any) -> None:
    """Start a local cluster on 127.0.0.1 (``num_cpus`` default: this process's CPUs) with its GCS port exported."""
    import ray  # heavy dependency kept lazy

    set_local_env()
    cpus = num_cpus if num_cpus is not None else len(os.sched_getaffinity(0))
    kwargs: dict[str, Any] = {}
    if num_gpus is not None:
        kwargs["num_gpus"] = num_gpus
    # The cluster's own processes find it through RAY_ADDRESS. Without it, Ray
    # Train's placement-group cleaner (a state-API client inside the cluster)
    # auto-detects "the" Ray instance on the machine, and gives up when another
    # user's cluster runs there too: the placement groups of stopped trials then
    # stay reserved and later trials wait for workers forever. So the GCS port is
    # chosen here and exported (inherited by every process of the new cluster).
    for attempt in range(3):
        port = free_loopback_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        try:
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                logging_config=logging_config,
                **kwargs,
            )
            return
        except Exception:
            if ray.is_initialized():
                ray.shutdown()
            if attempt == 2:
                raise
        finally:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
