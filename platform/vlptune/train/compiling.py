"""``train.compile``: torch.compile of the model's heavy parts, and how often it compiled.

What is compiled: the backbone, the 1x1 projection and the fusion encoder
(:meth:`torch.nn.Module.compile`, in place, so parameter names, state dicts
and checkpoints are those of the eager model). The objectives' heads, the VD
and the step's bookkeeping stay eager: they are small, and their
data-dependent shapes (the masked tokens and cells) would only add graphs.

A compiled module compiles again whenever its inputs' shapes (or other guards)
change. :class:`CompileWatch` counts the frames torch.compile compiled: all of
them (``frames``) and those compiled after the first training step
(``recompiles``): each new batch or image shape after the first step costs a
compilation. Padding images to a few shapes (``data.shape_buckets``) bounds
them. The loop logs both (TensorBoard ``compile/frames``,
``compile/recompiles``) and returns them in its result.
"""

from __future__ import annotations

import logging

import torch

from vlptune.model.vlp import VLPModel

log = logging.getLogger(__name__)


def frames_compiled() -> int:
    """Frames torch.compile (dynamo) compiled in this process so far."""
    return int(torch._dynamo.utils.counters["frames"]["ok"])


class CompileWatch:
    """Compiles ``model``'s heavy parts when ``enabled`` and counts compilations (see the module docstring); a no-op when not."""

    def __init__(self, model: VLPModel, enabled: bool):
        self.enabled = enabled
        self.start = frames_compiled()
        self.warm: int | None = None
        if enabled:
            for part in (model.backbone, model.proj, model.fusion):
                part.compile()

    def step_done(self) -> None:
        """Call after each training step: the first sets the baseline of ``recompiles``."""
        if self.enabled and self.warm is None:
            self.warm = frames_compiled()

    def counts(self) -> dict[str, int]:
        """``{"frames": compiled since the start, "recompiles": compiled after the first step}``; empty when compile is off."""
        if not self.enabled:
            return {}
        now = frames_compiled()
        return {"frames": now - self.start, "recompiles": now - (self.warm if self.warm is not None else now)}

    def summary(self) -> dict[str, int]:
        """``counts()`` under ``compile_*`` keys, for the run's result (logged once)."""
        counts = self.counts()
        if counts:
            log.info("torch.compile: %d frames compiled, %d of them after the first step", counts["frames"], counts["recompiles"])
        return {f"compile_{key}": value for key, value in counts.items()}


__all__ = ["CompileWatch", "frames_compiled"]
