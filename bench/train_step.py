"""Training throughput of a recipe next to a plain PyTorch step of the same shapes.

    .venv/bin/python bench/train_step.py trials/demo-light.yaml [-o k=v ...] [--steps 20] [--warmup 3]
                                         [--device cpu|cuda] [--batch 8] [--threads N]
                                         [--vary PATH=A,B [--rounds 3]]

Both are measured in the same process on synthetic random tensors shaped like
a training batch (no data files are read, so it runs anywhere):

* vlptune: ``train_step`` of vlptune.train.loop (the loop's own step: every
  active objective, the VD, gradient clipping, both optimisers) on the
  recipe's model, with the precision the loop would use on that device;
* reference: the same ResNet trunk and 1x1 projection, a word embedding of the
  same vocabulary, a plain ``nn.TransformerEncoder`` of the same width, depth,
  heads and feed-forward size run on the same number of sequences of the same
  length (one pass per objective view: ITM over all pairs, MLM and MVM over the
  positives), a tied vocabulary decoder on the same number of masked tokens,
  then backward and one AdamW step. No VD, no objectives' heads, no clipping.

It prints images/s and pairs/s of both and the ratio vlptune / reference.
The reference is what a hand-written PyTorch loop of the same size costs; the
ratio is the price of vlptune's generality.

``--vary PATH=A,B[,...]`` compares vlptune with itself instead: one model per
value of the recipe field PATH (say ``objectives.mvm.fusion_pass=separate,shared``
or ``train.compile=false,true``), each built from the same seed and fed the
same batch, timed in ``--rounds`` interleaved rounds (A, B, A, B, ...; the
median round is reported) with the ratio of each to the first. A compiled
variant (``train.compile``) is compiled and warmed up before the first round
and its compilations are printed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch
from torch import nn

from vlptune.config import Recipe, load_recipe
from vlptune.config.recipe import CACHED_BACKBONE
from vlptune.grid import grid_shape, grid_stride
from vlptune.objectives.base import build_pretrainer
from vlptune.train.optim import autocast, build_optimizers, resolve_precision

MLM_FRACTION = 0.15  # share of caption tokens masked in the synthetic batch (BERT's default)
SPECIAL_IDS = 1000  # ids below this are specials/unused in BERT vocabularies; random tokens are drawn above


def image_hw(recipe: Recipe) -> tuple[int, int]:
    """(H, W) of a batch: the shorter side at data.image_size, the longer at max_long_side (square mode: both)."""
    data = recipe.data
    if data.resize_mode == "square":
        return data.image_size, data.image_size
    return data.image_size, max(data.image_size, data.max_long_side)


def synthetic_batch(recipe: Recipe, batch_images: int, vocab: int, generator: torch.Generator) -> dict[str, Any]:
    data = recipe.data
    h, w = image_hw(recipe)
    per_image = data.itm_positives + data.itm_negatives
    pairs = batch_images * per_image
    t = data.max_text_len
    ids = torch.randint(SPECIAL_IDS, vocab, (pairs, t), generator=generator)
    itm = torch.tensor(([1] * data.itm_positives + [0] * data.itm_negatives) * batch_images)
    picked = (torch.rand(pairs, t, generator=generator) < MLM_FRACTION) & (itm == 1)[:, None]
    picked[:, 0] = picked[:, -1] = False
    gh, gw = grid_shape(h, w, grid_stride(recipe.model.backbone.pool))
    return {
        "images": torch.randn(batch_images, 3, h, w, generator=generator),
        "pixel_mask": torch.ones(batch_images, h, w, dtype=torch.bool),
        "text_ids": ids,
        "text_mask": torch.ones(pairs, t, dtype=torch.int64),
        "pair_image": torch.arange(batch_images).repeat_interleave(per_image),
        "itm_labels": itm,
        "mlm_ids": torch.where(picked, torch.full_like(ids, 103), ids),
        "mlm_labels": torch.where(picked, ids, torch.full_like(ids, -100)),
        "grid_hw": torch.tensor([gh, gw]),
        "grid_mask": torch.ones(batch_images, gh, gw, dtype=torch.bool),
    }


class Reference(nn.Module):
    """ResNet trunk + projection + embedding + plain TransformerEncoder + tied decoder (see module docstring)."""

    def __init__(self, recipe: Recipe, hidden: int, heads: int, ffn: int, vocab: int):
        super().__init__()
        from vlptune.model.backbone import GridProjection, ResNetBackbone

        self.backbone = ResNetBackbone(recipe.model.backbone)
        self.proj = GridProjection(self.backbone.out_channels, hidden, recipe.model.backbone.pool)
        self.embed = nn.Embedding(vocab, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, recipe.model.fusion.layers, enable_nested_tensor=False)

    def forward(self, batch: dict[str, Any], views: list[torch.Tensor], mlm: bool) -> torch.Tensor:
        grid = self.proj(self.backbone(batch["images"])).flatten(2).transpose(1, 2)  # [B, cells, H]
        loss = grid.new_zeros(())
        for rows in views:  # ITM- and MVM-like passes: a scalar of the first state
            tokens = torch.cat([self.embed(batch["text_ids"][rows]), grid[batch["pair_image"][rows]]], dim=1)
            loss = loss + self.encoder(tokens)[:, 0].pow(2).mean()
        if mlm:  # MLM-like pass over the positives, vocabulary logits on the masked tokens only
            rows = torch.nonzero(batch["itm_labels"] == 1, as_tuple=True)[0]
            tokens = torch.cat([self.embed(batch["mlm_ids"][rows]), grid[batch["pair_image"][rows]]], dim=1)
            labels = batch["mlm_labels"][rows]
            states = self.encoder(tokens)[:, : labels.shape[1]][labels != -100]
            loss = loss + nn.functional.cross_entropy((states @ self.embed.weight.t()).float(), labels[labels != -100])
        return loss


def reference_views(recipe: Recipe, batch: dict[str, Any]) -> list[torch.Tensor]:
    """Rows of the real step's fusion passes other than MLM's: ITM over all pairs, MVM over (prob x) the positives (none when it shares MLM's)."""
    views = []
    active = {n: c for n, c in recipe.objectives.items() if getattr(c, "weight", 0) > 0}
    if "itm" in active:
        views.append(torch.arange(batch["text_ids"].shape[0], device=batch["text_ids"].device))
    shared = "mlm" in active and getattr(active.get("mvm"), "fusion_pass", "separate") == "shared"  # MVM rides on MLM's pass
    if "mvm" in active and recipe.model.vd.size > 0 and not shared:
        positives = torch.nonzero(batch["itm_labels"] == 1, as_tuple=True)[0]
        keep = max(1, round(positives.numel() * active["mvm"].prob))
        views.append(positives[:keep])
    return views


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def compare(args: argparse.Namespace, overrides: list[str]) -> int:
    """``--vary``: vlptune against itself, one variant per value, rounds interleaved (see the module docstring)."""
    import statistics

    from vlptune.train.compiling import CompileWatch
    from vlptune.train.step import train_step

    path, _, values = args.vary.partition("=")
    device = torch.device(args.device)
    variants = []
    for value in values.split(","):
        recipe = load_recipe(args.recipe, [*overrides, f"{path}={value}"])
        precision = resolve_precision(recipe.optim.precision, device)
        torch.manual_seed(recipe.train.seed)
        pretrainer = build_pretrainer(recipe).to(device).train()
        watch = CompileWatch(pretrainer.model, recipe.train.compile)
        optimizers = build_optimizers(pretrainer, pretrainer.model.backbone, recipe.optim, max_steps=(args.steps + args.warmup) * args.rounds)
        batch = synthetic_batch(recipe, recipe.data.batch_images, pretrainer.model.vocab_size, torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)

        def step(p=pretrainer, o=optimizers, b=batch, g=gen, pr=precision, clip=recipe.optim.grad_clip) -> None:
            train_step(p, p, o, [b], device, pr, clip, g)

        for _ in range(args.warmup):  # warm-up (compilation) before any round
            step()
        watch.step_done()
        variants.append((value, step, watch, recipe))
    rounds: dict[str, list[float]] = {value: [] for value, *_ in variants}
    for _ in range(args.rounds):
        for value, step, _, _ in variants:
            rounds[value].append(timed(step, args.steps, 0, device))
    recipe = variants[0][3]
    h, w = image_hw(recipe)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"recipe {recipe.name}: {recipe.data.batch_images} images {h}x{w}, {recipe.model.fusion.layers} layers, device {name}")
    print(f"{args.rounds} rounds of {args.steps} steps per variant, interleaved; median round")
    print(f"{path:<36} {'s/step':>8} {'images/s':>10} {'ratio':>7}  rounds (s/step)")
    first = statistics.median(rounds[variants[0][0]])
    for value, _, watch, recipe in variants:
        sec = statistics.median(rounds[value])
        extra = "  " + ", ".join(f"{k} {v}" for k, v in watch.counts().items()) if watch.enabled else ""
        print(f"{value:<36} {sec:>8.3f} {recipe.data.batch_images / sec:>10.1f} {first / sec:>7.2f}  {' '.join(f'{r:.3f}' for r in rounds[value])}{extra}")
    print(f"ratio = throughput / throughput of {path}={variants[0][0]}")
    return 0 if all(math.isfinite(r) for rs in rounds.values() for r in rs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="images per step (default: data.batch_images)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--vary", default="", metavar="PATH=A,B", help="compare vlptune with itself over the values of one recipe field")
    parser.add_argument("--rounds", type=int, default=3, help="--vary: interleaved rounds (the median is reported)")
    args = parser.parse_args(argv)

    overrides = list(args.override)
    if args.batch:
        overrides.append(f"data.batch_images={args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if load_recipe(args.recipe, overrides).model.backbone.init == CACHED_BACKBONE:  # the weights do not change the step's time: skip making the cached backbone
        overrides.append("model.backbone.init=random")
    if args.vary:
        return compare(args, overrides)
    recipe = load_recipe(args.recipe, overrides)
    device = torch.device(args.device)
    precision = resolve_precision(recipe.optim.precision, device)
    batch_images = recipe.data.batch_images
    torch.manual_seed(recipe.train.seed)

    # vlptune: the loop's own step
    from vlptune.train.step import train_step

    pretrainer = build_pretrainer(recipe).to(device).train()
    optimizers = build_optimizers(pretrainer, pretrainer.model.backbone, recipe.optim, max_steps=args.steps + args.warmup)
    gen = torch.Generator().manual_seed(0)
    vocab = pretrainer.model.vocab_size
    batch = synthetic_batch(recipe, batch_images, vocab, gen)
    pairs = batch["text_ids"].shape[0]
    objective_gen = torch.Generator().manual_seed(1)
    ours = timed(
        lambda: train_step(pretrainer, pretrainer, optimizers, [batch], device, precision, recipe.optim.grad_clip, objective_gen),
        args.steps,
        args.warmup,
        device,
    )
    cfg = pretrainer.model.fusion.config
    hidden, heads, ffn = pretrainer.model.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    pretrainer = optimizers = None  # freed before the reference is built

    # reference: plain PyTorch, same shapes
    ref = Reference(recipe, hidden, heads, ffn, vocab).to(device).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    dev_batch = {k: v.to(device) for k, v in batch.items()}
    views = reference_views(recipe, dev_batch)
    mlm = "mlm" in {n for n, c in recipe.objectives.items() if getattr(c, "weight", 0) > 0}

    def ref_step() -> None:
        with autocast(precision, device):
            loss = ref(dev_batch, views, mlm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    theirs = timed(ref_step, args.steps, args.warmup, device)

    h, w = image_hw(recipe)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(
        f"recipe {recipe.name}: {batch_images} images {h}x{w}, {pairs} pairs, text {recipe.data.max_text_len} tokens, "
        f"{recipe.model.fusion.layers} layers x {hidden}, precision {precision}, device {name}"
    )
    print(f"{'':<10} {'s/step':>8} {'images/s':>10} {'pairs/s':>10}")
    for label, sec in (("vlptune", ours), ("reference", theirs)):
        print(f"{label:<10} {sec:>8.3f} {batch_images / sec:>10.1f} {pairs / sec:>10.1f}")
    print(f"ratio vlptune/reference (throughput): {theirs / ours:.2f}")
    return 0 if math.isfinite(ours) and math.isfinite(theirs) else 1


if __name__ == "__main__":
    sys.exit(main())
