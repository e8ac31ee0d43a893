"""One optimiser step without host syncs, and the settling of its scalars at the log interval.

``train_step`` is the training loop's step (train/loop.py, bench/): gradient
accumulation, DDP's ``no_sync``, clipping, and the skip of a non-finite step.
Nothing is read back from the device: the step's loss, gradient norm and
finiteness flag stay tensors in :class:`StepResult`, and with fused
optimisers (``optim.fused``) the skip itself is decided on the device. The
loop hands the steps since its last log to :func:`settle_steps`, one read for
all of them; :func:`set_report_stats` switches the statistics that cost a
device read (the VD's) off between logs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vlptune.objectives.base import MetricMeter, Pretrainer
from vlptune.train.balance import with_objective_grad_norms
from vlptune.train.evaluate import to_device
from vlptune.train.optim import Optimizers, autocast, clip_gradients

log = logging.getLogger("vlptune.train")


@dataclass
class StepResult:
    """One optimiser step. The step's scalars stay on the device (``loss_t``, ``grad_norm_t``,
    ``finite_t``) so the loop reads them back only at its log interval; the properties read them now."""

    loss_t: Tensor
    metrics: list[dict[str, Tensor | float]]  # one dict per micro-batch
    grad_norm_t: Tensor
    finite_t: Tensor
    images: int
    pairs: int

    @property
    def loss(self) -> float:
        return float(self.loss_t)

    @property
    def grad_norm(self) -> float:
        return float(self.grad_norm_t)

    @property
    def finite(self) -> bool:
        return bool(self.finite_t)


def train_step(
    module: nn.Module,
    pretrainer: Pretrainer,
    optimizers: Optimizers,
    micro_batches: list[dict[str, Any]],
    device: torch.device,
    precision: str,
    grad_clip: float,
    generator: torch.Generator | None,
    measure: bool = False,
) -> StepResult:
    """One optimiser step over ``micro_batches`` (gradient accumulation).

    ``module`` is what runs the forward (the DDP wrapper, or the Pretrainer
    itself); ``pretrainer`` the unwrapped module. Each micro-batch's total
    loss is divided by the number of micro-batches, so the gradient is the
    mean over them. The step is skipped (gradients dropped, weights untouched)
    when the loss or the gradient norm is not finite on any rank (``measure``: train/balance.py).

    No host sync: with fused optimisers (``optim.fused``, :attr:`Optimizers.skips_on_device`)
    the skip is decided on the device; otherwise the finiteness flag is read back (one sync).
    """
    accum = len(micro_batches)
    total = torch.zeros((), device=device)
    per_batch: list[dict[str, Tensor | float]] = []
    images = pairs = 0
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        last = i == accum - 1
        sync = module.no_sync() if isinstance(module, DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with autocast(precision, device):
                loss, metrics = module(batch, generator)
            metrics = with_objective_grad_norms(pretrainer, metrics, measure and i == 0)
            if loss.requires_grad:
                (loss / accum).backward()
        total = total + loss.detach().float() / accum
        per_batch.append(metrics)
        images += int(batch["images"].shape[0])
        pairs += int(batch["pair_image"].numel())
    params = list(optimizers.params())
    grad_norm = clip_gradients(params, grad_clip).to(device)
    flag = (torch.isfinite(total) & torch.isfinite(grad_norm)).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if optimizers.skips_on_device:
        optimizers.step(found_inf=1.0 - flag)
    elif bool(flag.item()):
        optimizers.step()
    else:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for sched in optimizers.schedulers.values():  # keep the schedule on the step counter
                sched.step()
    optimizers.zero_grad()
    return StepResult(total, per_batch, grad_norm.detach(), flag > 0, images, pairs)


def set_report_stats(module: nn.Module, on: bool) -> None:
    """Switch the statistics that cost a device read (the VD's ``report_stats``) on or off for the next steps."""
    for sub in module.modules():
        if hasattr(sub, "report_stats"):
            sub.report_stats = on


def settle_steps(pending: list[tuple[int, StepResult]], meter: MetricMeter, window: dict[str, Any], nonfinite: int, patience: int) -> tuple[int, str | None]:
    """Read back the ``pending`` steps' flags, losses and norms (one host sync), in step order:
    finite steps go into ``meter`` and ``window``, non-finite ones are warned about.

    Returns the count of consecutive non-finite steps after them and, once that
    count reaches ``patience`` (``train.nan_patience``), the stop reason (the loop
    learns of it at the settling step, up to ``train.log_every - 1`` steps later).
    """
    if not pending:
        return nonfinite, None
    values = torch.stack([torch.stack([o.finite_t.float(), o.loss_t.float(), o.grad_norm_t.float()]) for _, o in pending]).tolist()
    for (step, out), (finite, loss, grad_norm) in zip(pending, values):
        if finite > 0:
            nonfinite = 0
            for metrics in out.metrics:
                meter.add(metrics)
            window["grad_norm"] += grad_norm
            window["steps"] += 1
            continue
        nonfinite += 1
        log.warning("step %d: non-finite loss %s or gradient norm %s; step skipped (%d in a row)", step, loss, grad_norm, nonfinite)
        if nonfinite >= patience:
            return nonfinite, (
                f"non-finite loss or gradient for {nonfinite} consecutive steps (train.nan_patience={patience}), last at step {step}: loss={loss}, grad_norm={grad_norm}"
            )
    return nonfinite, None
