"""Submit ``vlptune`` commands to a Ray cluster as Ray jobs, follow and manage them.

A job is a ``vlptune`` command run on the cluster's head node by the Ray job
API (the dashboard's HTTP endpoint, ``http://HEAD:8265``). The project's code
travels with it: the runtime env (``cluster/runtime_env.yaml``) makes the
repository root the job's working directory (without data, runs, results,
.venv, .git) and puts its ``platform/`` first on every Ray worker's
``PYTHONPATH``, so the code that runs is the code of this checkout, whatever
version of vlptune the nodes have installed.

Token authentication: a Ray 2.52+ cluster started with ``RAY_AUTH_MODE=token``
refuses every API call without its token (HTTP 401). The client looks for the
token where Ray itself does (Ray's ``AuthenticationTokenLoader``), in this
order: the ``RAY_AUTH_TOKEN`` environment variable, the file named by
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; and sends it as
``Authorization: Bearer ...`` whether or not ``RAY_AUTH_MODE`` is set in the
client's shell. A missing or wrong token becomes a :class:`ClusterError` that
says where to put it.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from vlptune.cluster.session import RAY_ENV

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RUNTIME_ENV_FILE = Path("cluster") / "runtime_env.yaml"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Runtime-env fields whose values are local paths (resolved against the project root).
_PATH_FIELDS = ("working_dir",)

TOKEN_HELP = (
    "give the client the cluster's token in one of the places Ray looks: the RAY_AUTH_TOKEN "
    "environment variable, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. On the "
    "head node `ray get-auth-token` prints it; a `ray up` cluster of cluster/ray-up.yaml uses the "
    "~/.ray/auth_token of the machine that ran `ray up`; on KubeRay it is in the Secret named in "
    "cluster/kuberay/raycluster.yaml (see cluster/README.md, 'Token')"
)


class ClusterError(RuntimeError):
    """A job that cannot be submitted or followed; the message says why and what to do."""


# ------------------------------------------------------------------ address and token


def resolve_address(address: str | None, env: Mapping[str, str] | None = None) -> str:
    """The dashboard address, looked up as ``ray job`` does.

    ``address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``, else
    ``http://127.0.0.1:8265``. ``HOST:PORT`` without a scheme gets
    ``http://``; a Ray Client address (``ray://``) is refused: the job API is
    the dashboard's HTTP port.
    """
    env = os.environ if env is None else env
    source, value = "the default", DEFAULT_ADDRESS
    for name, candidate in (("--address", address), ("RAY_API_SERVER_ADDRESS", env.get("RAY_API_SERVER_ADDRESS")), ("RAY_ADDRESS", env.get("RAY_ADDRESS"))):
        if candidate and candidate.strip():
            source, value = name, candidate.strip()
            break
    if value.startswith("ray://"):
        raise ClusterError(
            f"{source} is {value!r}, a Ray Client address; jobs are submitted to the dashboard's "
            f"HTTP port instead: http://HEAD:8265 (e.g. after `ray dashboard cluster/ray-up.yaml`, {DEFAULT_ADDRESS})"
        )
    if value == "auto":
        return value
    if "://" not in value:
        value = "http://" + value
    if not value.startswith(("http://", "https://")):
        raise ClusterError(f"{source} is {value!r}; expected the dashboard's address, http://HOST:8265")
    return value.rstrip("/")


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it was found, for messages (never the value itself)


def find_token(env: Mapping[str, str] | None = None, home: str | os.PathLike | None = None) -> Token | None:
    """The cluster token, looked up in Ray's order; ``None`` when there is none.

    ``RAY_AUTH_TOKEN`` (non-empty) wins; then the file named by
    ``RAY_AUTH_TOKEN_PATH``, which must exist and hold a token (Ray treats an
    unreadable one as a fatal misconfiguration, so does this); then
    ``~/.ray/auth_token``.
    """
    env = os.environ if env is None else env
    value = env.get(TOKEN_ENV, "").strip()
    if value:
        return Token(value, f"the {TOKEN_ENV} environment variable")
    path_value = env.get(TOKEN_PATH_ENV, "").strip()
    if path_value:
        path = Path(path_value).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ClusterError(f"{TOKEN_PATH_ENV} names {path}, which cannot be read: {exc.strerror or exc}") from None
        if not value:
            raise ClusterError(f"{TOKEN_PATH_ENV} names {path}, which is empty; it should hold the cluster's token")
        return Token(value, f"{path} ({TOKEN_PATH_ENV})")
    path = Path(home if home is not None else Path.home()) / DEFAULT_TOKEN_FILE
    try:
        value = path.read_text().strip()
    except OSError:
        return None
    return Token(value, str(path)) if value else None


def connect(address: str | None = None, env: Mapping[str, str] | None = None, home: str | os.PathLike | None = None):
    """A ``JobSubmissionClient`` for ``address`` with the token found by :func:`find_token`.

    Raises :class:`ClusterError` when the dashboard cannot be reached or refuses the token.
    """
    from ray.job_submission import JobSubmissionClient  # ray: heavy, only when this runs

    url = resolve_address(address, env)
    token = find_token(env, home)
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    return _call(url, token, lambda: _client_for(JobSubmissionClient, url, headers))


ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def _client_for(client_cls: Callable[..., Any], url: str, headers: dict[str, str]) -> Any:
    """Build the client for exactly ``url``.

    Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address
    it is given; :func:`resolve_address` has already honoured them, so they are
    hidden while the client is built (a stale RAY_ADDRESS left by an earlier
    local cluster must not redirect an explicit ``--address``).
    """
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV_VARS if name in os.environ}
    try:
        return client_cls(url, headers=headers)
    finally:
        os.environ.update(saved)


def _call(url: str, token: Token | None, fn: Callable[[], Any]) -> Any:
    """Run one job-API call; authentication and connection failures in plain words."""
    import requests  # requests: comes with ray's client, only when a job is submitted
    from ray.exceptions import AuthenticationError  # ray: heavy, only when this runs

    try:
        return fn()
    except AuthenticationError as exc:
        text = str(exc)
        if text.startswith("Authentication failed"):  # HTTP 403: a token was sent, the wrong one
            raise ClusterError(
                f"the Ray cluster at {url} rejected the token from {token.source if token else 'the request headers'}: it is not "
                f"this cluster's token (HTTP 403); {TOKEN_HELP}"
            ) from None
        where = f" (the one sent came from {token.source})" if token else ""
        raise ClusterError(
            f"the Ray cluster at {url} requires an authentication token (token authentication is on, HTTP 401) and this client has none{where}; {TOKEN_HELP}"
        ) from None
    except (ConnectionError, requests.exceptions.ConnectionError) as exc:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {url} ({type(exc).__name__}). Is the cluster up? For a "
            f"`ray up` cluster run `ray dashboard cluster/ray-up.yaml` in another terminal (it forwards the "
            f"head's 127.0.0.1:8265 to this machine); on Kubernetes `kubectl port-forward "
            f"svc/vlptune-head-svc 8265:8265`; or pass --address / set RAY_ADDRESS"
        ) from None


# ------------------------------------------------------------------ runtime env


def project_root(start: str | os.PathLike) -> Path | None:
    """The nearest directory at or above ``start`` holding a ``pyproject.toml``."""
    path = Path(start).resolve()
    for candidate in (path, *path.parents):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


def default_runtime_env_file(cwd: str | os.PathLike | None = None) -> Path:
    """``cluster/runtime_env.yaml`` of the project around ``cwd``, else of the checkout vlptune runs from."""
    candidates = []
    root = project_root(cwd or Path.cwd())
    if root is not None:
        candidates.append(root / RUNTIME_ENV_FILE)
    package_root = project_root(Path(__file__).resolve().parent)
    if package_root is not None:
        candidates.append(package_root / RUNTIME_ENV_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ClusterError(
        f"no runtime env file: looked for {RUNTIME_ENV_FILE} in "
        + (", ".join(str(c.parent.parent) for c in candidates) or "no vlptune checkout")
        + "; run from a vlptune checkout or pass --runtime-env FILE"
    )


def load_runtime_env(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a runtime-env YAML, make its local paths absolute and validate it with Ray's parser.

    Relative ``working_dir`` and ``py_modules`` entries are resolved against
    the project root of the file (the nearest directory above it with a
    ``pyproject.toml``), so ``working_dir: .`` in cluster/runtime_env.yaml is
    the repository root wherever ``vlptune submit`` runs. ``env_vars`` may not
    repeat a variable that ``vlptune search`` sets itself when it joins the
    cluster (Ray refuses to merge a job's and a driver's env_vars that share a
    key). Errors name the file and the field.
    """
    file = Path(path) if path is not None else default_runtime_env_file()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ClusterError(f"{file}: cannot read the runtime env file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ClusterError(f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ClusterError(f"{file}: a runtime env is a mapping of Ray runtime_env fields (working_dir, excludes, env_vars, ...), not a {type(data).__name__}")
    from ray.runtime_env import RuntimeEnv  # ray: heavy, only when this runs

    # Ray takes an unknown key for a plugin's and silently ignores it when none is installed.
    known = set(RuntimeEnv.known_fields) | set(getattr(RuntimeEnv, "extensions_fields", ()))
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        public = ", ".join(sorted(k for k in known if not k.startswith("_")))
        raise ClusterError(f"{file}: {unknown[0]}: not a Ray runtime_env field (known: {public})")
    root = project_root(file.parent) or file.parent.resolve()
    env = dict(data)
    for key in _PATH_FIELDS:
        value = env.get(key)
        if isinstance(value, str) and "://" not in value:
            resolved = (root / value).resolve()
            if not resolved.is_dir():
                raise ClusterError(f"{file}: {key}: {value!r} resolves to {resolved}, which is not a directory (relative paths are relative to {root})")
            env[key] = str(resolved)
    if "py_modules" in env:
        if not isinstance(env["py_modules"], list):
            raise ClusterError(f"{file}: py_modules: expected a list of directories or URIs, got {type(env['py_modules']).__name__}")
        modules = []
        for i, value in enumerate(env["py_modules"]):
            if isinstance(value, str) and "://" not in value:
                resolved = (root / value).resolve()
                if not resolved.exists():
                    raise ClusterError(f"{file}: py_modules[{i}]: {value!r} resolves to {resolved}, which does not exist")
                value = str(resolved)
            modules.append(value)
        env["py_modules"] = modules
    env_vars = env.get("env_vars")
    if env_vars is not None:
        if not isinstance(env_vars, dict):
            raise ClusterError(f"{file}: env_vars: expected a mapping NAME: value, got {type(env_vars).__name__}")
        for name, value in env_vars.items():
            if not isinstance(value, str):
                raise ClusterError(f'{file}: env_vars.{name}: Ray wants every value as a string; quote it ({name}: "{value}")')
        clash = sorted(set(env_vars) & set(RAY_ENV))
        if clash:
            raise ClusterError(
                f"{file}: env_vars.{clash[0]}: `vlptune search` sets {', '.join(clash)} itself when it joins the "
                f"cluster (vlptune.cluster.session.RAY_ENV), and Ray refuses to merge a job's env_vars with the "
                f"driver's when a name repeats; remove {'it' if len(clash) == 1 else 'them'} from this file"
            )
    excludes = env.get("excludes")
    if excludes is not None and not (isinstance(excludes, list) and all(isinstance(e, str) for e in excludes)):
        raise ClusterError(f"{file}: excludes: expected a list of gitignore-style patterns (strings)")
    try:
        RuntimeEnv(**env)
    except Exception as exc:  # Ray raises TypeError/ValueError/RuntimeEnvSetupError naming the field
        raise ClusterError(f"{file}: not a valid Ray runtime_env: {' '.join(str(exc).split())}") from None
    return env


# ------------------------------------------------------------------ jobs


def entrypoint_for(command: list[str]) -> str:
    """The shell command a job runs for a vlptune command (``vlptune`` in front optional).

    ``python -m vlptune.cli ARGS``: the shipped code (first on PYTHONPATH)
    runs, even on nodes where the ``vlptune`` script is not installed. A
    command that starts with ``python``/``python3`` runs as given (a module
    or script of the shipped checkout, e.g. ``python bench/train_step.py``).
    """
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if args and Path(args[0]).name in ("python", "python3"):
        return shlex.join(args)  # a Python command as given (python -m vlptune.search.cli ..., python bench/x.py)
    if args and args[0] == "vlptune":
        args = args[1:]
    if not args:
        raise ClusterError("nothing to submit: give the vlptune command after --, e.g. vlptune submit -- search search_spaces/demo.yaml --address auto")
    return shlex.join(["python", "-m", "vlptune.cli", *args])


def submit(
    command: list[str],
    *,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    runtime_env_file: str | os.PathLike | None = None,
    submission_id: str | None = None,
    client=None,
) -> str:
    """Submit a vlptune command as a Ray job; returns the job's submission id."""
    entrypoint = entrypoint_for(command)
    env = runtime_env if runtime_env is not None else load_runtime_env(runtime_env_file)
    url = resolve_address(address)
    client = client or connect(address)
    metadata = {"vlptune_command": shlex.join(command)[:1000]}
    return _call(url, find_token(), lambda: client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id, metadata=metadata))


