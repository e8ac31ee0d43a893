"""The one place a recipe's resources become Ray's, and a command's stay on a cluster (no cluster is started here)."""

from __future__ import annotations

import os

import pytest

from vlptune.cluster.session import SessionError, ray_session
from vlptune.config import ResourcesConfig
from vlptune.search.lean_train import scaling_config


def test_scaling_config_asks_each_worker_for_its_cpus_and_gpus_only_when_it_has_some():
    cpu = scaling_config(ResourcesConfig(workers=3, cpus_per_worker=0.5))
    assert (cpu.num_workers, cpu.use_gpu, cpu.resources_per_worker) == (3, False, {"CPU": 0.5})
    gpu = scaling_config(ResourcesConfig(workers=2, cpus_per_worker=4, gpus_per_worker=1))
    assert (gpu.num_workers, gpu.use_gpu, gpu.resources_per_worker) == (2, True, {"CPU": 4, "GPU": 1})


def test_a_session_on_a_cluster_that_cannot_be_joined_says_so_and_leaves_ray_off(monkeypatch):
    import ray

    from vlptune.cluster.session import free_loopback_port

    dead = f"127.0.0.1:{free_loopback_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(SessionError, match=f"cannot join the Ray cluster at {dead} \\(RAY_ADDRESS"):
        with ray_session(None):
            raise AssertionError("the body must not run")
    assert not ray.is_initialized()
    assert os.environ["RAY_ADDRESS"] == dead
