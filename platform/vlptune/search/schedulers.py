"""Tune's trial schedulers, with a non-finite metric ranked as the worst value.

Ray's ASHA records a trial's reward at each rung and stops it when
``reward < cutoff``: a NaN reward compares false, so a diverged trial was
never stopped and went on to the next rung (Hyperband and the median rule
compare the same way). Each scheduler here passes the result on with the
metric replaced by :func:`vlptune.io.rank_value` (the largest float of the
wrong sign) when it is NaN, infinite or missing, so a non-finite trial is
the first one cut, never one promoted. What the trial reported is not changed
(the loggers, the searcher and ``vlptune results`` see the NaN; the searcher
tells it FAIL, ``results`` lists it last).

This module is a Ray edge: it imports Ray Tune at module level
(:func:`vlptune.search.runner.make_scheduler` imports it lazily).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, MedianStoppingRule

from vlptune.io import finite, rank_value


def worst_when_nonfinite(result: dict[str, Any] | None, metric: str | None, mode: str | None) -> dict[str, Any] | None:
    """``result`` with ``metric`` made the worst value in ``mode`` when it holds a non-finite one (a copy; else ``result``).

    A result without the metric passes as it is (the schedulers skip those)."""
    if result is None or not metric or mode not in ("max", "min") or metric not in result or finite(result[metric]):
        return result
    return {**result, metric: rank_value(result.get(metric), mode)}


class NonFiniteLast:
    """Mixin of a Tune scheduler: results reach it with a non-finite metric made the worst value."""

    _metric: str | None
    _mode: str | None

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return super().on_trial_result(tune_controller, trial, worst_when_nonfinite(result, self._metric, self._mode))  # type: ignore[misc]

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        super().on_trial_complete(tune_controller, trial, worst_when_nonfinite(result, self._metric, self._mode))  # type: ignore[misc]


class ASHA(NonFiniteLast, ASHAScheduler):
    """Ray's ASHAScheduler; a non-finite metric is the worst (module docstring)."""


class HyperBand(NonFiniteLast, HyperBandScheduler):
    """Ray's HyperBandScheduler; a non-finite metric is the worst (module docstring)."""


class MedianStopping(NonFiniteLast, MedianStoppingRule):
    """Ray's MedianStoppingRule; a non-finite metric is the worst (module docstring)."""
