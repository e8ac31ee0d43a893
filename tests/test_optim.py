"""Optimisers: parameter groups, lr schedule values, accumulation (arithmetic and equivalence), precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlptune.config import ConfigError, OptimConfig
from vlptune.train.optim import (
    LRSchedule,
    accumulation_steps,
    build_optimizers,
    clip_gradients,
    resolve_precision,
    split_parameters,
)
from vlptune.train.step import train_step


class Toy(nn.Module):
    """A CNN-ish 'backbone' and a Transformer-ish rest, with biases, norms and a frozen stage."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.rest = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        self.backbone[0].weight.requires_grad_(False)  # a stage frozen for the whole run
        self.backbone[0].bias.requires_grad_(False)

    def forward(self, batch, generator=None):
        x = self.backbone(batch["images"]).mean(dim=(2, 3))
        logits = self.rest(x)
        loss = nn.functional.cross_entropy(logits, batch["itm_labels"])
        return loss, {"itm_loss": loss.detach()}


def test_groups_sides_and_no_decay():
    toy = Toy()
    split = split_parameters(toy, toy.backbone)
    ids = lambda ps: {id(p) for p in ps}
    assert ids(split["backbone"]["decay"]) == {id(toy.backbone[2].weight)}
    assert ids(split["backbone"]["no_decay"]) == {id(toy.backbone[1].weight), id(toy.backbone[1].bias), id(toy.backbone[2].bias)}
    assert ids(split["transformer"]["decay"]) == {id(toy.rest[0].weight), id(toy.rest[2].weight)}
    assert ids(split["transformer"]["no_decay"]) == {id(toy.rest[0].bias), id(toy.rest[1].weight), id(toy.rest[1].bias), id(toy.rest[2].bias)}
    frozen = {id(toy.backbone[0].weight), id(toy.backbone[0].bias)}
    assert not frozen & set().union(*(ids(v) for side in split.values() for v in side.values()))


def test_optimizer_kinds_and_hyperparameters():
    toy = Toy()
    cfg = OptimConfig(
        backbone={"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-3, "momentum": 0.8},
        transformer={"optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.02, "betas": (0.8, 0.95)},
        schedule="constant",
    )
    opts = build_optimizers(toy, toy.backbone, cfg, max_steps=10)
    sgd, adamw = opts.optimizers["backbone"], opts.optimizers["transformer"]
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    by_name = {g["name"]: g for o in (sgd, adamw) for g in o.param_groups}
    assert by_name["backbone/decay"]["weight_decay"] == 1e-3 and by_name["backbone/no_decay"]["weight_decay"] == 0.0
    assert by_name["transformer/decay"]["weight_decay"] == 0.02 and by_name["transformer/no_decay"]["weight_decay"] == 0.0
    assert sgd.param_groups[0]["momentum"] == 0.8 and adamw.param_groups[0]["betas"] == (0.8, 0.95)
    assert opts.lrs() == {"lr/backbone": pytest.approx(0.05), "lr/transformer": pytest.approx(3e-4)}


def test_swapped_optimizers_are_honoured():
    toy = Toy()
    cfg = OptimConfig(backbone={"optimizer": "adamw", "lr": 1e-3}, transformer={"optimizer": "sgd", "lr": 1e-2})
    opts = build_optimizers(toy, toy.backbone, cfg, max_steps=10)
    assert isinstance(opts.optimizers["backbone"], torch.optim.AdamW)
    assert isinstance(opts.optimizers["transformer"], torch.optim.SGD)


# --------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_values():
    f = LRSchedule(OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), max_steps=104)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(54) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(104) == pytest.approx(0.1)
    assert f(29) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))


def test_step_and_constant_schedules():
    step = LRSchedule(OptimConfig(schedule="step", step_milestones=[0.5, 0.75], step_gamma=0.1), max_steps=100)
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    const = LRSchedule(OptimConfig(schedule="constant", warmup_steps=2), max_steps=100)
    assert [const(s) for s in (0, 1, 2, 99)] == pytest.approx([0.5, 1, 1, 1])


def test_optimizer_lr_follows_the_schedule_per_step():
    toy = Toy()
    cfg = OptimConfig(schedule="cosine", warmup_steps=2, backbone={"optimizer": "sgd", "lr": 0.1}, transformer={"lr": 1e-3})
    opts = build_optimizers(toy, toy.backbone, cfg, max_steps=6)
    f = LRSchedule(cfg, 6)
    seen = []
    for _ in range(6):
        seen.append(opts.lrs()["lr/backbone"])
        opts.step()
    assert seen == pytest.approx([0.1 * f(s) for s in range(6)])


# --------------------------------------------------------------------------- accumulation


def test_accumulation_steps_arithmetic_and_error():
    assert accumulation_steps(0, 8, 4) == 1
    assert accumulation_steps(64, 8, 4) == 2
    assert accumulation_steps(8, 8, 1) == 1
    with pytest.raises(ConfigError) as err:
        accumulation_steps(60, 8, 2)
    text = str(err.value)
    assert "optim.global_batch=60" in text and "data.batch_images=8" in text and "workers=2" in text
    with pytest.raises(ConfigError):
        accumulation_steps(4, 8, 1)  # less than one micro-batch


def _capture_grads(opts):
    grads = {}

    def step(found_inf=None):  # the fused path passes its device flag
        for _side, opt in opts.optimizers.items():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[id(p)] = p.grad.detach().clone()

    opts.step = step  # the optimiser step records the gradients instead of applying them
    return grads


def test_accumulating_two_batches_of_4_equals_one_batch_of_8():
    torch.manual_seed(0)
    toy = Toy().eval()  # BatchNorm on running statistics: the model is a deterministic per-sample function
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(8, 3, 6, 6, generator=g), "itm_labels": torch.randint(0, 2, (8,), generator=g), "pair_image": torch.arange(8)}
    halves = [{k: v[i : i + 4] for k, v in batch.items()} for i in (0, 4)]
    cfg = OptimConfig(grad_clip=0.0)
    one = build_optimizers(toy, toy.backbone, cfg, max_steps=1)
    grads_one = _capture_grads(one)
    out_one = train_step(toy, toy, one, [batch], torch.device("cpu"), "fp32", 0.0, None)
    two = build_optimizers(toy, toy.backbone, cfg, max_steps=1)
    grads_two = _capture_grads(two)
    out_two = train_step(toy, toy, two, halves, torch.device("cpu"), "fp32", 0.0, None)
    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 0
    for key in grads_one:
        torch.testing.assert_close(grads_two[key], grads_one[key], rtol=1e-5, atol=1e-7)
    assert out_two.loss == pytest.approx(out_one.loss, rel=1e-5)
    assert out_one.images == out_two.images == 8 and len(out_two.metrics) == 2


def test_clipping_returns_the_norm_before_clipping():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    norm = clip_gradients([p], 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert float(clip_gradients([p], 0.0)) == pytest.approx(5.0) and float(p.grad.norm()) == pytest.approx(5.0)


def test_non_finite_step_is_skipped_and_weights_untouched():
    toy = Toy()
    opts = build_optimizers(toy, toy.backbone, OptimConfig(), max_steps=4)
    before = [p.detach().clone() for p in toy.parameters()]
    batch = {"images": torch.full((2, 3, 6, 6), float("nan")), "itm_labels": torch.tensor([0, 1]), "pair_image": torch.arange(2)}
    out = train_step(toy, toy, opts, [batch], torch.device("cpu"), "fp32", 1.0, None)
    assert not out.finite
    assert all(torch.equal(a, b) for a, b in zip(before, toy.parameters()))
    assert all(p.grad is None for p in toy.parameters())


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
