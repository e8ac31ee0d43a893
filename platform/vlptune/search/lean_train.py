"""A ``TorchTrainer`` with a lighter per-trial footprint (measured in docs/search.md).

Imported inside a trial's driver process only (it imports Ray Train's internals):

* no Ray Data callback: a trial feeds itself from Parquet shards, so the
  per-run DatasetManager actor (one more process per trial, importing Ray
  Data) is never used;
* the placement-group cleaner checks on the controller every 5 s instead of
  every second (each check is a state-API round trip through the dashboard;
  the PG of a killed trial is freed at most 5 s later);
* on a cluster without an autoscaler (the local cluster a search starts;
  :data:`vlptune.cluster.session.NO_AUTOSCALER_ENV` set), no resource requests to Ray's
  AutoscalingCoordinator: the fixed-size policy's requests can only be
  granted by an autoscaler, and the coordinator is one more detached process
  (importing Ray Data) whose first answer, on a busy 2-core machine, came
  later than Ray's 5 s timeout, so every trial logged a ``GetTimeoutError``
  traceback ("Failed to send resource request ... safe to ignore").

Falls back to Ray's own trainer if Ray's internal layout changes, or when
``VLPTUNE_LEAN_TRAINER=0`` (to compare with, or fall back to, Ray's defaults).
"""

from __future__ import annotations

import os
from typing import Any

from vlptune.cluster.session import NO_AUTOSCALER_ENV

PG_CLEANER_INTERVAL_S = 5.0  # Ray's default polls the state API every second, for the whole trial
LEAN_ENV = "VLPTUNE_LEAN_TRAINER"


def scaling_config(resources: Any) -> Any:
    """Ray Train's ``ScalingConfig`` for a recipe's ``resources`` section: ``workers`` DDP workers, each holding
    ``cpus_per_worker`` CPUs and, when ``gpus_per_worker`` > 0, that many GPUs (the one place that turns a recipe's
    resources into Ray's; trials, finetunings and backbone pretraining all call it)."""
    import ray.train  # heavy dependency kept lazy

    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus_per_worker > 0, resources_per_worker=per_worker)


def _env_on(name: str, default: str) -> bool:
    return os.environ.get(name, default) not in ("0", "", "false", "False")


def _fixed_policy_without_requests(base: type) -> type:
    class FixedPolicyWithoutRequests(base):
        """Ray's fixed-size scaling policy, minus the autoscaler resource requests."""

        def after_controller_start(self, train_run_context) -> None:
            self._requester_id = f"train-{train_run_context.run_id}"

        def _maybe_send_resource_request(self) -> None:
            return None

        def _send_resource_request(self) -> None:
            return None

    return FixedPolicyWithoutRequests


def lean_trainer_class(base: type) -> type:
    """``base`` (Ray's ``TorchTrainer``) with the changes of the module docstring."""
    if not _env_on(LEAN_ENV, "1"):
        return base
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback  # ray: heavy, only when this runs
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback  # ray: heavy, only when this runs
        from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy  # ray: heavy, only when this runs
        from ray.train.v2.api import data_parallel_trainer  # ray: heavy, only when this runs
    except ImportError:  # pragma: no cover - a future Ray
        return base

    if _env_on(NO_AUTOSCALER_ENV, "0") and hasattr(data_parallel_trainer, "create_scaling_policy"):
        ray_policy = data_parallel_trainer.create_scaling_policy
        quiet_policy = _fixed_policy_without_requests(FixedScalingPolicy)

        def create_scaling_policy(scaling_config):
            if scaling_config.elasticity_enabled:
                return ray_policy(scaling_config)
            return quiet_policy(scaling_config=scaling_config)

        # fit() looks the factory up in its module; this process runs one trial's trainer
        data_parallel_trainer.create_scaling_policy = create_scaling_policy

    class LeanTorchTrainer(base):
        def _create_default_callbacks(self):
            callbacks = []
            for cb in super()._create_default_callbacks():
                if isinstance(cb, DatasetsCallback) and not self.datasets:
                    continue
                if type(cb) is PlacementGroupCleanerCallback:
                    cb = PlacementGroupCleanerCallback(check_interval_s=PG_CLEANER_INTERVAL_S)
                callbacks.append(cb)
            return callbacks

    LeanTorchTrainer.__name__ = LeanTorchTrainer.__qualname__ = base.__name__
    return LeanTorchTrainer
