"""SOHO's visual dictionary (VD): nearest-code quantisation of grid features.

For every real (unpadded) grid feature ``v`` (a D-vector):

* assignment: ``j(v) = argmin_j ||v - d_j||^2``, computed as one matrix product
  ``||v||^2 - 2 v.d_j + ||d_j||^2``;
* moving-average update (training mode only, real cells only, only codes that
  received at least one feature in this step, *before* the output is formed):
  ``d_j <- g * d_j + (1 - g) * mean{v : j(v) = j}``;
* straight-through output ``f(v) = sg[d_j(v) - v] + v`` (``sg`` = stop-gradient),
  i.e. the forward value is the code and the gradient w.r.t. ``v`` is the
  identity.

Under DDP (``torch.distributed`` initialised, world size > 1) the per-code
counts and feature sums are summed over all ranks with one ``all_reduce``
before the update, so every rank applies the same update and holds the same
dictionary. Everything that samples (first-batch initialisation, re-seeding)
samples on rank 0 with a private generator and broadcasts the result.

Options (all off by default, see docs/model.md for paper vs release):

* ``laplace_eps > 0``: release-code update. Moving averages of counts ``N`` and
  sums ``S`` (both start at 0); counts are Laplace smoothed,
  ``N~_j = (N_j + eps) / (sum N + k eps) * sum N``; then ``d_j = S_j / N~_j``
  for the codes that received features.
* ``reseed_dead``: a code not assigned any feature for ``reseed_after``
  consecutive updates is replaced by a random current feature.
* ``gate`` with ``gate_form="channel"``: a learned per-channel gate
  ``a = sigmoid(w)`` (``w`` starts at 0) mixes quantised and raw features:
  ``out = a * f(v) + (1 - a) * v = v + a * sg[d - v]``.
* ``gate`` with ``gate_form="cell_softmax"`` (release): :class:`CellGate`, a
  per-cell softmax over ``[pos_line(f(v)), v]`` from a 1x1 conv.
* ``update_all`` (release, needs ``laplace_eps > 0``): every code is
  rewritten as ``S_j / N~_j`` each step, not only the codes that received
  features: unused codes drift with the decaying averages, never-used codes
  become exactly 0.
* ``quantise_padding`` (release): padded cells are quantised as well and
  take part in the update (``codes`` still says -1 there).

Initialisation (``init="first_batch"``): codes start as N(0, 1) noise with
``initialised = False``; the first training forward replaces them by ``k``
features drawn from that batch's
real cells (without replacement when there are enough, otherwise with
replacement plus a little noise so that copies separate), so no code starts
far from the data. ``init="normal"`` (release) keeps the N(0, 1) noise.
An evaluation forward never initialises or updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlptune.config import VDConfig

INIT_FIRST_BATCH = "first_batch"
INIT_NORMAL = "normal"
GATE_CHANNEL = "channel"
GATE_CELL = "cell_softmax"


@dataclass
class VDOutput:
    """Result of :meth:`VisualDictionary.forward`."""

    feats: Tensor  # [B,D,gh,gw]: straight-through (and gated) output; padded cells carry the raw feature
    codes: Tensor  # int64 [B,gh,gw]: index of the nearest code; -1 on padded cells
    stats: dict[str, float] = field(default_factory=dict)


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class VisualDictionary(nn.Module):
    """``k`` codes of width ``dim`` kept in buffers and updated by moving average (not by the optimiser).

    Buffers (all in the state dict, so checkpoints resume exactly):
    ``codes`` [k,D] float32, ``initialised`` bool, ``idle`` int64 [k] (updates
    since the code last received a feature), ``updates`` int64 (update steps so
    far) and, with ``laplace_eps > 0``, ``ema_count`` [k] and ``ema_sum`` [k,D].
    The only parameter is ``gate_logit`` [D] when ``gate`` is on.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        momentum: float = 0.99,
        laplace_eps: float = 0.0,
        reseed_dead: bool = False,
        reseed_after: int = 100,
        gate: bool = False,
        seed: int = 0,
        gate_form: str = GATE_CHANNEL,
        update_all: bool = False,
        quantise_padding: bool = False,
        init: str = INIT_FIRST_BATCH,
    ) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"model.vd.size: a VisualDictionary needs at least 1 code, got {size} (size 0 means no VD: do not build one)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"model.vd.momentum: must be in [0, 1), got {momentum}")
        self.size = int(size)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.laplace_eps = float(laplace_eps)
        self.reseed_dead = bool(reseed_dead)
        self.reseed_after = int(reseed_after)
        if update_all and laplace_eps <= 0:
            raise ValueError("model.vd.update_all: rewriting every code as smoothed sum / count needs model.vd.laplace_eps > 0")
        if init not in (INIT_FIRST_BATCH, INIT_NORMAL) or gate_form not in (GATE_CHANNEL, GATE_CELL):
            raise ValueError(f"model.vd: init {init!r} / gate_form {gate_form!r}: expected {INIT_FIRST_BATCH}|{INIT_NORMAL} and {GATE_CHANNEL}|{GATE_CELL}")
        self.update_all = bool(update_all)
        self.quantise_padding = bool(quantise_padding)
        self.register_buffer("codes", torch.randn(self.size, self.dim))  # the release's N(0, 1) start (init: normal keeps it)
        self.register_buffer("initialised", torch.tensor(init == INIT_NORMAL))
        # Host-side mirrors, so a training step reads nothing back from the device (train/loop.py):
        # ``initialised`` once seen True stays True until a state dict is loaded; statistics are
        # computed (one device read) only while ``report_stats`` is on (the loop: on logged steps).
        self._known_initialised = False
        self.report_stats = True
        self.register_buffer("idle", torch.zeros(self.size, dtype=torch.long))
        self.register_buffer("updates", torch.tensor(0, dtype=torch.long))
        if self.laplace_eps > 0:
            self.register_buffer("ema_count", torch.zeros(self.size))
            self.register_buffer("ema_sum", torch.zeros(self.size, self.dim))
        self.gate_logit = nn.Parameter(torch.zeros(self.dim)) if gate and gate_form == GATE_CHANNEL else None
        self.cell_gate: CellGate | None = CellGate(self.dim) if gate and gate_form == GATE_CELL else None
        self._gen = torch.Generator().manual_seed(int(seed))

    @classmethod
    def from_config(cls, cfg: VDConfig, dim: int, seed: int = 0) -> VisualDictionary | None:
        """The VD of a recipe's ``model.vd`` section, or ``None`` when ``size == 0``."""
        if cfg.size == 0:
            return None
        return cls(
            size=cfg.size,
            dim=dim,
            momentum=cfg.momentum,
            laplace_eps=cfg.laplace_eps,
            reseed_dead=cfg.reseed_dead,
            reseed_after=cfg.reseed_after,
            gate=cfg.gate,
            seed=seed,
            gate_form=cfg.gate_form,
            update_all=cfg.update_all,
            quantise_padding=cfg.quantise_padding,
            init=cfg.init,
        )

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, dim={self.dim}, momentum={self.momentum}, laplace_eps={self.laplace_eps}, "
            f"reseed_dead={self.reseed_dead}, reseed_after={self.reseed_after}, gate={self.gate_logit is not None or self.cell_gate is not None}, "
            f"update_all={self.update_all}, quantise_padding={self.quantise_padding}"
        )

    # --------------------------------------------------------------- helpers

    @torch.no_grad()
    def init_codes(self, codes: Tensor) -> None:
        """Set the codes explicitly (e.g. from a k-means run) and mark the dictionary initialised."""
        if tuple(codes.shape) != (self.size, self.dim):
            raise ValueError(f"init_codes: expected [{self.size},{self.dim}], got {tuple(codes.shape)}")
        self.codes.copy_(codes)
        self.initialised.fill_(True)
        self.idle.zero_()
        if self.laplace_eps > 0:
            self.ema_count.zero_()
            self.ema_sum.zero_()

    @torch.no_grad()
    def assign(self, x: Tensor) -> Tensor:
        """Index of the nearest code for every row of ``x`` [N,D] (squared Euclidean distance)."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # bf16 distances would mis-assign
            x = x.float()
            d = self.codes.float()
            dist2 = x.pow(2).sum(1, keepdim=True) - 2.0 * (x @ d.t()) + d.pow(2).sum(1).unsqueeze(0)
            return dist2.argmin(dim=1)

    def _sample_rows(self, pool: Tensor, n: int) -> Tensor:
        """``n`` rows of ``pool`` [M,D] drawn with the private generator (without replacement when M >= n)."""
        m = pool.shape[0]
        if m >= n:
            idx = torch.randperm(m, generator=self._gen)[:n]
            return pool[idx.to(pool.device)].clone()
        idx = torch.randint(m, (n,), generator=self._gen)
        rows = pool[idx.to(pool.device)].clone()
        scale = pool.std().clamp_min(1e-6) if m > 1 else pool.abs().mean().clamp_min(1e-6)
        noise = torch.randn(n, pool.shape[1], generator=self._gen).to(pool.device)
        return rows + 1e-2 * scale * noise

    def _sample_synced(self, pool: Tensor, n: int, fallback: Tensor) -> Tensor:
        """Rows sampled on rank 0 from its ``pool`` and broadcast; ``fallback`` [n,D] where rank 0 has no rows."""
        if _rank() == 0:
            rows = self._sample_rows(pool, n) if pool.shape[0] > 0 else fallback.clone()
        else:
            rows = torch.empty(n, self.dim, device=self.codes.device, dtype=self.codes.dtype)
        if _world_size() > 1:
            dist.broadcast(rows, src=0)
        return rows

    # --------------------------------------------------------------- update

    @torch.no_grad()
    def _initialise_from(self, real: Tensor) -> None:
        self.codes.copy_(self._sample_synced(real, self.size, self.codes))
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, real: Tensor, idx: Tensor) -> tuple[Tensor, int]:
        """One moving-average step from the real features ``real`` [M,D] (float32) and their codes ``idx`` [M].

        Returns the global per-code counts [k] and the number of re-seeded codes.
        """
        k = self.size
        stats = torch.zeros(k, self.dim + 1, device=real.device, dtype=torch.float32)
        stats[:, : self.dim].index_add_(0, idx, real)
        stats[:, self.dim].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        if _world_size() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        sums, counts = stats[:, : self.dim], stats[:, self.dim]
        used = counts > 0
        g = self.momentum
        if self.laplace_eps > 0:
            self.ema_count.mul_(g).add_(counts, alpha=1.0 - g)
            self.ema_sum.mul_(g).add_(sums, alpha=1.0 - g)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + self.laplace_eps) / (total + k * self.laplace_eps) * total
            new = self.ema_sum / smoothed.clamp_min(1e-12).unsqueeze(1)
        else:
            mean = sums / counts.clamp_min(1.0).unsqueeze(1)
            new = g * self.codes + (1.0 - g) * mean
        self.codes.copy_(new if self.update_all else torch.where(used.unsqueeze(1), new, self.codes))
        self.idle.add_(1).masked_fill_(used, 0)
        self.updates.add_(1)
        reseeded = 0
        if self.reseed_dead:
            dead = self.idle >= self.reseed_after
            n_dead = int(dead.sum())  # identical on every rank: idle follows the all-reduced counts
            if n_dead:
                rows = self._sample_synced(real, n_dead, self.codes[dead])
                self.codes[dead] = rows
                self.idle.masked_fill_(dead, 0)
                if self.laplace_eps > 0:
                    self.ema_count.masked_fill_(dead, 0.0)
                    self.ema_sum[dead] = 0.0
                reseeded = n_dead
        return counts, reseeded

    # -------------------------------------------------------------- forward

    def forward(self, feats: Tensor, mask: Tensor | None = None) -> VDOutput:
        """Quantise ``feats`` [B,D,gh,gw]; ``mask`` bool [B,gh,gw] is True on real cells (None: all real).

        In training mode this also initialises (first call) and updates the
        codes. Under DDP every rank must call it in training mode the same
        number of times (it runs collectives).
        """
        if feats.dim() != 4 or feats.shape[1] != self.dim:
            raise ValueError(f"visual dictionary expects [B,{self.dim},gh,gw], got {tuple(feats.shape)}")
        b, d, gh, gw = feats.shape
        x = feats.permute(0, 2, 3, 1).reshape(-1, d)
        valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None else mask.reshape(-1).to(x.device).bool()
        quantised = torch.ones_like(valid) if self.quantise_padding else valid  # the cells that are quantised and update the codes
        xf = x.detach().float()
        real = xf[quantised]
        reseeded = 0
        with torch.no_grad():
            if self.training and not self._known_initialised:
                if not bool(self.initialised):
                    self._initialise_from(real)
                self._known_initialised = True
            idx = self.assign(xf)
            if self.training:
                counts, reseeded = self._update(real, idx[quantised])
            else:
                counts = torch.bincount(idx[quantised], minlength=self.size).float()
            q = self.codes[idx].to(x.dtype)
        delta = (q - x).detach()
        if self.gate_logit is not None:
            delta = torch.sigmoid(self.gate_logit).to(x.dtype) * delta
        mixed = x + delta if self.cell_gate is None else self.cell_gate(x + delta, x)
        out = torch.where(quantised.unsqueeze(1), mixed, x)
        out = out.view(b, gh, gw, d).permute(0, 3, 1, 2)
        codes = idx.masked_fill(~valid, -1).view(b, gh, gw)
        return VDOutput(feats=out, codes=codes, stats=self._stats(counts, reseeded))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialised = False  # read the loaded buffer again at the next training forward

    @torch.no_grad()
    def _stats(self, counts: Tensor, reseeded: int) -> dict[str, float]:
        if not self.report_stats:
            return {}
        total = counts.sum()
        p = counts / total.clamp_min(1.0)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        dead = (self.idle >= self.reseed_after).sum()
        values = torch.stack([entropy.exp(), (counts > 0).sum().float(), dead.float()]).tolist()
        stats = {
            "perplexity": float(values[0]) if total > 0 else 0.0,
            "codes_used": float(values[1]),
            "dead_codes": float(values[2]),
            "reseeded": float(reseeded),
        }
        if self.gate_logit is not None:
            stats["gate"] = float(torch.sigmoid(self.gate_logit).mean())
        if self.cell_gate is not None and self.cell_gate.last_share is not None:
            stats["gate"] = self.cell_gate.last_share
        return stats


class CellGate(nn.Module):
    """The release's gate (``SimpleVDforPreGate``): per cell, a softmax over [quantised, raw] from a 1x1 conv.

    ``p = pos_line(st)`` (a linear layer on the straight-through output
    ``st = v + sg[d - v]``), ``(a, b) = softmax(W [p ; v] + c)`` per cell,
    ``out = a p + b v``. Gradient reaches the raw features ``v`` through the
    straight-through path, through ``b v`` and through the gate logits.
    ``last_share``: the mean of ``a`` of the last call (logged as ``vd/gate``).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.pos_line = nn.Linear(dim, dim)
        self.gate_fc = nn.Linear(2 * dim, 2)  # a 1x1 conv over the cells, written on the flattened cells
        nn.init.kaiming_normal_(self.gate_fc.weight, mode="fan_out", nonlinearity="relu")  # the release's kaiming_init of its ConvModule
        nn.init.zeros_(self.gate_fc.bias)
        self.last_share: float | None = None

    def forward(self, straight_through: Tensor, raw: Tensor) -> Tensor:
        """``straight_through``, ``raw`` [N, D] (cells as rows) -> the gated features [N, D]."""
        p = self.pos_line(straight_through)
        share = torch.softmax(self.gate_fc(torch.cat([p, raw], dim=1)), dim=1)
        self.last_share = float(share[:, 0].detach().mean()) if share.numel() else None
        return share[:, :1] * p + share[:, 1:] * raw


def perplexity(counts: Tensor) -> float:
    """exp(entropy) of a code-usage histogram: k when usage is uniform over k codes, 1 when one code takes all."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.float() / total
    return math.exp(float(-(p * torch.log(p.clamp_min(1e-12))).sum()))


__all__ = ["CellGate", "VDOutput", "VisualDictionary", "perplexity"]
