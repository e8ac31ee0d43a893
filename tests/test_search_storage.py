"""Where a search keeps its experiment, and which cluster it joins.

* the storage check wired into `vlptune search`: a local directory refused on
  a (faked) cluster of two alive nodes, before anything starts; a shared mount
  accepted;
* URI storage through pyarrow: a tiny search (a stand-in loop) with
  ``--storage file:///...``, whose experiment files, Optuna study, Tune state
  and TensorBoard runs all land at the URI, read back by `vlptune results URI`
  from another mirror, and resumed from the URI after its driver stopped;
* the cluster a search joins: --address, RAY_ADDRESS (as Ray's job supervisor
  sets it), a dashboard URL in RAY_ADDRESS ignored, a dead one explained.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest

from helpers import import_by_value, standin_space
from vlptune.cluster.session import cluster_address
from vlptune.search.layout import SearchError
from vlptune.search.location import DirUploader, Location, join_uri, mirror_key, uri_parent
from vlptune.search.preflight import check_experiment_storage

MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0
"""
TWO_NODES = [{"Alive": True, "NodeID": "a"}, {"Alive": True, "NodeID": "b"}, {"Alive": False, "NodeID": "c"}]


def cli(argv: list[str]) -> int:
    """Through the `vlptune` command, which reports a SearchError (message on stderr, exit code 2)."""
    from vlptune.cli import main

    return main(argv)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ====================================================================== the storage check


