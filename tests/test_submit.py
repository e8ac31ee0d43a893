"""`vlptune submit` / `vlptune jobs` / `vlptune storage check`, and check_storage.

The job tests run against a REAL Ray head that the module fixture starts on
this machine, bound to the loopback interface, with token authentication on:

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<fresh random token>
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # node address 127.0.0.1: GCS, raylet, dashboard,
                                          # agents, client server all listen on 127.0.0.1
    ray start --head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
              --port=P --dashboard-port=D (and every other port: free ones)
              --temp-dir=/tmp/vlpt-ray-XXXX --num-cpus=2

How it stops without touching anyone else's Ray (`ray stop` would stop every
Ray on the machine, other engineers' test clusters included): the head runs as
`ray start --block` in its own session, with a unique marker variable in its
environment (VLPTUNE_TEST_RAY_CLUSTER=<uuid>) that every process it starts
inherits (GCS, raylet, dashboard, workers, job drivers). The finalizer sends
SIGTERM to that `ray start` process, whose handler kills the processes it
started (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: no 30 s drain); then it
sweeps /proc for processes still carrying the marker (a job's entrypoint
orphaned mid-run, say) and kills those, by pid. No other process is signalled.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from vlptune.cluster import cli as cluster_cli
from vlptune.cluster.storage import Mount, StorageError, check_storage, is_uri, mount_of, read_mounts
from vlptune.cluster.submit import ClusterError, entrypoint_for, find_token, format_jobs, load_runtime_env, resolve_address

# Ray's own job-log websocket client; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
TINY_SEARCH = ROOT / "tests" / "data" / "tiny_search.yaml"
MARKER_VAR = "VLPTUNE_TEST_RAY_CLUSTER"


def run_cli(argv: list[str]) -> int:
    """`vlptune ARGV` through this package's parsers (as the top-level dispatcher wires them)."""
    return cluster_cli.main(argv)


# ------------------------------------------------------------------ address, token, entrypoint


