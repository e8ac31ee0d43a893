"""Helpers shared by test modules (pytest puts tests/ on sys.path): the session's small
synthetic world with phrase-label similarities, and a tiny recipe on it."""

from __future__ import annotations

import fcntl
import json
import urllib.request
from pathlib import Path
from typing import Any

from vlptune.config import Recipe, validate_recipe
from vlptune.data.synth import make_world
from vlptune.objectives.base import Pretrainer, build_pretrainer, prepare_dataset

WORLD_IMAGES = 64
WORLD_SIZE = 96


def similarity_world(tmp_path_factory) -> Path:
    """One small world with phrase-label similarities per test session, whichever module asks first."""
    root = tmp_path_factory.getbasetemp() / "kdvlp-world"
    with open(tmp_path_factory.getbasetemp() / ".kdvlp-world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "manifest.json").is_file():
            make_world(root, train=WORLD_IMAGES, val=8, image_size=WORLD_SIZE, seed=3, phrase_similarity=True)
    return root


def small_recipe(name: str, root: Path | str, objectives: dict[str, Any], pool: int = 1, size: int = WORLD_SIZE, **data: Any) -> Recipe:
    """A 1-layer, 1/8-width model with a 32-code VD over ``root``; ``data`` entries override the data section."""
    return validate_recipe(
        {
            "name": name,
            "data": {
                "root": str(root),
                "synthesize": False,
                "image_size": size,
                "max_long_side": size * 3 // 2,
                "itm_positives": 2,
                "itm_negatives": 1,
                "batch_images": 4,
                "max_text_len": 24,
                **data,
            },
            "model": {"backbone": {"width_mult": 0.125, "pool": pool}, "vd": {"size": 32}, "fusion": {"layers": 1}},
            "objectives": objectives,
        },
        "test recipe",
    )


# the smallest model that runs every objective: ResNet-18 at 1/16 width, a 16-code VD, 1 fusion layer
TINY_DATA = {"image_size": 64, "max_long_side": 64, "itm_positives": 1, "itm_negatives": 1, "batch_images": 2}
TINY_MODEL = {"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 16}, "fusion": {"layers": 1}}


def tiny_recipe(name: str, objectives: dict[str, Any], **sections: Any) -> Recipe:
    """A recipe of the tiny model (no data files needed); each of ``sections`` is merged one level deep
    into the section of that name (``objectives`` replaces the objectives)."""
    spec: dict[str, Any] = {"name": name, "data": dict(TINY_DATA), "model": dict(TINY_MODEL), "objectives": objectives}
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) and key != "objectives" else value
    return validate_recipe(spec, f"{name} test recipe")


# ------------------------------------------------------------------ search stand-ins


def import_by_value(path: Path, source: str, name: str) -> Any:
    """Write ``source`` to ``path``, import it as module ``name`` and have Ray pickle it by value
    (Ray workers get the code itself, not an import of a file they cannot see)."""
    import importlib.util
    import sys

    import ray.cloudpickle

    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    ray.cloudpickle.register_pickle_by_value(module)
    return module


def standin_space(tmp_path: Path, control: dict, body: str, *, metric: str, max_steps: int, eval_every: int, name: str | None = None) -> Path:
    """A search space over a stand-in base recipe in ``tmp_path``: ``data/control.json`` holds ``control``
    (read by the stand-in training loop); ``body`` is the rest of the space file."""
    import json
    import textwrap

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "control.json").write_text(json.dumps(control))
    (tmp_path / "base.yaml").write_text(
        textwrap.dedent(
            f"""
            name: standin
            data: {{root: {data}, synthesize: false}}
            objectives: {{mlm: {{weight: 1.0}}, itm: {{weight: 1.0}}, mvm: {{weight: 1.0}}}}
            train: {{max_steps: {max_steps}, eval_every: {eval_every}}}
            resources: {{workers: 1, cpus_per_worker: 1}}
            """
        )
    )
    space = tmp_path / "space.yaml"
    header = (f"name: {name}\n" if name else "") + f"base: base.yaml\nmetric: {metric}\nmode: max\n"
    space.write_text(header + textwrap.dedent(body))
    return space


