"""TensorBoard over an experiment: one run per trial (``EXP_DIR/tb/<trial_id>``).

Each trial's run holds the loop's scalars (losses, accuracies, learning
rates, VD usage, throughput, evaluation metrics) and one hparams session
written when the trial started (the searched hyperparameters, then a short
fixed list; the search metric and its chance level first among the metric
columns: see train/tensorboard.py), so the HParams dashboard compares all
trials, early-stopped ones too. The server binds to 127.0.0.1 only.
"""

from __future__ import annotations

import threading
from pathlib import Path

from vlptune.search.layout import TB_DIR, SearchError, local_view, not_an_experiment

HOST = "127.0.0.1"


def logdir_of(exp_dir: str | Path) -> Path:
    exp_dir = Path(exp_dir)
    logdir = exp_dir / TB_DIR
    if not logdir.is_dir():
        raise SearchError(not_an_experiment(exp_dir, f"no TensorBoard runs ({logdir} does not exist); is this a search experiment directory?"))
    return logdir


def start(exp_dir: str | Path, port: int = 6006, reload_interval: float = 5.0) -> str:
    """Start TensorBoard in this process (background threads) on 127.0.0.1; returns its URL."""
    from tensorboard import program  # tensorboard: heavy, only when the board starts

    logdir = logdir_of(exp_dir)
    board = program.TensorBoard()
    board.configure(
        argv=[
            None,
            "--logdir",
            str(logdir),
            "--host",
            HOST,
            "--port",
            str(port),
            "--reload_interval",
            str(reload_interval),
            "--load_fast",
            "false",  # the pure-Python reader: no extra server process
        ]
    )
    try:
        url = board.launch()
    except program.TensorBoardServerException as exc:
        raise SearchError(f"TensorBoard could not listen on {HOST}:{port}: {exc.msg}") from None
    return url


def serve_forever(exp_dir: str | Path, port: int = 6006, mirror_dir: str | Path | None = None) -> int:
    """Serve until Ctrl-C. A URI experiment is downloaded once first (a snapshot: run again to refresh)."""
    exp_dir = local_view(exp_dir, mirror_dir, tensorboard=True)
    url = start(exp_dir, port)
    print(f"TensorBoard for {Path(exp_dir).resolve()} at {url} (HParams tab: {url.rstrip('/')}/#hparams); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0
