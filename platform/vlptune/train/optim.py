"""Optimisation: two optimisers (SGD for the CNN, AdamW for the rest), the lr schedule,
gradient accumulation, clipping and mixed precision.

SOHO trains the ResNet with SGD (lr 1e-2) and the Transformer, the VD-side
projections and every head with AdamW (lr 1e-4). Each side's optimiser, lr,
weight decay, momentum and betas come from ``recipe.optim.backbone`` and
``recipe.optim.transformer`` (either side may use either optimiser). Biases
and normalisation weights (every parameter with fewer than 2 dimensions) get
no weight decay. Both sides share one schedule: linear warmup over
``warmup_steps`` then cosine (to ``min_lr_ratio``), step (``step_gamma`` at
each of ``step_milestones``) or constant.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vlptune.config import ConfigError, OptimConfig
from vlptune.objectives.base import Pretrainer
from vlptune.train.balance import attach_balance

GROUPS = ("backbone", "transformer")  # optimiser sides, in recipe.optim field order


# --------------------------------------------------------------------- schedule


class LRSchedule:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based).

    A plain object (not a lambda) so that ``LambdaLR.state_dict`` can store
    its attributes as JSON in checkpoints.

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps.
    Then, with ``progress`` going from 0 to 1 over the remaining steps:
    cosine ``min + (1 - min) * (1 + cos(pi * progress)) / 2``; step
    ``gamma ** (milestones passed)`` where a milestone is a fraction of
    ``max_steps``; constant 1.
    """

    def __init__(self, cfg: OptimConfig, max_steps: int):
        self.kind = cfg.schedule
        self.warmup = int(cfg.warmup_steps)
        self.max_steps = int(max_steps)
        self.milestones = [float(m) for m in cfg.step_milestones]
        self.gamma = float(cfg.step_gamma)
        self.min_ratio = float(cfg.min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            passed = sum(1 for m in self.milestones if step >= m * self.max_steps)
            return self.gamma**passed
        span = max(1, self.max_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------- optimisers


def split_parameters(module: nn.Module, backbone: nn.Module) -> dict[str, dict[str, list[nn.Parameter]]]:
    """``{side: {"decay": [...], "no_decay": [...]}}``; the backbone side is every parameter of ``backbone``.

    Parameters with ``requires_grad=False`` (frozen for the whole run:
    ``frozen_stages``, ``frozen_bn``) are left out. The freeze schedule does not
    touch ``requires_grad`` (the CNN runs under ``no_grad`` while frozen), so
    the CNN's parameters stay listed and simply have no gradient, which
    optimisers skip.
    """
    backbone_ids = {id(p) for p in backbone.parameters()}
    out: dict[str, dict[str, list[nn.Parameter]]] = {g: {"decay": [], "no_decay": []} for g in GROUPS}
    seen: set[int] = set()
    for _, param in module.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        side = "backbone" if id(param) in backbone_ids else "transformer"
        out[side]["no_decay" if param.ndim < 2 else "decay"].append(param)
    return out


def _make_optimizer(side_cfg: Any, groups: list[dict[str, Any]], fused: bool | None = None) -> Optimizer:
    """The side's optimiser; ``fused``: torch's fused kernel (True), the foreach one (False) or torch's default (None)."""
    if side_cfg.optimizer == "sgd":
        return SGD(groups, lr=side_cfg.lr, momentum=side_cfg.momentum, weight_decay=side_cfg.weight_decay, fused=fused)
    return AdamW(groups, lr=side_cfg.lr, betas=tuple(side_cfg.betas), weight_decay=side_cfg.weight_decay, fused=fused)


def _fused_optimizer(side: str, side_cfg: Any, groups: list[dict[str, Any]], choice: str) -> Optimizer:
    """``optim.fused``: the fused kernel where torch has one for these parameters (auto), always, or never."""
    if choice == "never":
        return _make_optimizer(side_cfg, groups, fused=False)
    try:
        return _make_optimizer(side_cfg, groups, fused=True)
    except RuntimeError as exc:  # torch refuses fused kernels for this device or dtype
        if choice == "always":
            devices = sorted({str(p.device) for g in groups for p in g["params"]})
            raise ConfigError(
                f"optim.fused=always: torch has no fused {side_cfg.optimizer} for the {side} parameters on {devices}: {exc}; use auto or never"
            ) from exc
        return _make_optimizer(side_cfg, groups, fused=False)


@dataclass
class Optimizers:
    """One optimiser and one scheduler per side (sides without parameters are left out)."""

    optimizers: dict[str, Optimizer]
    schedulers: dict[str, LambdaLR]

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    @property
    def skips_on_device(self) -> bool:
        """Every side's optimiser is fused: :meth:`step` can skip a non-finite step from a device flag, without a host sync."""
        return bool(self.optimizers) and all(bool(opt.defaults.get("fused")) for opt in self.optimizers.values())

    def step(self, found_inf: Tensor | None = None) -> None:
        """One optimiser step on every side, then advance the schedules.

        ``found_inf`` (fused optimisers only, see :attr:`skips_on_device`): a float
        tensor on the parameters' device; where it is non-zero the kernels leave
        weights, moments and step counts untouched (torch's AMP mechanism), and
        the schedules still advance, as for a step skipped on the host.
        """
        for opt in self.optimizers.values():
            if found_inf is not None:
                opt.found_inf, opt.grad_scale = found_inf, None  # read by the fused kernels
            try:
                opt.step()
            finally:
                if found_inf is not None:
                    del opt.found_inf, opt.grad_scale
        for sched in self.schedulers.values():
            sched.step()

    def lrs(self) -> dict[str, float]:
        """Current lr per side (``lr/backbone``, ``lr/transformer``)."""
        return {f"lr/{side}": opt.param_groups[0]["lr"] for side, opt in self.optimizers.items()}

    def params(self) -> Iterator[nn.Parameter]:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                yield from group["params"]


def build_optimizers(module: nn.Module, backbone: nn.Module, cfg: OptimConfig, max_steps: int) -> Optimizers:
    """Optimisers for ``module`` (the Pretrainer) with ``backbone``'s parameters on the backbone side.

    ``optim.balance`` first attaches its per-objective scales to a Pretrainer
    (train/balance.py: buffers, so they are checkpointed; no parameters).
    """
    if isinstance(module, Pretrainer) and getattr(module, "balance", None) is None:
        attach_balance(module, cfg)
    split = split_parameters(module, backbone)
    optimizers: dict[str, Optimizer] = {}
    schedulers: dict[str, LambdaLR] = {}
    for side in GROUPS:
        side_cfg = getattr(cfg, side)
        groups = [
            {"params": split[side]["decay"], "weight_decay": side_cfg.weight_decay, "name": f"{side}/decay"},
            {"params": split[side]["no_decay"], "weight_decay": 0.0, "name": f"{side}/no_decay"},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            continue
        optimizers[side] = _fused_optimizer(side, side_cfg, groups, cfg.fused)
        schedulers[side] = LambdaLR(optimizers[side], LRSchedule(cfg, max_steps))
    return Optimizers(optimizers, schedulers)


# --------------------------------------------------------------- accumulation, clipping


def accumulation_steps(global_batch: int, batch_images: int, world_size: int) -> int:
    """Micro-batches per optimiser step so that ``global_batch`` images make one step.

    ``global_batch = 0`` means no accumulation. Otherwise it must be a
    multiple of ``batch_images * world_size``.
    """
    per_step = batch_images * world_size
    if global_batch == 0:
        return 1
    if global_batch % per_step != 0:
        raise ConfigError(
            f"optim.global_batch={global_batch} must be a multiple of data.batch_images={batch_images} "
            f"x workers={world_size} = {per_step} (images per micro-step over all workers); "
            f"e.g. {max(per_step, global_batch // per_step * per_step)} or {(global_batch // per_step + 1) * per_step}"
        )
    return global_batch // per_step


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Global L2 norm of the gradients (before clipping); clips to ``max_norm`` when it is > 0."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm, error_if_nonfinite=False)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in with_grad]))


# --------------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; explicit choices pass through."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``bf16`` (no loss scaler needed: bf16 has fp32's exponent range), nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
