"""Every GPU figure of issue 17 in one call, written to one JSON results file.

    PYTHONPATH=platform .venv/bin/python bench/gpu.py [--out results/gpu.json] [--cpu-smoke] [--world DIR]
                                                      [--steps 10] [--warmup 3] [--compile|--no-compile]
    bench/gpu.sh                     (the same, with the defaults for a GPU node; under 8 minutes on one H100/H200)

On CUDA (the default when a GPU is visible), in this order, each figure in the same process:

1. **steps**: ``trials/light.yaml`` (R-18, 3 layers, batch 16) and
   ``trials/full.yaml`` (R-101, 12 layers, batch 8) at 600x1000, the loop's own
   ``train_step`` (bf16, every objective, the VD, clipping, both optimisers) on a
   synthetic batch of full-size images, eager and under ``torch.compile``
   (compile time and recompiles reported), next to a **backbone-only** step of
   the same ResNet on the same images (forward, backward, SGD): ``share`` =
   vlptune images/s / backbone-only images/s (targets: light >= 0.85, full
   >= 0.88). Peak GPU memory of each, and the host syncs of one eager step
   counted by CUDA's sync debug mode. The networks are randomly initialised
   with the recipes' shapes (a BERT-base-shaped encoder written locally), so
   nothing is downloaded: the machine needs no network.
2. **vd**: the visual dictionary's training forward (assignment + moving-average
   update) on the full recipe's grid, at k = 1024, 2048 and 8192 codes, as a
   share of the full recipe's eager step (target <= 0.03 at k = 8192).
3. **loader**: ``build_loader`` over 600x800 JPEG shards with the node's cores as
   workers and CPU (PIL, draft mode) decoding, with ``data.decode: gpu``
   (torchvision's nvJPEG, when installed: the ``gpu`` extra) and a plain PIL
   decode + resize + to-tensor DataLoader of the same bytes and workers.

``--cpu-smoke`` (automatic without CUDA) runs the same code on CPU with small
shapes (demo-light and demo-full at batch 2, 2 steps, tiny JPEGs, no compile
unless ``--compile``) so a default test checks the results file in seconds;
its figures are not the GPU's. ``--world DIR``: an existing synthetic world to
build the loader's shards from (else one is generated).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import loader as loader_bench
import train_step as step_bench
from vlptune.config import Recipe, load_recipe, validate_recipe
from vlptune.data.prepare import ensure_data
from vlptune.grid import grid_shape, grid_stride
from vlptune.model.backbone import ResNetBackbone
from vlptune.model.visual_dictionary import VisualDictionary
from vlptune.objectives.base import build_pretrainer
from vlptune.train.optim import autocast, build_optimizers, resolve_precision
from vlptune.train.step import train_step

TRIALS = Path(__file__).resolve().parents[1] / "trials"
SCHEMA = 1
VD_SIZES = (1024, 2048, 8192)
# recipe, images per step: the GPU run and the CPU smoke run
GPU_RECIPES = (("light", 16), ("full", 8))
SMOKE_RECIPES = (("demo-light", 2), ("demo-full", 2))
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522}
GPU_LOADER_IMAGES, SMOKE_LOADER_IMAGES = 512, 8
GPU_PHOTO, SMOKE_PHOTO = (800, 600), (160, 120)
COMPILE_SHARE = 0.6  # of --budget-s: later, torch.compile is not started (the loader and VD figures still fit)
TARGETS = {"light_share": 0.85, "full_share": 0.88, "vd_share_8192": 0.03}


# --------------------------------------------------------------------------- helpers


def random_bert(folder: Path, layers: int) -> str:
    """A randomly initialised BERT-base-shaped encoder saved at ``folder`` (the recipes' shapes, no download)."""
    from transformers import BertConfig, BertModel

    path = folder / f"bert-base-random-{layers}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        BertModel(BertConfig(**{**BERT_BASE, "num_hidden_layers": layers})).save_pretrained(path)
    return str(path)


def bench_recipe(name: str, batch: int, folder: Path, smoke: bool) -> Recipe:
    """``trials/<name>.yaml`` at ``batch`` images, randomly initialised (GPU recipes: a local BERT-base-shaped encoder)."""
    overrides = [f"data.batch_images={batch}", "model.backbone.init=random"]
    if not smoke:
        overrides.append("model.backbone.channels_last=true")  # NHWC convolutions on tensor cores
    recipe = load_recipe(TRIALS / f"{name}.yaml", overrides)
    if not smoke and recipe.model.fusion.init != "minilm":
        recipe = load_recipe(TRIALS / f"{name}.yaml", [*overrides, f"model.fusion.init={random_bert(folder, recipe.model.fusion.layers)}"])
    return recipe


def peak_memory(device: torch.device) -> float | None:
    """Peak GPU memory since the last reset, GiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device syncs of one call of ``fn`` seen by CUDA's sync debug mode (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in seen if "synchroniz" in str(w.message).lower())


def recompiles() -> int:
    """Graphs torch.compile has built so far in this process (dynamo's unique graphs)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def images_per_s(images: int, seconds: float) -> float:
    return round(images / seconds, 2) if seconds > 0 and math.isfinite(seconds) else float("nan")


# --------------------------------------------------------------------------- 1. steps


def step_figures(recipe: Recipe, device: torch.device, steps: int, warmup: int, compile_model: bool, deadline: float = math.inf) -> dict[str, Any]:
    """Eager (and compiled, unless past ``deadline`` on the perf_counter clock) vlptune steps and a backbone-only step of the same shapes, one recipe."""
    precision = resolve_precision(recipe.optim.precision, device)
    b = recipe.data.batch_images
    torch.manual_seed(recipe.train.seed)
    reset_memory(device)
    pretrainer = build_pretrainer(recipe).to(device).train()
    optimizers = build_optimizers(pretrainer, pretrainer.model.backbone, recipe.optim, max_steps=10 * (steps + warmup) + 10)
    batch = step_bench.synthetic_batch(recipe, b, pretrainer.model.vocab_size, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}  # as the loader's pinned batches
    gen = torch.Generator().manual_seed(1)
    h, w = step_bench.image_hw(recipe)

    def ours(module: torch.nn.Module = pretrainer) -> Any:
        return train_step(module, pretrainer, optimizers, [batch], device, precision, recipe.optim.grad_clip, gen)

    out: dict[str, Any] = {
        "recipe": recipe.name,
        "images": b,
        "pairs": int(batch["text_ids"].shape[0]),
        "image_hw": [h, w],
        "layers": recipe.model.fusion.layers,
        "backbone_depth": recipe.model.backbone.depth,
        "precision": precision,
        "fused_optimizers": optimizers.skips_on_device,
    }
    eager = step_bench.timed(ours, steps, warmup, device)
    out["eager_s_per_step"] = round(eager, 5)
    out["eager_images_per_s"] = images_per_s(b, eager)
    out["eager_peak_gib"] = peak_memory(device)
    out["eager_host_syncs_per_step"] = count_syncs(ours, device)
    out["compiled_s_per_step"] = out["compiled_images_per_s"] = out["compile_s"] = out["recompiles"] = None
    out["compile_error"] = None
    if compile_model and time.perf_counter() > deadline:
        out["compile_error"] = "not run: past the time budget's share for compilation (--budget-s)"
    elif compile_model:
        try:
            before = recompiles()
            compiled = torch.compile(pretrainer)
            start = time.perf_counter()
            ours(compiled)  # compiles
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["compile_s"] = round(time.perf_counter() - start, 2)
            sec = step_bench.timed(lambda: ours(compiled), steps, warmup, device)
            out["compiled_s_per_step"] = round(sec, 5)
            out["compiled_images_per_s"] = images_per_s(b, sec)
            out["recompiles"] = recompiles() - before
        except Exception as exc:  # the figure is "compile failed, why", not a crash of the whole benchmark
            out["compile_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    pretrainer = optimizers = None
    reset_memory(device)

    # backbone-only: the same ResNet trunk (and memory format) on the same images, forward + backward + SGD
    net = ResNetBackbone(recipe.model.backbone).to(device).train()
    sgd = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    images = batch["images"]

    def backbone_step() -> None:
        with autocast(precision, device):
            loss = net(images.to(device, non_blocking=True)).float().pow(2).mean()
        loss.backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)

    bb = step_bench.timed(backbone_step, steps, warmup, device)
    out["backbone_s_per_step"] = round(bb, 5)
    out["backbone_images_per_s"] = images_per_s(b, bb)
    out["backbone_peak_gib"] = peak_memory(device)
    out["share_eager"] = round(bb / eager, 4)
    out["share_compiled"] = round(bb / out["compiled_s_per_step"], 4) if out["compiled_s_per_step"] else None
    net = sgd = None
    reset_memory(device)
    return out


# --------------------------------------------------------------------------- 2. the VD


def vd_figures(recipe: Recipe, device: torch.device, step_s: float, steps: int, warmup: int) -> list[dict[str, Any]]:
    """The VD's training forward on ``recipe``'s grid at each size in VD_SIZES, and its share of a step of ``step_s``."""
    h, w = step_bench.image_hw(recipe)
    gh, gw = grid_shape(h, w, grid_stride(recipe.model.backbone.pool))
    b = recipe.data.batch_images
    dim = int(BERT_BASE["hidden_size"]) if recipe.model.fusion.init != "minilm" else 384
    rows = []
    for k in VD_SIZES:
        vd = VisualDictionary(k, dim).to(device).train()
        feats = torch.randn(b, dim, gh, gw, device=device, requires_grad=True)
        mask = torch.ones(b, gh, gw, dtype=torch.bool, device=device)
        vd.report_stats = False  # as in the loop's steps between logs

        def forward(vd: VisualDictionary = vd, feats: torch.Tensor = feats, mask: torch.Tensor = mask) -> None:
            with autocast(resolve_precision(recipe.optim.precision, device), device):
                vd(feats, mask).feats.float().sum().backward()

        sec = step_bench.timed(forward, steps, warmup, device)
        rows.append({"k": k, "dim": dim, "cells": b * gh * gw, "s": round(sec, 6), "share_of_step": round(sec / step_s, 4)})
    return rows


# --------------------------------------------------------------------------- 3. the loader


def loader_figures(tmp: Path, world: Path | None, smoke: bool, device: torch.device) -> dict[str, Any]:
    """build_loader over photo-like JPEG shards: CPU decoding with the node's cores as workers, GPU decoding, plain PIL."""
    n = SMOKE_LOADER_IMAGES if smoke else GPU_LOADER_IMAGES
    size = SMOKE_PHOTO if smoke else GPU_PHOTO
    source = world or ensure_data(loader_bench.synth_recipe(tmp / "synth", 32))
    root = loader_bench.photo_copy(source, tmp / "photos", size, 0, n)
    cores = os.cpu_count() or 1
    workers = 0 if smoke else cores
    shape = {"image_size": 96, "max_long_side": 160} if smoke else {"image_size": 600, "max_long_side": 1000}
    recipe = loader_bench.synth_recipe(root, n, synthesize=False, num_workers=workers, batch_images=min(8, n), **shape)
    out: dict[str, Any] = {"images": n, "stored_wh": list(size), "cores": cores, "workers": workers}
    loader_bench.rate_ours(recipe, recipe.data.batch_images)  # warm
    out["cpu_decode_images_per_s"] = round(loader_bench.rate_ours(recipe, n), 2)
    out["plain_pil_images_per_s"] = round(loader_bench.rate_reference(loader_bench.PlainImages(root, recipe), recipe, n), 2)
    out["ratio_cpu_vs_plain"] = round(out["cpu_decode_images_per_s"] / out["plain_pil_images_per_s"], 3)
    out["gpu_decode_images_per_s"] = out["gpu_decode_error"] = None
    gpu = validate_recipe({**recipe.model_dump(), "data": {**recipe.data.model_dump(), "decode": "gpu", "num_workers": 0}}, "bench gpu decode")
    try:
        loader_bench.rate_ours(gpu, gpu.data.batch_images)  # warm (and the clear error without torchvision or CUDA)
        out["gpu_decode_images_per_s"] = round(loader_bench.rate_ours(gpu, n), 2)
    except Exception as exc:  # recorded: which of torchvision / CUDA is missing
        out["gpu_decode_error"] = f"{type(exc).__name__}: {exc}"
    return out


# --------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="small shapes on CPU (automatic without CUDA)")
    ap.add_argument("--world", type=Path, default=None, help="an existing synthetic world for the loader's shards")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per figure (default: 10 on GPU, 2 in the smoke run)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 3 on GPU, 1 in the smoke run)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None, help="measure torch.compile (default: on GPU only)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--budget-s", type=float, default=420.0, help="compilation is skipped (and said so) once the run passes 60%% of this")
    args = ap.parse_args(argv)
    logging.getLogger("vlptune").setLevel(logging.WARNING)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    steps = args.steps or (2 if smoke else 10)
    warmup = args.warmup or (1 if smoke else 3)
    compile_model = (not smoke) if args.compile is None else args.compile
    if smoke:
        torch.set_num_threads(1)  # small tensors; and a shared CPU: more threads only contend
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": "cpu-smoke" if smoke else "gpu",
        "environment": environment(device),
        "compile_via": "torch.compile(pretrainer) in this benchmark (recipe option train.compile not used)",
        "targets": TARGETS,
        "steps": [],
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, batch in SMOKE_RECIPES if smoke else GPU_RECIPES:
            recipe = bench_recipe(name, batch, tmp, smoke)
            fig = step_figures(recipe, device, steps, warmup, compile_model, started + COMPILE_SHARE * args.budget_s)
            results["steps"].append(fig)
            print(
                f"{name}: eager {fig['eager_images_per_s']} img/s, compiled {fig['compiled_images_per_s']} img/s, backbone-only "
                f"{fig['backbone_images_per_s']} img/s, share {fig['share_eager']} (compiled {fig['share_compiled']}), peak {fig['eager_peak_gib']} GiB, "
                f"syncs/step {fig['eager_host_syncs_per_step']}",
                flush=True,
            )
        full = results["steps"][-1]
        results["vd"] = vd_figures(bench_recipe(*(SMOKE_RECIPES if smoke else GPU_RECIPES)[-1], tmp, smoke), device, full["eager_s_per_step"], steps, warmup)
        print("vd: " + ", ".join(f"k={r['k']} {r['share_of_step']:.2%} of a step" for r in results["vd"]), flush=True)
        results["loader"] = loader_figures(tmp, args.world, smoke, device)
        print(f"loader: {results['loader']}", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    print(f"wrote {args.out} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
