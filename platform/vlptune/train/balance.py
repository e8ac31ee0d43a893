"""Per-objective gradient norms on the shared parameters, and GradNorm balancing (``optim.balance``).

Measurement. On a measuring step (every ``train.log_every`` steps when
``optim.objective_grad_norms`` is on, and every ``optim.balance_every`` steps
under GradNorm) the first micro-batch's loss of each objective is
differentiated on its own with ``torch.autograd.grad`` with respect to the
shared parameters (every trainable parameter of the model: CNN, projection,
fusion Transformer, word embeddings; not the objectives' own heads), before
the step's ordinary backward. ``grad_norm_<objective>`` is the L2 norm of
``weight x scale x d loss / d shared``: what that objective contributes to the
shared update before clipping. It costs one extra backward pass of the step it
measures (the objectives' passes share the CNN, so a little more than one);
``torch.autograd.grad`` does not accumulate into ``.grad``, so the trajectory
of a run is the same with or without it, and DDP's reducer is not touched.

GradNorm (Chen et al., ICML 2018). Each objective ``i`` carries a scale
``s_i`` (starting at 1) on top of its recipe weight ``w_i``. With ``G_i`` the
measured norm of ``s_i w_i grad L_i``, ``L_i(0)`` its loss at the first
measurement and ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` its relative
inverse training rate, the target norm is ``mean(G) * r_i ** alpha``: equal
norms for objectives that train equally fast, more for the ones that lag.
The paper moves ``s`` by gradient descent on ``sum |G_i - target_i|`` (Adam,
lr 0.025, every step); here, because a CPU run is a few hundred steps and
measuring every step doubles the backward cost, each measurement moves the
log scales a fraction ``balance_lr`` of the way to the targets,
``log s_i += balance_lr * log(target_i / G_i)`` (``G_i`` is linear in
``s_i``, so 1 reaches the targets at once), then renormalises to
``sum s_i = number of objectives`` (the paper's constraint) and clamps to
``[1/balance_max, balance_max]``. The scales apply from the next step. They
are buffers of a module attached to the Pretrainer as ``balance``, so
checkpoints keep them and a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vlptune.config import OptimConfig, Recipe
from vlptune.objectives.base import Pretrainer

BALANCE_NONE = "none"
GRAD_NORM_PREFIX = "grad_norm_"  # training scalar train/grad_norm_<objective>
SCALE_PREFIX = "balance_"  # training scalar train/balance_<objective> (GradNorm's scale)
MIN_NORM = 1e-12  # a norm below this counts as "no gradient" (a skipped MVM step)


class GradNormBalance(nn.Module):
    """GradNorm's per-objective scales (buffers ``scales``, ``initial_loss``, ``updates``), in objective order."""

    def __init__(self, names: list[str], cfg: OptimConfig):
        super().__init__()
        self.names = list(names)
        self.alpha = float(cfg.balance_alpha)
        self.lr = float(cfg.balance_lr)
        self.max_scale = float(cfg.balance_max)
        self.register_buffer("scales", torch.ones(len(self.names)))
        self.register_buffer("initial_loss", torch.zeros(len(self.names)))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.long))
        self._index = {name: i for i, name in enumerate(self.names)}

    def scale(self, name: str) -> Tensor:
        """The objective's current scale (a copy: :meth:`update` may run before the backward of the loss it multiplies)."""
        return self.scales[self._index[name]].clone()

    @torch.no_grad()
    def update(self, norms: dict[str, float], losses: dict[str, float]) -> None:
        """One GradNorm update from the measured norms ``G_i`` (of the scaled, weighted losses) and the losses ``L_i``.

        Objectives without a gradient this time (norm ~0, a skipped step) or
        with a non-finite one keep their scale and take no part in the means.
        """
        live = [n for n in self.names if n in norms and math.isfinite(norms[n]) and norms[n] > MIN_NORM and math.isfinite(losses.get(n, math.nan))]
        if len(live) < 2:
            return
        idx = torch.tensor([self._index[n] for n in live])
        g = torch.tensor([norms[n] for n in live], dtype=torch.float32)
        loss = torch.tensor([losses[n] for n in live], dtype=torch.float32)
        first = self.initial_loss[idx] <= 0
        self.initial_loss[idx] = torch.where(first, loss.clamp_min(MIN_NORM), self.initial_loss[idx])
        ratio = loss / self.initial_loss[idx]
        rate = ratio / ratio.mean()
        target = g.mean() * rate.pow(self.alpha)
        log_s = self.scales[idx].log() + self.lr * (target / g).log()
        new = log_s.exp()
        new = new * (len(live) / new.sum())
        self.scales[idx] = new.clamp(1.0 / self.max_scale, self.max_scale)
        self.updates.add_(1)


def attach_balance(pretrainer: Pretrainer, cfg: OptimConfig) -> GradNormBalance | None:
    """Attach ``optim.balance``'s module to the Pretrainer (before the optimisers and any checkpoint load); None for ``none``."""
    if cfg.balance == BALANCE_NONE:
        return None
    balance = GradNormBalance(list(pretrainer.objectives.keys()), cfg)
    pretrainer.add_module("balance", balance)
    return balance


def measures_at(step: int, recipe: Recipe) -> bool:
    """Whether optimiser step ``step`` (1-based, the one about to run) measures the per-objective gradient norms."""
    logged = recipe.optim.objective_grad_norms and step % recipe.train.log_every == 0
    return logged or (recipe.optim.balance != BALANCE_NONE and step % recipe.optim.balance_every == 0)


def objective_grad_norms(pretrainer: Pretrainer) -> tuple[dict[str, float], dict[str, float]]:
    """``(norms, losses)`` of the last forward: each objective's ``||weight x scale x grad loss||`` on the shared parameters, and its loss.

    Call it between the forward and the backward of a micro-batch (it keeps the graph).
    """
    losses: dict[str, Tensor] = getattr(pretrainer, "last_losses", {})
    model = getattr(pretrainer, "model", None)
    if not losses or model is None:
        return {}, {}
    shared = [p for p in model.parameters() if p.requires_grad]
    balance = getattr(pretrainer, "balance", None)
    norms: dict[str, float] = {}
    values: dict[str, float] = {}
    for name, loss in losses.items():
        values[name] = float(loss.detach())
        if not loss.requires_grad or not shared:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        raw = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        factor = float(pretrainer.objectives[name].weight) * (float(balance.scale(name)) if balance is not None else 1.0)
        norms[name] = factor * raw
    return norms, values


def measure_and_balance(pretrainer: Pretrainer) -> dict[str, float]:
    """Measure the per-objective norms of the current micro-batch, update GradNorm's scales (if attached); the training scalars to log."""
    balance = getattr(pretrainer, "balance", None)
    norms, losses = objective_grad_norms(pretrainer)
    metrics = {f"{GRAD_NORM_PREFIX}{name}": value for name, value in norms.items()}
    if balance is not None and norms:
        balance.update(norms, losses)
        metrics.update({f"{SCALE_PREFIX}{name}": float(balance.scale(name)) for name in balance.names})
    return metrics


def with_objective_grad_norms(pretrainer: Pretrainer, metrics: dict[str, Any], measure: bool) -> dict[str, Any]:
    """The loop's hook (train_step, first micro-batch of a measuring step): ``metrics`` plus :func:`measure_and_balance`'s scalars."""
    return {**metrics, **measure_and_balance(pretrainer)} if measure else metrics


__all__ = ["GradNormBalance", "attach_balance", "measure_and_balance", "measures_at", "objective_grad_norms", "with_objective_grad_norms"]