def follow(client, job_id: str, out: TextIO | None = None) -> str:
    """Stream the job's logs to ``out`` until it ends; returns its final status name."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    # The log stream closes when the job ends; the status may lag a moment behind.

    deadline = time.monotonic() + 30.0
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def exit_code(status: str) -> int:
    """0 for SUCCEEDED, 1 for anything else (FAILED, STOPPED, still running)."""
    return 0 if status == "SUCCEEDED" else 1


def _fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    end = end_ms or int(_dt.datetime.now().timestamp() * 1000)
    seconds = max(0, (end - start_ms) // 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_jobs(jobs: list) -> str:
    """A table of jobs, newest first: id, status, start, duration, command."""
    rows = [("JOB ID", "STATUS", "STARTED", "DURATION", "COMMAND")]
    for job in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        command = (job.metadata or {}).get("vlptune_command") or job.entrypoint or ""
        rows.append(
            (
                job.submission_id or job.job_id or "-",
                str(job.status.value),
                _fmt_time(job.start_time),
                _fmt_duration(job.start_time, job.end_time),
                command[:80],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows)


def job_call(address: str | None, fn: Callable[[Any], Any]) -> Any:
    """Connect, then run ``fn(client)`` with errors in plain words (a missing job named)."""
    url = resolve_address(address)
    client = connect(address)
    try:
        return _call(url, find_token(), lambda: fn(client))
    except RuntimeError as exc:
        if isinstance(exc, ClusterError):
            raise
        text = str(exc)
        if "does not exist" in text or "404" in text:
            raise ClusterError(f"{url}: {' '.join(text.split())} (see `vlptune jobs list`)") from None
        raise ClusterError(f"{url}: {' '.join(text.split())}") from None
