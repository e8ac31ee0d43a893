"""Sub-commands for a Ray cluster: ``submit``, ``jobs list|logs|stop|status``, ``storage check``.

Wired into ``vlptune`` by listing ``"vlptune.cluster.cli"`` in
``vlptune.cli.COMMAND_MODULES``; each parser's ``func`` takes the parsed
Namespace and returns the exit code (2 for a usage or connection problem,
with one ``error:`` line saying what to do).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from vlptune.cluster.storage import StorageError, alive_node_count, check_storage, probe_storage
from vlptune.cluster.submit import TERMINAL, ClusterError, connect, exit_code, follow, format_jobs, job_call, load_runtime_env, resolve_address, submit

ADDRESS_HELP = "the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265)"


def _errors(fn):
    """Turn the cluster's expected failures into one `error:` line and exit code 2."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ClusterError, StorageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    wrapped.__name__ = fn.__name__
    return wrapped


def _quiet_ray_client_logs() -> None:
    """Ray's per-file packaging chatter (INFO) and its notice that .git/.venv are no longer
    uploaded (our runtime env excludes them anyway) would bury the job id."""

    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def _follow_to_end(client, job_id: str) -> int:

    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (vlptune jobs stop {job_id} stops it)", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    message = f": {info.message.strip()}" if status != "SUCCEEDED" and info.message else ""
    print(f"job {job_id} {status}{message}", file=sys.stderr)
    return exit_code(status)


@_errors
def _submit(args: argparse.Namespace) -> int:

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    _quiet_ray_client_logs()
    runtime_env = load_runtime_env(args.runtime_env)
    url = resolve_address(args.address)
    client = connect(args.address)
    job_id = submit(command, address=args.address, runtime_env=runtime_env, submission_id=args.submission_id, client=client)
    print(job_id, flush=True)
    print(f"submitted to {url}; logs: vlptune jobs logs {job_id} --follow; stop: vlptune jobs stop {job_id}", file=sys.stderr, flush=True)
    if not args.follow:
        return 0
    return _follow_to_end(client, job_id)


@_errors
def _jobs_list(args: argparse.Namespace) -> int:

    jobs = job_call(args.address, lambda c: c.list_jobs())
    print(format_jobs(jobs) if jobs else "no jobs")
    return 0


@_errors
def _jobs_logs(args: argparse.Namespace) -> int:

    _quiet_ray_client_logs()
    if args.follow:
        job_call(args.address, lambda c: c.get_job_status(args.job_id))  # a missing job, named, before streaming
        return _follow_to_end(connect(args.address), args.job_id)
    sys.stdout.write(job_call(args.address, lambda c: c.get_job_logs(args.job_id)))
    return 0


@_errors
def _jobs_status(args: argparse.Namespace) -> int:

    info = job_call(args.address, lambda c: c.get_job_info(args.job_id))
    status = str(info.status.value)
    print(f"{args.job_id} {status}" + (f": {info.message.strip()}" if info.message else ""))
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


@_errors
def _jobs_stop(args: argparse.Namespace) -> int:

    stopped = job_call(args.address, lambda c: c.stop_job(args.job_id))
    if not stopped:
        status = job_call(args.address, lambda c: c.get_job_status(args.job_id)).value
        print(f"job {args.job_id} had already ended ({status})")
        return 0
    print(f"stop requested for job {args.job_id}")
    if args.wait:
        deadline = time.monotonic() + args.wait
        status = ""
        while time.monotonic() < deadline:
            status = str(job_call(args.address, lambda c: c.get_job_status(args.job_id)).value)
            if status in TERMINAL:
                print(f"job {args.job_id} {status}")
                return 0
            time.sleep(0.5)
        print(f"error: job {args.job_id} still {status} after {args.wait:g} s", file=sys.stderr)
        return 1
    return 0


@_errors
def _storage_check(args: argparse.Namespace) -> int:

    if args.address:
        import ray  # ray: heavy, only when this runs

        ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    storage = check_storage(args.storage, assume_shared=args.assume_shared)
    nodes = alive_node_count(None)
    print(f"storage {storage}: usable by a search on {nodes} node(s)")
    if args.address and not args.no_probe:
        ips = probe_storage(storage)
        print(f"a file written here was read back on every alive node: {', '.join(ips)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser(
        "submit",
        help="run a vlptune command on a Ray cluster as a Ray job (code shipped from this checkout)",
        description="Submit a vlptune command as a Ray job; prints the job id. Example: "
        "vlptune submit --follow -- search search_spaces/demo.yaml --address auto --storage /mnt/shared/vlptune",
    )
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--runtime-env", metavar="FILE", help="runtime env YAML (default: cluster/runtime_env.yaml of this checkout)")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 if it SUCCEEDED, 1 otherwise")
    submit.add_argument("--submission-id", help="the job's id (default: one Ray makes up, raysubmit_...)")
    submit.add_argument("command", nargs=argparse.REMAINDER, help="-- then the vlptune command, e.g. -- search search_spaces/demo.yaml --address auto")
    submit.set_defaults(func=_submit)

    jobs = sub.add_parser("jobs", help="list, follow and stop the Ray jobs of a cluster")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    lst = jsub.add_parser("list", help="the cluster's jobs, newest first")
    lst.add_argument("--address", help=ADDRESS_HELP)
    lst.set_defaults(func=_jobs_list)
    logs = jsub.add_parser("logs", help="a job's logs (with --follow: until it ends, exit 0 if it SUCCEEDED)")
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    logs.add_argument("--address", help=ADDRESS_HELP)
    logs.set_defaults(func=_jobs_logs)
    status = jsub.add_parser("status", help="a job's status and message (exit 1 if it FAILED or was STOPPED)")
    status.add_argument("job_id")
    status.add_argument("--address", help=ADDRESS_HELP)
    status.set_defaults(func=_jobs_status)
    stop = jsub.add_parser("stop", help="stop a running job (its trials are stopped with it)")
    stop.add_argument("job_id")
    stop.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for the job to end")
    stop.add_argument("--address", help=ADDRESS_HELP)
    stop.set_defaults(func=_jobs_stop)

    storage = sub.add_parser("storage", help="check a search storage path")
    ssub = storage.add_subparsers(dest="storage_command", required=True)
    check = ssub.add_parser(
        "check",
        help="check that a search on the cluster can keep its results in STORAGE (every node reaches it)",
        description="Run it on the cluster: vlptune submit --follow -- storage check s3://bucket/vlptune --address auto",
    )
    check.add_argument("storage", help="a directory, or a URI such as s3://bucket/dir or gs://bucket/dir")
    check.add_argument("--address", help="join this Ray cluster (GCS address, or auto) and probe every node; default: this machine only")
    check.add_argument(
        "--assume-shared", action="store_true", help="accept a local path on several nodes although its filesystem type is not known to be shared"
    )
    check.add_argument("--no-probe", action="store_true", help="do not write and read back a marker file on every node")
    check.set_defaults(func=_storage_check)


def main(argv: list[str] | None = None) -> int:
    """Run these sub-commands on their own (the `vlptune` command wires the same parsers)."""
    parser = argparse.ArgumentParser(prog="vlptune")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
