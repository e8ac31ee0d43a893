"""bench/gpu.py, the one-call GPU benchmark, in its CPU smoke mode: every figure lands in the results file."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from vlptune.config import Recipe
from vlptune.data.prepare import ensure_data

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
WORLD = {"train": 24, "val": 8, "image_size": 64, "seed": 0, "shard_size": 10}  # test_dataset's world (shared in a session)


def _bench():
    spec = importlib.util.spec_from_file_location("vlptune_bench_gpu", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_cpu_smoke_run_writes_every_figure(tmp_path, tmp_path_factory):
    world = ensure_data(Recipe(data={"root": str(tmp_path_factory.getbasetemp() / "synth-world"), "image_size": 64, "max_long_side": 128, "synth": WORLD}))
    out = tmp_path / "gpu.json"
    assert _bench().main(["--cpu-smoke", "--out", str(out), "--world", str(world), "--steps", "1", "--warmup", "1"]) == 0
    results = json.loads(out.read_text())
    assert results["mode"] == "cpu-smoke" and results["schema"] == 1
    assert set(results["targets"]) == {"light_share", "full_share", "vd_share_8192"}
    assert [s["recipe"] for s in results["steps"]] == ["demo-light", "demo-full"]
    for step in results["steps"]:
        for key in ("eager_s_per_step", "eager_images_per_s", "backbone_s_per_step", "backbone_images_per_s", "share_eager"):
            assert _positive(step[key]), (step["recipe"], key, step[key])
        assert step["share_eager"] < 1.0  # the full step does more than its CNN
        assert step["fused_optimizers"] is True  # CPU: torch's fused AdamW and SGD
        assert step["compiled_s_per_step"] is None and step["compile_error"] is None  # smoke: not compiled unless --compile
        assert step["eager_peak_gib"] is None and step["eager_host_syncs_per_step"] is None  # CUDA-only figures
    assert [r["k"] for r in results["vd"]] == [1024, 2048, 8192]
    assert all(_positive(r["s"]) and _positive(r["share_of_step"]) for r in results["vd"])
    loader = results["loader"]
    assert _positive(loader["cpu_decode_images_per_s"]) and _positive(loader["plain_pil_images_per_s"]) and _positive(loader["ratio_cpu_vs_plain"])
    # GPU decoding: a figure, or the reason there is none (torchvision or CUDA missing)
    assert (loader["gpu_decode_images_per_s"] is None) != (loader["gpu_decode_error"] is None)
    if loader["gpu_decode_error"] is not None:
        assert "data.decode=gpu needs" in loader["gpu_decode_error"]