def tiny_loop_fixed(data_root: Path) -> dict[str, Any]:
    """``fixed:`` paths that shrink demo-light to a seconds-long real-loop trial on a 48-image world at ``data_root``."""
    return {
        "data.root": str(data_root),
        "data.synth": {"train": 48, "val": 12, "image_size": 64, "seed": 0, "shard_size": 64},
        "data.image_size": 64,
        "data.max_long_side": 96,
        "data.batch_images": 2,
        "model.backbone.init": "random",  # demo-light's pretrained backbone would be made first on this tiny world: these trials test the plumbing
        "train.max_steps": 4,
        "train.eval_every": 2,
        "train.log_every": 2,
        "optim.warmup_steps": 0,
        "eval.max_images": 4,
        "eval.loss_batches": 1,
        "eval.vd_picture_codes": 2,
    }


def stop_process(proc, timeout_s: float) -> None:
    """Terminate a server the test started; kill it if it is still there after ``timeout_s``."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_driver_when(cmd: list[str], cwd: Path, ready, timeout_s: float = 420.0, poll_s: float = 2.0) -> None:
    """Start the search driver ``cmd`` in its own session, call ``ready()`` every ``poll_s`` until it
    is true (exceptions count as not yet), then SIGKILL the driver and everything it started (its
    Ray cluster); fail the test when it is not ready within ``timeout_s``."""
    import os
    import signal
    import subprocess
    import time

    import pytest

    proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            time.sleep(poll_s)
            try:
                if ready():
                    return
            except Exception:
                continue
        pytest.fail("the search did not get going in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def build_with_data(recipe: Recipe) -> Pretrainer:
    """``build_pretrainer`` handed the dataset's info, as the training loop builds it (heads sized from the vocabularies)."""
    return build_pretrainer(recipe, prepare_dataset(recipe))


# ------------------------------------------------------------------ TensorBoard's HParams data API (moved from vlptune.search.board: only tests use it)


def _post(url: str, payload: dict[str, Any], timeout: float = 30.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def hparams_experiment(base_url: str) -> dict[str, Any]:
    """The HParams plugin's experiment: hparam and metric infos over all runs."""
    return _post(base_url.rstrip("/") + "/data/plugin/hparams/experiment", {"experimentName": ""})


def hparams_sessions(base_url: str, metric_tags: list[str], page_size: int = 1000) -> list[dict[str, Any]]:
    """Every session group (one per trial) with its hparams and metric values."""
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "colParams": [{"metric": {"tag": tag, "group": ""}, "order": "ORDER_UNSPECIFIED"} for tag in metric_tags],
        "startIndex": 0,
        "sliceSize": page_size,
    }
    return _post(base_url.rstrip("/") + "/data/plugin/hparams/session_groups", request).get("sessionGroups", [])


# ------------------------------------------------------------------ commands that start a local Ray cluster


def run_ray_command(args: list[str]) -> tuple[int, str]:
    """``vlptune ARGS`` (a ``--ray`` command: it starts a local cluster) with stdout captured. Asserts that the command
    leaves this process as it found it: Ray shut down and ``RAY_ADDRESS`` as before (``ray.init`` sets it to the
    cluster it started, which would send the next command of this process to a cluster that is gone; the command's
    :func:`vlptune.cluster.session.ray_session` undoes it). Returns the exit code and the console text."""
    import contextlib
    import io
    import os

    import ray

    from vlptune.cli import main

    console = io.StringIO()
    address = os.environ.get("RAY_ADDRESS")
    try:
        with contextlib.redirect_stdout(console):
            rc = main(args)
    finally:
        left_running = ray.is_initialized()
        if left_running:  # the next test must not inherit it, whatever this one asserts
            ray.shutdown()
    assert not left_running, "the command left Ray initialised"
    assert os.environ.get("RAY_ADDRESS") == address, (address, os.environ.get("RAY_ADDRESS"))
    return rc, console.getvalue()
