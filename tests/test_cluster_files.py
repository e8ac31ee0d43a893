"""The cluster definitions in cluster/: valid for the tools that read them.

- ``ray up`` YAMLs: against the JSON schema shipped inside the installed Ray
  (ray/autoscaler/ray-schema.json), and through Ray's own preparation
  (``prepare_config`` + ``validate_config``, what ``ray up`` does before it
  contacts a cloud);
- KubeRay RayCluster/RayJob: the fields the ray.io/v1 CRDs require, and
  consistency (shared volume mounted everywhere the storage path is used);
- the runtime env: Ray's own parser, and what it ships.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP_FILES = ("ray-up.yaml", "onprem.yaml")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _start_commands(cfg: dict) -> tuple[str, str]:
    return " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])


# ------------------------------------------------------------------ ray up


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_yaml_matches_rays_schema(name):
    cfg = _load(CLUSTER / name)
    errors = sorted(jsonschema.Draft7Validator(_schema()).iter_errors(cfg), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{name}: {'/'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_yaml_passes_rays_own_preparation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_load(CLUSTER / name)))
    validate_config(prepared)  # raises on a bad config, as `ray up` would
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_yaml_binds_dashboard_to_loopback_and_turns_token_auth_on(name):
    cfg = _load(CLUSTER / name)
    head, worker = _start_commands(cfg)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head + worker
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    # Every node gets the token of the machine that runs `ray up`.
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # The code is mounted from the repository root and installed.
    assert cfg["file_mounts"]["~/vlptune"] == "."
    setup = " ".join(cfg.get("setup_commands", []) + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", []))
    assert "-e ~/vlptune" in setup


def test_ray_up_yaml_has_cpu_head_and_gpu_workers_with_pinned_torch_builds():
    cfg = _load(CLUSTER / "ray-up.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training on the head
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # AWS GPU families
    assert all(t["min_workers"] >= 1 for t in workers)
    assert cfg["docker"]["worker_image"].endswith("-gpu") and "--gpus all" in cfg["docker"]["worker_run_options"]
    assert cfg["docker"]["head_image"].endswith("-cpu")
    # torch 2.13.0 everywhere: the CPU build on the head, the (PyPI) CUDA build on GPU workers,
    # each installed before the project so that pip keeps it.
    head_setup, worker_setup = cfg["head_setup_commands"], cfg["worker_setup_commands"]
    assert "torch==2.13.0" in head_setup[0] and "download.pytorch.org/whl/cpu" in head_setup[0]
    assert "torch==2.13.0" in worker_setup[0] and "whl/cpu" not in worker_setup[0]
    assert head_setup.index(next(c for c in head_setup if "-e ~/vlptune" in c)) > 0
    assert any("torch.cuda.is_available()" in c for c in worker_setup)
    # Ray's version of the image is the one the project pins (ray>=2.60,<2.61).
    import ray

    assert f"rayproject/ray:{ray.__version__}-py311" in cfg["docker"]["worker_image"]


def test_onprem_yaml_names_existing_machines():
    cfg = _load(CLUSTER / "onprem.yaml")
    provider = cfg["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert provider["head_ip"] not in provider["worker_ips"]
    assert cfg["max_workers"] == len(provider["worker_ips"])


# ------------------------------------------------------------------ KubeRay


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay's ray.io/v1 RayClusterSpec requires, and GPUs on the workers."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    assert head["rayStartParams"].get("dashboard-host") == "127.0.0.1", f"{where}: dashboard on the pod's loopback only"
    for c in _containers(head["template"]):
        assert c["name"] and c["image"], f"{where}: head container name/image"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: workerGroupSpecs"
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            assert key in g, f"{where}: workerGroupSpecs[{g.get('groupName')}].{key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: replicas out of [min, max]"
        for c in _containers(g["template"]):
            assert c["image"], f"{where}: worker container image"
            gpus = c["resources"]["limits"].get("nvidia.com/gpu")
            assert gpus is not None and int(gpus) >= 1, f"{where}: worker group {g['groupName']} has no GPU limit"
    # Token authentication, with the Ray version KubeRay needs to enable it.
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"].split(".")[:2] >= ["2", "52"]


def _mount_paths(spec: dict) -> list[set[str]]:
    """The mount paths of every container of every group (head first)."""
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return [{m["mountPath"] for c in _containers(g["template"]) for m in c.get("volumeMounts", [])} for g in groups]


def test_raycluster_has_the_fields_kuberay_requires():
    doc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "raycluster.yaml")
    assert all("/mnt/shared" in paths for paths in _mount_paths(doc["spec"]))


def test_rayjob_runs_a_vlptune_search_on_shared_storage():
    doc = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    # The sidecar submitter reaches the loopback-bound dashboard; it needs a head pod that does not restart.
    assert spec["submissionMode"] == "SidecarMode"
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] == "Never"
    argv = shlex.split(spec["entrypoint"].split("&&")[-1])
    assert argv[:2] == ["vlptune", "search"]
    space = argv[2]
    assert (ROOT / space).is_file(), f"rayjob.yaml searches {space}, which is not in the repository"
    assert argv[argv.index("--address") + 1] == "auto"
    storage = argv[argv.index("--storage") + 1]
    # The storage lies on a volume that every pod mounts at the same path.
    mounts = _mount_paths(spec["rayClusterSpec"])
    assert all(any(storage == m or storage.startswith(m.rstrip("/") + "/") for m in paths) for paths in mounts), (storage, mounts)
    from vlptune.cluster.storage import check_storage

    assert check_storage(storage, nodes=2, assume_shared=True) == storage
    # The search space is valid, and a trial fits on one worker pod of the group.
    from vlptune.search.space import load_space

    res = load_space(ROOT / space).base_recipe.resources
    limits = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert res.cpus_per_worker <= float(limits["cpu"]) and res.gpus_per_worker <= float(limits["nvidia.com/gpu"])
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)


# ------------------------------------------------------------------ runtime env


def test_runtime_env_parses_with_rays_parser():
    from ray.runtime_env import RuntimeEnv

    raw = _load(CLUSTER / "runtime_env.yaml")
    env = RuntimeEnv(**raw)
    assert env["working_dir"] == "."
    for pattern in ("/data/", "/results/", "/runs/", "/.venv/", "/.git/"):
        assert pattern in env["excludes"], pattern
    assert env["env_vars"]["PYTHONPATH"] == "platform"


def test_runtime_env_does_not_repeat_variables_the_search_sets():
    from vlptune.cluster.session import RAY_ENV

    raw = _load(CLUSTER / "runtime_env.yaml")
    assert not set(raw.get("env_vars", {})) & set(RAY_ENV)


def test_runtime_env_ships_the_package_but_not_data(tmp_path):
    """Zip the working dir as Ray does (its own packaging code, with the file's excludes)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from vlptune.cluster.submit import load_runtime_env

    env = load_runtime_env(CLUSTER / "runtime_env.yaml")
    assert Path(env["working_dir"]) == ROOT
    # A small copy of the repository's shape, so the test zips kilobytes, not the checkout.
    repo = tmp_path / "repo"
    for rel in (
        "pyproject.toml",
        "platform/vlptune/__init__.py",
        "platform/vlptune/data/synth.py",
        "trials/demo-light.yaml",
        "data/synth-demo/manifest.json",
        "runs/demo/sample.png",
        "results/x.csv",
        ".venv/bin/python",
        "platform/vlptune/__pycache__/x.cpython-311.pyc",
        "data/shard-0.parquet",
    ):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    (repo / "cluster").mkdir()
    (repo / "cluster" / "runtime_env.yaml").write_text((CLUSTER / "runtime_env.yaml").read_text())
    env = load_runtime_env(repo / "cluster" / "runtime_env.yaml")
    assert env["working_dir"] == str(repo)
    target = tmp_path / "pkg.zip"
    create_package(env["working_dir"], target, include_gitignore=True, excludes=env["excludes"])
    names = {n.rstrip("/") for n in zipfile.ZipFile(target).namelist()}
    assert {"platform/vlptune/__init__.py", "platform/vlptune/data/synth.py", "trials/demo-light.yaml"} <= names
    leaked = [n for n in names if n.split("/")[0] in ("data", "runs", "results", ".venv") or n.endswith((".pyc", ".parquet"))]
    assert not leaked, leaked
