"""TensorBoard logging of one run, into the run directory itself.

Scalars (tags):

* ``train/<metric>``: every objective's loss and accuracy, the total ``loss``,
  averaged over the ``train.log_every`` steps since the last log;
* ``lr/<side>``: learning rate of the backbone and transformer optimisers;
* ``train/grad_norm``: global gradient norm before clipping;
* ``vd/<stat>``: the visual dictionary's statistics (perplexity, codes used, dead codes...);
* ``throughput/images_per_s``, ``throughput/pairs_per_s``: over the log window, all ranks;
* ``val/<metric>``, ``retrieval/<metric>``: the evaluation (see tasks/retrieval.py).

HParams: the hparams plugin's summaries (experiment, session start, session
end) are built with ``torch.utils.tensorboard.summary.hparams`` and written
into this same event file, so the HParams dashboard lists the run once, with
the evaluation scalars above as its metrics. (``SummaryWriter.add_hparams``
would open a sub-directory and show every run twice.)

Images: ``vd/codes`` at each evaluation, the SOHO Fig. 3 picture: one row per
visual-dictionary code, showing image patches quantised to that code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

# The metrics the HParams dashboard shows as columns (logged at every evaluation).
HPARAM_METRICS = (
    "retrieval/rsum",
    "retrieval/tr_r1",
    "retrieval/ir_r1",
    "val/loss",
    "val/itm_acc",
    "val/mlm_acc",
    "val/mvm_acc",
)
VD_PICTURE_PATCHES = 8  # patches shown per code: enough to see what a code means, small enough to read
VD_PICTURE_GAP = 2  # pixels of background between patches


def flatten_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Dotted keys -> plugin-compatible values (lists and tuples as their string form)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_hparams(value, f"{name}."))
        elif value is None:
            out[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
    return out


def _scalar(value: Any) -> float | None:
    if isinstance(value, Tensor):
        value = value.detach().float().item()
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


class RunWriter:
    """The run's TensorBoard writer (rank 0 only), writing into ``run_dir`` itself.

    ``purge_step``: on resume, events at or after this step written by the
    interrupted run are discarded, so the curves do not double back.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """Every numeric value of ``values`` as ``prefix + key``."""
        for key, value in values.items():
            number = _scalar(value)
            if number is not None:
                self.writer.add_scalar(f"{prefix}{key}", number, step)

    def hparams_start(self, recipe_tree: Mapping[str, Any], metrics: tuple[str, ...] = HPARAM_METRICS) -> None:
        """Write the experiment and session-start summaries of the hparams plugin (once, at the start)."""
        hp = flatten_hparams(recipe_tree)
        experiment, session_start, _ = hparams(hp, {name: 0.0 for name in metrics})
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()

    def hparams_end(self) -> None:
        """Write the session-end summary (status: success) of the hparams plugin."""
        _, _, session_end = hparams({"_": 0}, {})
        self.writer.file_writer.add_summary(session_end)
        self.writer.flush()

    def image(self, tag: str, picture: Tensor, step: int) -> None:
        self.writer.add_image(tag, picture, step, dataformats="CHW")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def vd_picture(
    images: list[Tensor],
    codes: list[Tensor],
    stride: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    num_codes: int,
    per_code: int = VD_PICTURE_PATCHES,
) -> Tensor | None:
    """SOHO Fig. 3: for the ``num_codes`` most used codes, ``per_code`` image patches quantised to each.

    ``images``: normalised pixels, one float [3,h,w] per image; ``codes``: one
    int64 [gh,gw] per image (the VD index of each cell, -1 on padding); cell
    (i, j) covers pixels ``[i*stride, (i+1)*stride) x [j*stride, (j+1)*stride)``.
    Returns a float CHW picture in [0, 1], one row per code, or None when no
    cell has a code.
    """
    flat = torch.cat([c.flatten() for c in codes]) if codes else torch.zeros(0, dtype=torch.int64)
    flat = flat[flat >= 0]
    if flat.numel() == 0 or num_codes <= 0:
        return None
    counts = torch.bincount(flat)
    top = [int(c) for c in torch.argsort(counts, descending=True)[: min(num_codes, int((counts > 0).sum()))]]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    cell = stride + VD_PICTURE_GAP
    picture = torch.ones(3, len(top) * cell, per_code * cell)
    filled = [0] * len(top)
    row_of = {code: row for row, code in enumerate(top)}
    for image, grid in zip(images, codes):
        if min(filled) >= per_code:
            break
        _, h, w = image.shape
        for i, j in torch.nonzero(grid >= 0).tolist():
            row = row_of.get(int(grid[i, j]))
            if row is None or filled[row] >= per_code:
                continue
            y0, x0 = i * stride, j * stride
            crop = (image[:, y0 : min(h, y0 + stride), x0 : min(w, x0 + stride)].float().cpu() * std_t + mean_t).clamp(0.0, 1.0)
            top_px, left_px = row * cell, filled[row] * cell
            picture[:, top_px : top_px + stride, left_px : left_px + stride] = 0.0  # padding beyond the image: black
            picture[:, top_px : top_px + crop.shape[1], left_px : left_px + crop.shape[2]] = crop
            filled[row] += 1
    return picture


def throughput(images: int, pairs: int, seconds: float) -> dict[str, float]:
    seconds = max(seconds, math.ulp(1.0))
    return {"images_per_s": images / seconds, "pairs_per_s": pairs / seconds}
