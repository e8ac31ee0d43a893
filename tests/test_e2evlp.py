"""E2E-VLP: the shared decoder, DETR-style detection, captioning, decoding, and `vlptune caption`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from helpers import build_with_data, tiny_recipe
from vlptune.config import ConfigError, validate_recipe
from vlptune.model.decoder import (
    DecoderSpec,
    TransformerDecoder,
    beam_search,
    causal_mask,
    get_or_create_decoder,
    image_only_memory,
)
from vlptune.objectives import detection as detection_module
from vlptune.objectives.base import Pretrainer, StepContext, build_pretrainer
from vlptune.objectives.detection import box_cxcywh_to_xyxy, generalized_iou, pairwise_iou
from vlptune.tasks.caption import MentionVocab, mention_scores

CLS, SEP, PAD, MASK = 101, 102, 0, 103  # MiniLM's (BERT uncased) special ids
NUM_CLASSES, NUM_ATTRS = 8, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def e2e_recipe(objectives=None, **sections):
    objectives = objectives or {
        "detection": {"decoder_layers": 2, "num_queries": 6, "num_classes": NUM_CLASSES, "num_attributes": NUM_ATTRS},
        "captioning": {"decoder_layers": 2},
    }
    data = {"root": "/nonexistent/e2e-tiny", "max_text_len": 12, **sections.pop("data", {})}
    return tiny_recipe("e2e-tiny", objectives, data=data, **sections)


def hand_batch(images: int = 2, side: int = 64, text_len: int = 7, seed: int = 0) -> dict:
    """P=1, N=1 per image; objects on a 2x2 grid; the last image has fewer objects (padded labels -1)."""
    g = torch.Generator().manual_seed(seed)
    pairs = 2 * images
    ids = torch.randint(2000, 5000, (pairs, text_len), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones(pairs, text_len, dtype=torch.int64)
    ids[:, -1] = SEP
    ids[1, -2:] = torch.tensor([SEP, PAD])  # one shorter caption
    mask[1, -1] = 0
    objects = 3
    labels = torch.randint(0, NUM_CLASSES, (images, objects), generator=g)
    labels[-1, 1:] = -1
    boxes = torch.rand(images, objects, 4, generator=g) * 0.4 + 0.2
    attrs = (torch.rand(images, objects, NUM_ATTRS, generator=g) > 0.7).float()
    obj_masks = torch.zeros(images, objects, 2, 2, dtype=torch.bool)
    obj_masks[:, 0, 0, 0] = obj_masks[:, 1, 1, :] = obj_masks[:, 2, :, 1] = True
    return {
        "images": torch.randn(images, 3, side, side, generator=g),
        "pixel_mask": torch.ones(images, side, side, dtype=torch.bool),
        "image_ids": [f"img{i}" for i in range(images)],
        "text_ids": ids,
        "text_mask": mask,
        "pair_image": torch.arange(images).repeat_interleave(2),
        "itm_labels": torch.tensor([1, 0] * images),
        "obj_labels": labels,
        "obj_boxes": boxes,
        "obj_attrs": attrs,
        "obj_masks": obj_masks,
        "phrase_spans": torch.tensor([[[1, 3], [-1, -1]]] * pairs),
        "captions": [f"caption {i}" for i in range(pairs)],
    }


@pytest.fixture(scope="module")
def pretrainer() -> Pretrainer:
    torch.manual_seed(0)
    return build_pretrainer(e2e_recipe())


# --------------------------------------------------------------------------- decoder


def test_decoder_is_causal_and_ignores_padded_memory():
    torch.manual_seed(0)
    dec = TransformerDecoder(DecoderSpec(layers=2, hidden=32, heads=4, ffn=64, dropout=0.0)).eval()
    tgt = torch.randn(2, 5, 32)
    memory = torch.randn(2, 7, 32)
    mem_mask = torch.ones(2, 7, dtype=torch.bool)
    mem_mask[1, 4:] = False
    out = dec(tgt, memory, mem_mask, causal=True)
    assert out.shape == (2, 5, 32)
    changed = tgt.clone()
    changed[:, 3:] = torch.randn(2, 2, 32)  # the future of position 2
    torch.testing.assert_close(dec(changed, memory, mem_mask, causal=True)[:, :3], out[:, :3])
    noisy = memory.clone()
    noisy[1, 4:] = 100.0  # padded memory positions
    torch.testing.assert_close(dec(tgt, noisy, mem_mask, causal=True)[1], out[1])
    layers = dec(tgt, memory, mem_mask, return_intermediate=True)
    assert len(layers) == 2 and all(x.shape == (2, 5, 32) for x in layers)
    assert causal_mask(3).tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_detection_and_captioning_share_one_decoder_on_the_model(pretrainer):
    model = pretrainer.model
    assert isinstance(model.decoder, TransformerDecoder) and len(model.decoder.layers) == 2
    assert pretrainer.objectives["detection"].decoder is model.decoder is pretrainer.objectives["captioning"].decoder
    names = [n for n in pretrainer.state_dict() if ".layers.0.self_attn.in_proj_weight" in n and "decoder" in n]
    assert names == ["model.decoder.layers.0.self_attn.in_proj_weight"]  # stored once
    transformer = {id(p) for p in model.param_groups()["transformer"]}
    assert {id(p) for p in model.decoder.parameters()} <= transformer
    with pytest.raises(ConfigError, match="captioning.decoder_layers=3.*share one decoder"):
        e2e = e2e_recipe({"detection": {"decoder_layers": 2, "num_classes": 8, "num_attributes": 10}, "captioning": {"decoder_layers": 3}})
        build_pretrainer(e2e)
    with pytest.raises(ConfigError, match="already built with 2 layers"):
        get_or_create_decoder(model, 4, "captioning")


# --------------------------------------------------------------------------- boxes & detection


def test_box_geometry():
    a = box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]]))
    torch.testing.assert_close(a, torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0], [2.0, 2.0, 3.0, 3.0]])
    iou, _ = pairwise_iou(b, b)
    assert math.isclose(float(iou[0, 1]), 1 / 3, rel_tol=1e-5) and float(iou[0, 2]) == 0.0
    giou = generalized_iou(b, b)
    torch.testing.assert_close(torch.diagonal(giou), torch.ones(3))
    assert math.isclose(float(giou[0, 2]), 0.0 - (9 - 2) / 9, rel_tol=1e-5)  # disjoint: -(hull - union)/hull


def test_detection_matches_with_the_hungarian_matcher_and_assigns_no_object_elsewhere(pretrainer, monkeypatch):
    det = pretrainer.objectives["detection"]
    calls = []
    real = detection_module.batched_hungarian_match

    def spy(cost, counts):
        calls.append((tuple(cost.shape), [int(c) for c in counts]))
        return real(cost, counts)

    monkeypatch.setattr(detection_module, "batched_hungarian_match", spy)
    # Hand-made predictions: query 4 of image 0 sits exactly on object 0 with its class, query 1 on object 1.
    labels = torch.tensor([[2, 5, -1]])
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2], [0, 0, 0, 0]]])
    attrs = torch.zeros(1, 3, NUM_ATTRS)
    attrs[0, 0, 3] = attrs[0, 1, 7] = 1.0
    q = 6
    logits = torch.full((1, q, NUM_CLASSES + 1), -5.0)
    logits[0, :, NUM_CLASSES] = 5.0  # every query says "no object"...
    logits[0, 4, 2] = logits[0, 1, 5] = 10.0  # ...except the two that see the objects
    logits[0, [4, 1], NUM_CLASSES] = -5.0
    pboxes = torch.full((1, q, 4), 0.1)
    pboxes[0, 4] = boxes[0, 0]
    pboxes[0, 1] = boxes[0, 1]
    pattrs = torch.full((1, q, NUM_ATTRS), -10.0)
    pattrs[0, 4, 3] = pattrs[0, 1, 7] = 10.0
    pred = {"logits": logits, "boxes": pboxes, "attrs": pattrs}
    parts, extra = det.layer_losses(pred, labels, boxes, attrs, torch.tensor([2]))
    assert calls == [((1, q, 3), [2])]
    assert float(extra["class_acc"]) == 1.0 and math.isclose(float(extra["iou"]), 1.0, rel_tol=1e-5)
    assert float(parts["box"]) < 1e-6 and float(parts["giou"]) < 1e-5 and float(parts["attr"]) < 1e-3
    assert float(parts["class"]) < 1e-3  # matched queries have their class, the others "no object"
    # The same predictions from other query slots: the matcher follows them (set prediction is order-free).
    swapped = {k: v[:, [0, 4, 2, 3, 1, 5]] for k, v in pred.items()}
    parts2, extra2 = det.layer_losses(swapped, labels, boxes, attrs, torch.tensor([2]))
    assert float(extra2["class_acc"]) == 1.0 and float(parts2["box"]) < 1e-6
    torch.testing.assert_close(parts2["class"], parts["class"])


def test_detection_forward_on_a_hand_made_batch(pretrainer):
    batch = hand_batch()
    ctx = StepContext(pretrainer.model, batch, torch.Generator().manual_seed(0))
    out = pretrainer.objectives["detection"](batch, ctx)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert set(out.metrics) == set(pretrainer.objectives["detection"].metric_names)
    assert 0.0 <= float(out.metrics["det_iou"]) <= 1.0 and 0.0 <= float(out.metrics["det_iou_chance"]) <= 1.0
    out.loss.backward()
    det = pretrainer.objectives["detection"]
    assert det.queries.grad is not None and det.class_head.weight.grad is not None
    assert pretrainer.model.decoder.layers[0].multihead_attn.in_proj_weight.grad is not None
    pretrainer.zero_grad()
    # aux loss: one set of losses per decoder layer
    assert len(det.predict(ctx.view("image_only", lambda: None))) == 2


def test_detection_without_objects_and_with_bad_labels(pretrainer):
    det = pretrainer.objectives["detection"]
    batch = hand_batch()
    batch["obj_labels"] = torch.full_like(batch["obj_labels"], -1)
    out = det(batch, StepContext(pretrainer.model, batch))
    assert torch.isfinite(out.loss) and set(out.metrics) == {"det_loss", "det_class_loss"}
    batch = hand_batch()
    batch["obj_labels"][0, 0] = NUM_CLASSES
    with pytest.raises(ValueError, match="num_classes=8"):
        det(batch, StepContext(pretrainer.model, batch))


def test_detection_reads_vocabulary_sizes_from_the_manifest_or_says_which_fields_to_set(tmp_path):
    recipe = e2e_recipe({"detection": {"decoder_layers": 1}}, data={"root": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="objectives.detection.num_classes and objectives.detection.num_attributes"):
        build_pretrainer(recipe)
    with pytest.raises(ConfigError, match="all 0"):
        build_pretrainer(e2e_recipe({"detection": {"cost_class": 0, "cost_bbox": 0, "cost_giou": 0, "num_classes": 8, "num_attributes": 10}}))


# --------------------------------------------------------------------------- captioning


def test_captioning_memory_never_sees_the_caption(pretrainer):
    cap = pretrainer.objectives["captioning"]
    pretrainer.eval()
    try:
        batch = hand_batch()
        ctx = StepContext(pretrainer.model, batch)
        out = cap(batch, ctx)
        assert set(out.metrics) == {"cap_loss", "cap_acc", "cap_chance"} and torch.isfinite(out.loss)
        memory = ctx.view("image_only", lambda: None)
        other = hand_batch(seed=0)
        other["text_ids"][:, 1:-2] = torch.randint(2000, 5000, other["text_ids"][:, 1:-2].shape)  # different captions
        ctx2 = StepContext(pretrainer.model, other)
        cap(other, ctx2)
        torch.testing.assert_close(ctx2.view("image_only", lambda: None).states, memory.states)
        assert memory.states.shape[0] == 2 and memory.text_len == 2  # one row per image: [CLS] [SEP] + cells
        # teacher forcing is causal: changing the caption's tail leaves earlier predictions alone
        ids = batch["text_ids"][:1]
        states = cap.decode(ids, None, memory.states[:1], memory.mask[:1])
        tail = ids.clone()
        tail[0, 4:] = 3000
        torch.testing.assert_close(cap.decode(tail, None, memory.states[:1], memory.mask[:1])[:, :4], states[:, :4])
    finally:
        pretrainer.train()


def test_captioning_label_smoothing_is_applied():
    torch.manual_seed(0)
    plain = build_pretrainer(e2e_recipe({"captioning": {"decoder_layers": 1, "label_smoothing": 0.0}})).eval()
    torch.manual_seed(0)
    smooth = build_pretrainer(e2e_recipe({"captioning": {"decoder_layers": 1, "label_smoothing": 0.1}})).eval()
    batch = hand_batch()
    a = plain(batch)[1]["cap_loss"]
    b = smooth(batch)[1]["cap_loss"]
    assert float(a) != float(b)


def test_beam_search_beats_greedy_on_a_trap_and_respects_special_tokens():
    # vocabulary: 0 pad, 1 bos, 2 eos, 3 "a", 4 "b", 5 banned
    table = {
        (): [0.0, 0.0, 0.0, 0.55, 0.45, 0.9],  # greedy takes "a" (5 is banned)...
        (3,): [0.0, 0.0, 0.1, 0.5, 0.4, 0.0],
        (4,): [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # ...but "b" then eos is far more likely
        (3, 3): [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        (3, 4): [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    }

    def step(prefix, source):
        rows = []
        for seq in prefix.tolist():
            probs = torch.tensor(table.get(tuple(seq[1:]), [0.0, 0.0, 1.0, 0.0, 0.0, 0.0])) + 1e-9
            rows.append((probs / probs.sum()).log())
        return torch.stack(rows)

    greedy = beam_search(step, rows=2, bos=1, eos=2, pad=0, max_len=5, beam=1, banned=(5,))
    beam = beam_search(step, rows=2, bos=1, eos=2, pad=0, max_len=5, beam=3, banned=(5,), length_penalty=0.0)
    assert greedy == [[3, 3], [3, 3]]
    assert beam == [[4], [4]]
    assert beam_search(step, rows=1, bos=1, eos=2, pad=0, max_len=2, beam=2) == [[5]]  # max_len cuts; 5 allowed here
    with pytest.raises(ValueError, match="beam"):
        beam_search(step, rows=1, bos=1, eos=2, pad=0, max_len=5, beam=0)


def test_greedy_and_beam_generation_give_valid_token_sequences(pretrainer):
    cap = pretrainer.objectives["captioning"]
    pretrainer.eval()
    try:
        batch = hand_batch(images=3)
        with torch.no_grad():
            feats = pretrainer.model.encode_images(batch["images"], batch["pixel_mask"])
            memory = image_only_memory(pretrainer.model, feats.feats, feats.grid_mask, cap.ids)
        vocab = pretrainer.model.vocab_size
        for beam in (1, 3):
            out = cap.generate(memory, beam=beam, max_len=8, banned=(MASK,))
            assert len(out) == 3
            for tokens in out:
                assert len(tokens) <= 7
                assert all(isinstance(t, int) and 0 <= t < vocab and t not in (CLS, SEP, PAD, MASK) for t in tokens)
        greedy = cap.generate(memory, beam=1, max_len=8)
        # greedy == step-by-step arg-max
        first = cap.logits(cap.decode(torch.tensor([[CLS]] * 3), None, memory.states, memory.mask)[:, -1])
        first[:, [PAD, CLS]] = float("-inf")
        expected = first.argmax(-1).tolist()
        assert [seq[0] if seq else SEP for seq in greedy] == expected
    finally:
        pretrainer.train()


# --------------------------------------------------------------------------- caption metric


def test_mention_accuracy_counts_only_shapes_and_colours_present():
    from vlptune.data.synth import vocabularies

    vocab = MentionVocab.from_manifest({"vocabularies": vocabularies()})
    red, blue, small = vocab.attributes.index("red"), vocab.attributes.index("blue"), vocab.attributes.index("small")
    circle, star = vocab.classes.index("circle"), vocab.classes.index("star")
    objects = [([circle, star], [[red, small], [blue]])] * 4
    captions = ["two red balls", "a blue star left of a red disc", "a green circle", "three shapes"]
    scores = mention_scores(vocab, captions, objects)
    assert scores["mention_accuracy"] == 0.75  # "green" is not in the image; "three shapes" mentions nothing
    assert scores["mention_rate"] == 0.75
    assert scores["shape_precision"] == 1.0 and math.isclose(scores["colour_precision"], 3 / 4)
    with pytest.raises(ConfigError, match="shape_synonyms"):
        MentionVocab.from_manifest({"vocabularies": {"classes": [], "attributes": []}})


def test_caption_command_is_defined():
    from vlptune.tasks.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["caption", "runs/x", "--beam", "3", "--split", "val", "--limit", "7"])
    assert (args.checkpoint, args.beam, args.split, args.limit) == ("runs/x", 3, "val", 7)
    with pytest.raises(SystemExit):
        parser.parse_args(["caption", "runs/x", "--beam", "0"])


# --------------------------------------------------------------------------- on the synthetic world


def world_recipe(root: Path, steps: int, **extra):
    spec = {
        "name": "e2e-world",
        "data": {
            "root": str(root),
            "synth": {"train": 48, "val": 8, "image_size": 64},
            "image_size": 64,
            "max_long_side": 96,
            "batch_images": 8,
            "hflip_prob": 0.0,
        },
        "model": {"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 32}, "fusion": {"layers": 2}},
        "objectives": {
            "detection": {"decoder_layers": 1, "num_queries": 8},
            "captioning": {"decoder_layers": 1},
        },
        "optim": {"warmup_steps": 5, "schedule": "constant", "transformer": {"lr": 5e-4}},
        "train": {"max_steps": steps, "eval_every": steps, "log_every": steps},
        "eval": {"max_images": 4, "loss_batches": 1},
        "resources": {"cpus_per_worker": 1},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value}
    return validate_recipe(spec, "e2e world recipe")


def test_caption_command_on_a_trained_checkpoint(tmp_path, capsys):
    from vlptune.tasks.caption import caption_checkpoint, format_report, run_caption
    from vlptune.train.loop import train_worker
    from vlptune.train.reporting import LocalReporter

    recipe = world_recipe(tmp_path / "world", steps=2, data={"synth": {"train": 8, "val": 4, "image_size": 64}, "batch_images": 4})
    result = train_worker(recipe, LocalReporter(quiet=True), tmp_path / "run", resume=False)
    assert result["checkpoint"]
    report = caption_checkpoint(tmp_path / "run", beam=2, limit=3, max_len=6)
    assert len(report.captions) == 3 and report.image_ids[0].startswith("synth-val-")
    assert {"mention_accuracy", "reference_mention_accuracy", "shuffled_mention_accuracy"} <= set(report.metrics)
    assert report.metrics["reference_mention_accuracy"] >= 0.5
    assert "mention_accuracy" in format_report(report)
    args = argparse.Namespace(
        checkpoint=result["checkpoint"], beam=1, split="val", limit=2, max_len=5, length_penalty=1.0, device="cpu", show=1, out=str(tmp_path / "caps.jsonl")
    )
    assert run_caption(args) == 0
    assert len((tmp_path / "caps.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        caption_checkpoint(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 6 minutes on a quiet 2-core machine; more when it is shared
def test_e2e_vlp_learns_on_the_synthetic_world(tmp_path):
    """A short CPU run: losses fall, captioning and detection beat their chance levels on held-out-free training batches."""
    from vlptune.data.dataset import build_loader
    from vlptune.data.prepare import ensure_data
    from vlptune.objectives.base import MetricMeter
    from vlptune.train.optim import build_optimizers

    steps = 240
    recipe = world_recipe(tmp_path / "world", steps)
    ensure_data(recipe)
    torch.manual_seed(0)
    pre = build_with_data(recipe).train()  # heads sized from the dataset, as the loop builds them
    optim = build_optimizers(pre, pre.model.backbone, recipe.optim, steps)
    loader = build_loader(recipe, train=True)
    gen = torch.Generator().manual_seed(0)
    history = []
    step = 0
    while step < steps:
        for batch in loader:
            loss, metrics = pre(batch, gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(optim.params()), 1.0)
            optim.step()
            optim.zero_grad()
            history.append({k: float(v) for k, v in metrics.items()})
            step += 1
            if step == steps:
                break
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    meter = MetricMeter(pre.metric_names)
    pre.eval()
    with torch.no_grad():
        for _i, batch in enumerate(build_loader(recipe, train=True)):
            meter.add(pre(batch, torch.Generator().manual_seed(1))[1])
    last = meter.means()
    print({k: round(v, 3) for k, v in first.items()}, {k: round(v, 3) for k, v in last.items()})
    assert last["cap_loss"] < 0.7 * first["cap_loss"] and last["det_loss"] < 0.8 * first["det_loss"]
    assert last["cap_acc"] > last["cap_chance"] + 0.15
    assert last["det_iou"] > last["det_iou_chance"] + 0.03

    # greedy captions of the (training) images name colours that are in them more often than other images' captions
    # do; shapes (12..16-pixel objects on a 2x2 grid) are not recognised yet in this budget (see docs/objectives.md)
    from vlptune.data.shards import read_manifest
    from vlptune.data.text import load_tokenizer

    vocab = MentionVocab.from_manifest(read_manifest(tmp_path / "world"))
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    cap = pre.objectives["captioning"]
    generated, references, objects = [], [], []
    with torch.no_grad():
        for batch in build_loader(recipe, train=True):
            feats = pre.model.encode_images(batch["images"], batch["pixel_mask"])
            memory = image_only_memory(pre.model, feats.feats, feats.grid_mask, cap.ids)
            generated += [tokenizer.decode(t) for t in cap.generate(memory, beam=1)]
            first_positive = [int((batch["pair_image"] == b).nonzero()[0]) for b in range(len(batch["image_ids"]))]
            references += [batch["captions"][r] for r in first_positive]
            for b in range(len(batch["image_ids"])):
                real = batch["obj_labels"][b] >= 0
                attrs = [torch.nonzero(a).flatten().tolist() for a in batch["obj_attrs"][b][real]]
                objects.append((batch["obj_labels"][b][real].tolist(), attrs))
    model_scores = mention_scores(vocab, generated, objects)
    shuffled = mention_scores(vocab, references[1:] + references[:1], objects)
    print("captions:", generated[:4], model_scores, shuffled)
    assert model_scores["colour_precision"] > shuffled["colour_precision"] + 0.15
