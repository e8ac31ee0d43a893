"""GPU hygiene options that must not change results: channels_last CNN, fused optimisers, checkpointing under DDP's rules."""

from __future__ import annotations

import pytest
import torch

from vlptune.config import OptimConfig
from vlptune.model.backbone import ResNetBackbone
from vlptune.train.optim import build_optimizers


def test_channels_last_backbone_gives_the_same_features():
    torch.manual_seed(0)
    plain = ResNetBackbone(width_mult=0.0625).eval()
    nhwc = ResNetBackbone(width_mult=0.0625, channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = nhwc.resnet.embedder.embedder.convolution.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-4, atol=1e-5)


def test_fused_and_foreach_optimisers_take_the_same_steps():
    def run(fused: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        opts = build_optimizers(net, net[0], OptimConfig(fused=fused), max_steps=3)
        for k in range(3):
            opts.zero_grad()
            net(torch.full((2, 4), float(k + 1))).sum().backward()
            opts.step()
        return [p.detach() for p in net.parameters()]

    for a, b in zip(run("auto"), run("never")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- DDP (gloo, two processes)


def _ddp_worker(rank: int, world_size: int, init_file: str, root: str, out: str, result_dir: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    import vlptune.train.loop as loop
    from vlptune.config import validate_recipe
    from vlptune.train.reporting import LocalReporter

    built = {}
    original = loop.build_pretrainer

    def capture(*args):
        built["module"] = original(*args)
        return built["module"]

    loop.build_pretrainer = capture
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        recipe = validate_recipe(
            {
                "name": "ddp-hygiene",
                "data": {"root": root, "synth": {"train": 16, "val": 8, "image_size": 64}, "image_size": 64, "max_long_side": 96, "batch_images": 4},
                "model": {
                    "backbone": {"width_mult": 0.0625, "pool": 1, "channels_last": True},
                    "vd": {"size": 16},
                    "fusion": {"layers": 2, "grad_checkpointing": True},
                },
                "train": {"max_steps": 3, "eval_every": 3, "log_every": 2},
                "eval": {"max_images": 4, "loss_batches": 1, "vd_picture_codes": 0},
                "resources": {"cpus_per_worker": 1},
            },
            "ddp hygiene test",
        )
        result = loop.train_worker(recipe, LocalReporter(quiet=True), out, resume=False)
        checksum = float(sum(p.detach().double().sum() for p in built["module"].parameters()))
        Path(result_dir, f"{rank}.json").write_text(json.dumps({"checksum": checksum, "val_loss": result["val/loss"], "step": result["step"]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_checkpointing_channels_last_and_fused_steps_under_ddp(tmp_path):
    """Non-reentrant gradient checkpointing, an NHWC CNN and fused optimisers under DDP (find_unused_parameters): ranks stay identical.
    Measured: 46 s on the shared 2-core machine (load average ~12)."""
    import json

    import torch.multiprocessing as mp

    from vlptune.config import validate_recipe
    from vlptune.data.prepare import ensure_data

    root = tmp_path / "synth"
    ensure_data(validate_recipe({"name": "w", "data": {"root": str(root), "synth": {"train": 16, "val": 8, "image_size": 64}}}, "world"))
    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(root), str(tmp_path / "run"), str(results)), nprocs=2, start_method="spawn")
    rank0, rank1 = (json.loads((results / f"{r}.json").read_text()) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 3
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)
    assert torch.isfinite(torch.tensor(rank0["val_loss"])) and rank0["val_loss"] == pytest.approx(rank1["val_loss"])