def test_address_lookup_follows_ray_job_cli():
    assert resolve_address(None, env={}) == "http://127.0.0.1:8265"
    assert resolve_address(None, env={"RAY_ADDRESS": "http://head:8265/"}) == "http://head:8265"
    assert resolve_address(None, env={"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}) == "http://b:8265"
    assert resolve_address("head:8265", env={"RAY_ADDRESS": "http://x:1"}) == "http://head:8265"
    with pytest.raises(ClusterError, match=r"Ray Client address.*http://HEAD:8265"):
        resolve_address("ray://head:10001", env={})
    with pytest.raises(ClusterError, match="RAY_ADDRESS is 'ftp://x'"):
        resolve_address(None, env={"RAY_ADDRESS": "ftp://x"})


def test_token_found_where_ray_looks(tmp_path):
    home = tmp_path / "home"
    assert find_token(env={}, home=home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token(env={}, home=home).value == "from-home"
    token_file = tmp_path / "tok"
    token_file.write_text("  from-path  ")
    found = find_token(env={"RAY_AUTH_TOKEN_PATH": str(token_file)}, home=home)
    assert found.value == "from-path" and "RAY_AUTH_TOKEN_PATH" in found.source
    found = find_token(env={"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}, home=home)
    assert found.value == "from-env" and "from-env" not in found.source  # the source never shows the secret
    # A token path that does not hold a token is an error (Ray aborts on it), not a fallback.
    with pytest.raises(ClusterError, match=r"RAY_AUTH_TOKEN_PATH names .*missing.*cannot be read"):
        find_token(env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=home)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterError, match="is empty"):
        find_token(env={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home=home)


def test_entrypoint_runs_the_shipped_vlptune():
    assert entrypoint_for(["vlptune", "config", "show", "trials/demo-light.yaml"]) == "python -m vlptune.cli config show trials/demo-light.yaml"
    assert entrypoint_for(["--", "search", "s.yaml", "-o", "name=a b"]) == "python -m vlptune.cli search s.yaml -o 'name=a b'"
    assert entrypoint_for(["python", "bench/train_step.py", "--steps", "3"]) == "python bench/train_step.py --steps 3"
    with pytest.raises(ClusterError, match="nothing to submit"):
        entrypoint_for(["vlptune"])


def test_submit_parser_keeps_the_command_after_double_dash():
    import argparse

    parser = argparse.ArgumentParser(prog="vlptune")
    cluster_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", "--follow", "--", "search", "x.yaml", "--address", "auto", "--follow"])
    assert args.follow and args.address is None
    assert entrypoint_for(args.command) == "python -m vlptune.cli search x.yaml --address auto --follow"


def test_runtime_env_errors_name_file_and_field(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "cluster").mkdir()
    f = tmp_path / "cluster" / "env.yaml"

    def load(text: str):
        f.write_text(text)
        return load_runtime_env(f)

    env = load("working_dir: .\nexcludes: [/data/]\n")
    assert env["working_dir"] == str(tmp_path)  # relative to the project root, not to cluster/
    with pytest.raises(ClusterError, match=r"env\.yaml: working_dir: 'nowhere' resolves to .* not a directory"):
        load("working_dir: nowhere\n")
    with pytest.raises(ClusterError, match=r"env\.yaml: env_vars\.HF_HUB_OFFLINE: `vlptune search` sets .* itself"):
        load("working_dir: .\nenv_vars: {HF_HUB_OFFLINE: '0'}\n")
    with pytest.raises(ClusterError, match=r"env_vars\.N: Ray wants every value as a string"):
        load("env_vars: {N: 3}\n")
    with pytest.raises(ClusterError, match=r"env\.yaml: not valid YAML \(line 2, column 12\): mapping values are not allowed"):
        load("working_dir: .\nexcludes: a: b\n")
    with pytest.raises(ClusterError, match=r"env\.yaml: workin_dir: not a Ray runtime_env field \(known: .*working_dir"):
        load("workin_dir: .\n")
    with pytest.raises(ClusterError, match=r"env\.yaml: not a valid Ray runtime_env: .*pip"):
        load("pip: 3\n")
    with pytest.raises(ClusterError, match=r"cannot read the runtime env file"):
        load_runtime_env(tmp_path / "absent.yaml")


def test_jobs_table_lists_newest_first():
    from types import SimpleNamespace

    from ray.job_submission import JobStatus

    def job(i, status, start, end):
        return SimpleNamespace(
            submission_id=f"raysubmit_{i}",
            job_id=None,
            status=status,
            start_time=start,
            end_time=end,
            entrypoint=f"python -m vlptune.cli x{i}",
            metadata={"vlptune_command": f"vlptune search s{i}.yaml"},
        )

    text = format_jobs([job(1, JobStatus.SUCCEEDED, 1_000_000, 1_065_000), job(2, JobStatus.FAILED, 2_000_000, 2_003_000)])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["JOB", "ID"]
    assert lines[1].split()[:2] == ["raysubmit_2", "FAILED"] and lines[1].endswith("vlptune search s2.yaml")
    assert "1:05" in lines[2]


# ------------------------------------------------------------------ storage


def _mounts(tmp_path, text: str) -> Path:
    path = tmp_path / "mounts"
    path.write_text(text)
    return path


MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0
bucket /mnt/gcs fuse.gcsfuse rw 0 0
/dev/sdb1 /mnt/shared/local\\040disk ext4 rw 0 0
"""


def test_mount_table_longest_prefix_and_escapes(tmp_path):
    mounts = read_mounts(_mounts(tmp_path, MOUNTS))
    assert mount_of("/mnt/shared/exp", mounts).fs_type == "nfs4"
    assert mount_of("/mnt/shared/local disk/x", mounts).fs_type == "ext4"
    assert mount_of("/mnt/sharedX", mounts).fs_type == "overlay"  # a prefix of the name is not a parent
    assert mount_of("/tmp/a", mounts).mount_point == "/tmp"
    assert Mount("/x", "fuse.sshfs", "h:/x").shared and not Mount("/x", "fuse.portal", "p").shared


def test_local_storage_is_fine_on_one_node(tmp_path):
    assert check_storage(tmp_path / "runs", nodes=1) == str((tmp_path / "runs").resolve())
    # Dead nodes do not count.
    nodes = [{"Alive": True, "NodeID": "a"}, {"Alive": False, "NodeID": "b"}]
    assert check_storage("runs/search", nodes=nodes) == str((Path.cwd() / "runs/search").resolve())
    assert check_storage("file:///tmp/x", nodes=1) == "/tmp/x"
    # No Ray joined in this process: the search would run on this machine alone.
    assert check_storage("runs/search") == str((Path.cwd() / "runs/search").resolve())


def test_a_node_that_cannot_read_the_marker_says_why(tmp_path):
    from vlptune.cluster.storage import _read_marker

    (tmp_path / "m1").write_text("m1")
    (tmp_path / "m2").write_text("something else")
    assert _read_marker(str(tmp_path), "m1")[1] is None
    assert "FileNotFoundError" in _read_marker(str(tmp_path), "absent")[1]
    assert "instead of the marker" in _read_marker(str(tmp_path), "m2")[1]


def test_local_storage_is_refused_on_several_nodes(tmp_path):
    mounts = _mounts(tmp_path, MOUNTS)
    nodes = [{"Alive": True, "NodeID": "a"}, {"Alive": True, "NodeID": "b"}, {"Alive": False, "NodeID": "c"}]
    with pytest.raises(StorageError) as err:
        check_storage("/tmp/vlptune/runs", nodes=nodes, mounts_file=mounts)
    message = str(err.value)
    assert "'/tmp/vlptune/runs'" in message and "on /tmp (a tmpfs filesystem)" in message
    assert "2 alive nodes" in message and "s3://" in message and "gs://" in message
    with pytest.raises(StorageError, match=r"on /mnt/shared/local disk \(a ext4 filesystem\)"):
        check_storage("/mnt/shared/local disk/exp", nodes=2, mounts_file=mounts)
    # Shared filesystems are accepted, a path that does not exist yet included.
    assert check_storage("/mnt/shared/vlptune/search", nodes=2, mounts_file=mounts) == "/mnt/shared/vlptune/search"
    assert check_storage("/mnt/gcs/exp", nodes=2, mounts_file=mounts) == "/mnt/gcs/exp"
    # The user vouches for a shared filesystem this module does not know.
    assert check_storage("/tmp/vlptune/runs", nodes=2, assume_shared=True, mounts_file=mounts) == "/tmp/vlptune/runs"


def test_uri_storage_is_opened_with_pyarrow():
    assert is_uri("s3://b/x") and is_uri("gs://b") and not is_uri("/a/b") and not is_uri("runs/x:y")
    uri = "s3://bucket/vlptune?region=us-west-2"
    assert check_storage(uri, nodes=5) == uri
    assert check_storage("gs://bucket/vlptune", nodes=5) == "gs://bucket/vlptune"
    with pytest.raises(StorageError, match=r"storage 'foo://x/y': pyarrow cannot open this URI: .*Unrecognized filesystem type"):
        check_storage("foo://x/y", nodes=5)
    with pytest.raises(StorageError, match="empty"):
        check_storage(" ", nodes=1)


# ------------------------------------------------------------------ a real head on 127.0.0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return pids


class LoopbackHead:
    """A Ray head of this test module, on 127.0.0.1, token authentication on."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="vlpt-ray-", dir="/tmp")  # short: Ray's socket paths
        self.token = secrets.token_hex(24)
        self.marker = uuid.uuid4().hex
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = Path(self.temp_dir) / "ray-start.log"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the jobs' `python`
        )
        env[MARKER_VAR] = self.marker
        return env

    def start(self, timeout_s: float = 180.0) -> None:
        import requests

        ports = {
            name: _free_port()
            for name in (
                "node-manager-port",
                "object-manager-port",
                "dashboard-agent-grpc-port",
                "dashboard-agent-listen-port",
                "metrics-export-port",
                "runtime-env-agent-port",
                "ray-client-server-port",
            )
        }
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            f"--temp-dir={self.temp_dir}",
            "--num-cpus=2",
            "--num-gpus=0",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir)
        deadline = time.monotonic() + timeout_s
        headers = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/api/jobs/", headers=headers, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the test head's job API did not answer in {timeout_s:g} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` kills what it started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids = _marked_pids(self.marker)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while _marked_pids(self.marker) and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(request):
    h = LoopbackHead()
    request.addfinalizer(h.stop)
    h.start()
    return h


@pytest.fixture
def client_env(head, monkeypatch, tmp_path):
    """The submitting side: the cluster's token in RAY_AUTH_TOKEN, nothing from the real home."""
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
    monkeypatch.chdir(ROOT)
    return head


def _job_id(stdout: str) -> str:
    ids = [line for line in stdout.splitlines() if line.startswith("raysubmit_")]
    assert ids, stdout
    return ids[0].strip()


def test_submit_trivial_command_and_follow_to_succeeded(client_env, capsys):
    head = client_env
    rc = run_cli(["submit", "--address", head.url, "--follow", "--", "vlptune", "config", "show", "trials/demo-light.yaml"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    job_id = _job_id(out)
    assert "name: demo-light" in out  # the job's output, streamed
    assert f"job {job_id} SUCCEEDED" in err
    # The job API around it.
    assert run_cli(["jobs", "list", "--address", head.url]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "vlptune config show trials/demo-light.yaml" in row
    assert run_cli(["jobs", "logs", job_id, "--address", head.url]) == 0
    assert "name: demo-light" in capsys.readouterr().out
    assert run_cli(["jobs", "status", job_id, "--address", head.url]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id} SUCCEEDED")


def test_failing_job_reports_failed_with_its_error(client_env, capsys):
    head = client_env
    rc = run_cli(["submit", "--address", head.url, "--follow", "--", "config", "show", "trials/no-such-recipe.yaml"])
    out, err = capsys.readouterr()
    assert rc == 1
    job_id = _job_id(out)
    assert f"job {job_id} FAILED" in err
    assert "exit code 2" in err  # `vlptune config show` exits 2 on a bad recipe
    assert "no-such-recipe.yaml" in out + err  # its error message, from the job's logs
    assert run_cli(["jobs", "status", job_id, "--address", head.url]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_stop_a_running_job(client_env, capsys):
    head = client_env
    assert run_cli(["submit", "--address", head.url, "--", "python", "-c", "import time; print('started', flush=True); time.sleep(600)"]) == 0
    job_id = _job_id(capsys.readouterr().out)
    assert run_cli(["jobs", "stop", job_id, "--wait", "60", "--address", head.url]) == 0
    assert f"job {job_id} STOPPED" in capsys.readouterr().out
    assert run_cli(["jobs", "logs", "raysubmit_doesnotexist", "--address", head.url]) == 2
    assert "raysubmit_doesnotexist" in capsys.readouterr().err


def run_cli_process(argv: list[str]) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it.

    Ray caches the authentication mode and token per process: once a test in
    this pytest process has started a local cluster, Ray's own client would add
    that cluster's token to every request, so "no token" is only observable in a
    fresh process.
    """
    return subprocess.run([sys.executable, "-m", "vlptune.cli", *argv], capture_output=True, text=True, timeout=120)


def test_missing_or_wrong_token_is_explained(client_env, monkeypatch, capsys):
    head = client_env
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    done = run_cli_process(["jobs", "list", "--address", head.url])
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr
    assert err.startswith("error: the Ray cluster at " + head.url + " requires an authentication token"), err[-2000:]
    assert "RAY_AUTH_TOKEN" in err and "RAY_AUTH_TOKEN_PATH" in err and "~/.ray/auth_token" in err and "ray get-auth-token" in err
    assert "Traceback" not in err
    # Submitting says the same before anything is uploaded.
    done = run_cli_process(["submit", "--address", head.url, "--", "config", "show", "trials/demo-light.yaml"])
    assert done.returncode == 2 and "requires an authentication token" in done.stderr
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert run_cli(["jobs", "list", "--address", head.url]) == 2
    err = capsys.readouterr().err
    assert "rejected the token from the RAY_AUTH_TOKEN environment variable" in err and "not-the-token" not in err
    # The token file Ray uses by default works too.
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = Path(os.environ["HOME"]) / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(head.token + "\n")
    assert run_cli(["jobs", "list", "--address", head.url]) == 0


def test_unreachable_dashboard_is_explained(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    url = f"http://127.0.0.1:{_free_port()}"
    assert run_cli(["jobs", "list", "--address", url]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray dashboard at {url}" in err and "ray dashboard cluster/ray-up.yaml" in err


def test_storage_check_probes_every_node_of_the_cluster(client_env, capsys, tmp_path):
    head = client_env
    store = tmp_path / "store"
    rc = run_cli(
        ["submit", "--address", head.url, "--follow", "--", "python", "-m", "vlptune.cluster.cli", "storage", "check", str(store), "--address", "auto"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, (out + err)[-3000:]
    assert f"storage {store}: usable by a search on 1 node(s)" in out
    assert "read back on every alive node: 127.0.0.1" in out
    assert store.is_dir() and not list(store.iterdir())  # the marker file was removed


def _search_command() -> list[str]:
    """`vlptune search` when the top-level CLI has it, else the search package's own entry point."""
    from vlptune.cli import build_parser

    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    return ["vlptune", "search"] if "search" in choices else ["python", "-m", "vlptune.search.cli", "search"]


@pytest.mark.slow  # ~40 s on an idle 2-core machine (a Tune trial: Train worker group, model, evaluation); minutes under load
def test_submit_a_tiny_search_and_find_its_results_in_storage(client_env, capsys, tmp_path):
    head = client_env
    storage, data = tmp_path / "storage", tmp_path / "data"
    command = [
        *_search_command(),
        str(TINY_SEARCH.relative_to(ROOT)),
        "--address",
        "auto",
        "--storage",
        str(storage),
        "--name",
        "tiny-job",
        "-o",
        f"data.root={data}",
    ]
    rc = run_cli(["submit", "--address", head.url, "--follow", "--", *command])
    out, err = capsys.readouterr()
    assert rc == 0, (out + err)[-4000:]
    assert "SUCCEEDED" in err
    exp = storage / "tiny-job"
    meta = json.loads((exp / "vlptune_search.json").read_text())
    assert meta["address"] == "auto" and meta["metric"] == "retrieval/rsum"
    from vlptune.search import results as res

    collected = res.collect(exp)
    text = res.format_table(collected)
    assert "completed" in text, text
    trial_dirs = [p for p in (exp / "tb").iterdir() if p.is_dir()]
    assert len(trial_dirs) == 1
    assert list(trial_dirs[0].rglob("events.out.tfevents.*")), "no TensorBoard events in the trial directory"
    assert (data / "manifest.json").is_file()  # the synthetic world went where -o data.root said