def test_local_directory_refused_on_two_nodes_shared_mount_accepted(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    with pytest.raises(SearchError) as err:
        check_experiment_storage(Location.of("/tmp/vlptune/exp"), nodes=TWO_NODES, mounts_file=mounts)
    message = str(err.value)
    assert "'/tmp/vlptune/exp'" in message and "2 alive nodes" in message
    assert "s3://" in message and "gs://" in message and "--shared-storage" in message
    # a file:// URI is a local directory too
    with pytest.raises(SearchError, match="2 alive nodes"):
        check_experiment_storage(Location.of("file:///tmp/vlptune/exp"), nodes=TWO_NODES, mounts_file=mounts)
    # a shared mount, one alive node, the user's word, a cloud URI: accepted
    check_experiment_storage(Location.of("/mnt/shared/vlptune/exp"), nodes=TWO_NODES, mounts_file=mounts)
    check_experiment_storage(Location.of("/tmp/vlptune/exp"), nodes=TWO_NODES[:1] + TWO_NODES[2:], mounts_file=mounts)
    check_experiment_storage(Location.of("/tmp/vlptune/exp"), shared=True, nodes=TWO_NODES, mounts_file=mounts)
    check_experiment_storage(Location.of("gs://bucket/vlptune/exp", tmp_path), nodes=TWO_NODES, mounts_file=mounts)


STANDIN = textwrap.dedent(
    """
    import json, time
    from pathlib import Path


    def worker(recipe, reporter, out_dir, resume=True):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        control = json.loads((Path(recipe.data.root) / "control.json").read_text())
        ck = out / "checkpoints" / "standin"
        start = json.loads((ck / "state.json").read_text())["step"] if resume and (ck / "state.json").is_file() else 0
        with open(out / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"start": start}) + "\\n")
        (out / "recipe.yaml").write_text("name: standin\\n")
        w = recipe.objectives["mvm"].weight
        for step in range(start + 1, recipe.train.max_steps + 1):
            time.sleep(control.get("sleep", 0.0))
            if step % recipe.train.eval_every == 0:
                with open(out / "events.out.tfevents.standin", "a") as f:
                    f.write(f"{step}\\n")
                ck.mkdir(parents=True, exist_ok=True)
                (ck / "state.json").write_text(json.dumps({"step": step}))
                reporter.report({"step": step, "retrieval/rsum": w * step}, str(ck))
        return {"step": recipe.train.max_steps, "stop_reason": "max_steps"}
    """
)


def standin(tmp_path: Path, control: dict, body: str):
    module = import_by_value(tmp_path / "standin_storage_loop.py", STANDIN, f"standin_storage_{abs(hash(str(tmp_path)))}")
    return module, standin_space(tmp_path, control, body, metric="retrieval/rsum", max_steps=4, eval_every=2, name="st")


def test_search_refuses_a_local_directory_on_a_two_node_cluster(tmp_path, monkeypatch, capsys):
    """`vlptune search` after joining (faked) two alive nodes: exit 2, a clear error, nothing left behind."""
    import ray

    from vlptune.cluster import storage
    from vlptune.search import preflight, runner

    _, space = standin(tmp_path, {}, "num_samples: 1\nparameters:\n  objectives.mvm.weight: {uniform: [0.5, 1.5]}\n")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"overlay / overlay rw 0 0\n/dev/sda1 {tmp_path} ext4 rw 0 0\n")
    monkeypatch.setattr(storage, "MOUNTS_FILE", str(mounts))
    monkeypatch.setattr(runner, "connect", lambda *a, **k: "10.0.0.1:6379")  # "joined" a cluster ...
    monkeypatch.setattr(preflight, "cluster_nodes", lambda: TWO_NODES)  # ... of two alive nodes
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = cli(["search", str(space), "--storage", str(tmp_path / "runs"), "--name", "x", "--address", "10.0.0.1:6379"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"storage '{tmp_path / 'runs' / 'x'}'" in err and f"on {tmp_path} (a ext4 filesystem)" in err, err
    assert "2 alive nodes" in err and "s3://" in err and "gs://" in err and "--shared-storage" in err
    assert not (tmp_path / "runs" / "x").exists()  # refused before anything was written for good
    assert not ray.is_initialized()
    # a shared mount gets past the check (on to Tune, which the fake cluster cannot run)
    mounts.write_text(f"overlay / overlay rw 0 0\nnfs:/ {tmp_path} nfs4 rw 0 0\n")
    check_experiment_storage(Location.of(tmp_path / "runs" / "x"), nodes=TWO_NODES)


# ====================================================================== URI storage (pyarrow)


def test_uri_helpers_and_uploader(tmp_path):
    assert join_uri("s3://b/dir?region=x", "name", "tb") == "s3://b/dir/name/tb?region=x"
    assert uri_parent("s3://b/dir/name?region=x") == ("s3://b/dir?region=x", "name")
    assert mirror_key("s3://b/d/n?region=x") == Path("s3/b/d/n")
    assert mirror_key("file:///tmp/../x") == Path("file/_/tmp/_/x")
    with pytest.raises(SearchError, match="pyarrow cannot open"):
        from vlptune.search.layout import experiment_location

        experiment_location("nope://x/y")
    # the uploader sends what changed, never checkpoints/ or dot files
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "w").write_text("w")
    (run / ".lock").write_text("")
    (run / "events").write_text("1")
    dest = tmp_path / "dest"
    up = DirUploader(run, f"file://{dest}", exclude=("checkpoints",))
    assert up.sync() == 1 and (dest / "events").read_text() == "1"
    assert up.sync() == 0
    time.sleep(0.01)
    (run / "events").write_text("12")
    assert up.sync() == 1 and (dest / "events").read_text() == "12"
    assert not (dest / "checkpoints").exists() and not (dest / ".lock").exists()


@pytest.mark.slow  # two Tune trials and two local clusters: ~4 min on this shared 2-core machine
def test_uri_storage_end_to_end_with_results_and_resume(tmp_path, capsys, monkeypatch):
    """`--storage file:///...`: the experiment lives at the URI (pyarrow's local filesystem).

    `vlptune results URI` reads it through another mirror; `--resume URI` from a
    third mirror downloads the driver's files and the study, restores Tune from
    the URI (nothing is left to run) and finds the study at its new place.
    """
    from vlptune.search import results
    from vlptune.search.runner import run_search

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    module, space = standin(
        tmp_path,
        {"sleep": 0.0},
        "num_samples: 2\nmax_concurrent: 1\nscheduler: {type: fifo}\nsearcher: {type: random, seed: 0}\n"
        "parameters:\n  objectives.mvm.weight: {uniform: [0.5, 1.5]}\n",
    )
    store = tmp_path / "store"
    uri = f"file://{store}/exp"
    start = time.time()
    try:
        run_search(space, exp_dir=uri, worker_fn=module.worker, verbose=0, mirror_dir=tmp_path / "m1")
    finally:
        shutdown_ray()
    first = time.time() - start
    out = capsys.readouterr().out
    assert "ray cluster: started a local cluster at 127.0.0.1:" in out and "no --address and no RAY_ADDRESS" in out
    exp = store / "exp"
    for name in ("vlptune_search.json", "search_space.yaml", "base_recipe.yaml", "optuna.db", "tuner.pkl"):
        assert (exp / name).is_file(), name
    assert list(exp.glob("experiment_state-*.json"))
    meta = json.loads((exp / "vlptune_search.json").read_text())
    assert meta["location"] == uri and meta["study_file"] == "optuna.db"
    assert str(tmp_path / "m1") in meta["storage_url"]  # the study itself lives in the driver's mirror
    with sqlite3.connect(exp / "optuna.db") as db:  # the uploaded snapshot is a valid, final study
        states = sorted(row[0] for row in db.execute("select state from trials"))
    assert states == ["COMPLETE", "COMPLETE"]
    trials = sorted(p.name for p in (exp / "tb").iterdir())
    assert len(trials) == 2
    for tid in trials:
        tb = exp / "tb" / tid
        assert (tb / "events.out.tfevents.standin").read_text().split() == ["2", "4"]  # uploaded by rank 0
        assert not (tb / "checkpoints").exists()  # Ray Train keeps those ...
        assert list((exp / "train" / tid).rglob("state.json"))  # ... here

    # results from a fresh mirror: a downloaded view, the study read from it
    assert cli(["results", uri, "--mirror-dir", str(tmp_path / "m2"), "--no-recipe"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("completed") >= 2 and all(t in printed for t in trials), printed
    assert not list((tmp_path / "m2").rglob("events.out.tfevents.standin"))  # the table needs no events

    # resume from the URI through yet another mirror
    try:
        run_search(None, exp_dir=uri, resume=True, worker_fn=module.worker, verbose=0, mirror_dir=tmp_path / "m3")
    finally:
        shutdown_ray()
    mirror3 = next((tmp_path / "m3" / "driver").rglob("optuna.db"))  # downloaded from the URI
    collected = results.collect(uri, tmp_path / "m4")
    assert sorted(r.status for r in collected.rows) == ["completed", "completed"], results.format_table(collected)
    assert all(r.optuna_state == "COMPLETE" for r in collected.rows)
    import optuna

    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{mirror3}")
    assert len(study.trials) == 2  # the relocated study, not a new empty one
    print(f"URI search: first run {first:.1f} s, all {time.time() - start:.1f} s")


# ====================================================================== which cluster


def test_cluster_address_sources():
    assert cluster_address("auto", {"RAY_ADDRESS": "1.2.3.4:6379"}) == ("auto", "--address")
    assert cluster_address(None, {})[0] is None
    addr, why = cluster_address(None, {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"})
    assert addr == "10.0.0.1:6379" and "Ray job" in why
    addr, why = cluster_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"})
    assert addr == "10.0.0.1:6379" and "unset it" in why
    addr, why = cluster_address(None, {"RAY_ADDRESS": "http://127.0.0.1:8265"})
    assert addr is None and "dashboard" in why and "--address auto" in why


def test_a_dead_ray_address_is_explained(monkeypatch):
    import ray

    from vlptune.cluster.session import free_loopback_port
    from vlptune.search.runner import connect

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_loopback_port()}")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    try:
        with pytest.raises(SearchError, match=r"cannot join the Ray cluster at 127\.0\.0\.1:\d+ \(RAY_ADDRESS from the environment; unset it"):
            connect(None)
    finally:
        shutdown_ray()
    assert not ray.is_initialized()
