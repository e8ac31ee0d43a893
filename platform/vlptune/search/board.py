"""TensorBoard over an experiment: one run per trial (``EXP_DIR/tb/<trial_id>``).

Each trial's run holds the loop's scalars (losses, accuracies, learning
rates, VD usage, throughput, evaluation metrics) and one hparams session
written when the trial started (the searched hyperparameters, then a short
fixed list; the search metric and its chance level first among the metric
columns: see train/tensorboard.py), so the HParams dashboard compares all
trials, early-stopped ones too. The server binds to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

from vlptune.search.runner import TB_DIR, SearchError

HOST = "127.0.0.1"


def logdir_of(exp_dir: str | Path) -> Path:
    exp_dir = Path(exp_dir)
    logdir = exp_dir / TB_DIR
    if not logdir.is_dir():
        from vlptune.search.experiments import not_an_experiment

        raise SearchError(not_an_experiment(exp_dir, f"no TensorBoard runs ({logdir} does not exist); is this a search experiment directory?"))
    return logdir


def start(exp_dir: str | Path, port: int = 6006, reload_interval: float = 5.0) -> str:
    """Start TensorBoard in this process (background threads) on 127.0.0.1; returns its URL."""
    from tensorboard import program

    logdir = logdir_of(exp_dir)
    board = program.TensorBoard()
    board.configure(
        argv=[
            None,
            "--logdir", str(logdir),
            "--host", HOST,
            "--port", str(port),
            "--reload_interval", str(reload_interval),
            "--load_fast", "false",  # the pure-Python reader: no extra server process
        ]
    )
    try:
        url = board.launch()
    except program.TensorBoardServerException as exc:
        raise SearchError(f"TensorBoard could not listen on {HOST}:{port}: {exc.msg}") from None
    return url


def serve_forever(exp_dir: str | Path, port: int = 6006, mirror_dir: str | Path | None = None) -> int:
    """Serve until Ctrl-C. A URI experiment is downloaded once first (a snapshot: run again to refresh)."""
    from vlptune.search.runner import local_view

    exp_dir = local_view(exp_dir, mirror_dir, tensorboard=True)
    url = start(exp_dir, port)
    print(f"TensorBoard for {Path(exp_dir).resolve()} at {url} (HParams tab: {url.rstrip('/')}/#hparams); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


# ------------------------------------------------------------------ the HParams data API (used by tests and scripts)


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
