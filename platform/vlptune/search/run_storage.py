"""A trial's checkpoints in Ray Train's run storage (``EXP/train/<trial_id>/checkpoint_*``, a
directory or a URI through pyarrow): listing them with their saved evaluations, and the stored final
result of a trial that already reached its last step.

Used by :mod:`vlptune.search.retention` (what an ended trial keeps) and by the trial function
(:func:`vlptune.search.trainable.complete_from_storage`: a trial finished before the driver was
killed is completed without starting workers). Nothing here is unpickled: each copy's
``state.json`` is plain JSON (:mod:`vlptune.train.checkpoint`).
"""

from __future__ import annotations

from typing import Any

from vlptune.search.space import TIME_ATTR
from vlptune.train import checkpoint as ckpt

RAY_CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint directories in a run's storage


def run_storage_checkpoints(fs: Any, run_path: str) -> tuple[list[str], list[ckpt.Entry]]:
    """The checkpoint directories Ray Train holds under ``run_path`` on the pyarrow filesystem ``fs``
    (their paths), and the :class:`~vlptune.train.checkpoint.Entry` of each complete one (a
    directory without a readable ``state.json``, an upload cut short, has none)."""
    from pyarrow import fs as pafs  # pyarrow.fs: only for URI storage

    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    dirs = [i for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(RAY_CHECKPOINT_PREFIX)]
    entries = []
    for info in dirs:
        try:
            with fs.open_input_stream(f"{info.path}/{ckpt.STATE_FILE}") as stream:
                entries.append(ckpt.parse_entry(info.base_name, stream.read().decode("utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return [i.path for i in dirs], entries


COMPLETED_FROM_CHECKPOINT_KEY = "trial/completed_from_checkpoint"  # 1.0 in the report of a trial ended by finished_result


def finished_result(fs: Any, run_path: str, max_steps: int) -> dict[str, Any] | None:
    """The final report of a trial whose Ray Train run already holds the checkpoint of its last step
    (``max_steps``), from the evaluation saved with that checkpoint; None when it holds none.

    That is a trial whose driver was killed after the trial's last report but
    before Tune recorded its end: Tune relaunches it on ``--resume``, and the
    trial function completes it with this result instead of starting workers
    to evaluate the same weights once more (:func:`vlptune.search.trainable.make_trainable`).
    """
    _, entries = run_storage_checkpoints(fs, run_path)
    final = [e for e in entries if e.step >= max_steps and e.metrics]
    if not final:
        return None
    last = max(final, key=lambda e: (e.step, e.name))
    return {**last.metrics, TIME_ATTR: last.step, COMPLETED_FROM_CHECKPOINT_KEY: 1.0}
