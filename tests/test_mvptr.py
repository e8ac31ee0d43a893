"""MVPTR: the two-stage (uni-modal, then cross-modal) encoder, VSC, hard ITM negatives and WPG."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_recipe
from vlptune.config import ConfigError, FusionConfig, validate_recipe
from vlptune.model.fusion import FusionTransformer
from vlptune.objectives.base import Pretrainer, StepContext, build_pretrainer
from vlptune.objectives.vsc import (
    VSCHeads,
    batch_similarity,
    first_positive_rows,
    hard_negative_pairs,
    identical_rows,
    itm_negative_texts,
)
from vlptune.objectives.wpg import grounding_score, region_states

CLS, SEP, PAD = 101, 102, 0


pytestmark = pytest.mark.usefixtures("one_thread")


def mvptr_recipe(objectives=None, **sections):
    objectives = objectives or {"itm": {"weight": 1.0}, "vsc": {"weight": 1.0}, "wpg": {"weight": 1.0}}
    data = {"batch_images": 3, **sections.pop("data", {})}
    model = {"fusion": {"layers": 2, "unimodal_layers": 1}, **sections.pop("model", {})}
    return tiny_recipe("mvptr-tiny", objectives, data=data, model=model, **sections)


def hand_batch(images: int = 3, side: int = 64, text_len: int = 7, seed: int = 0) -> dict:
    """P=1, N=1 per image (rows 2b positive, 2b+1 negative); 2x2 grids; two noun phrases per caption."""
    g = torch.Generator().manual_seed(seed)
    pairs = 2 * images
    ids = torch.randint(2000, 5000, (pairs, text_len), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones(pairs, text_len, dtype=torch.int64)
    obj_masks = torch.zeros(images, 2, 2, 2, dtype=torch.bool)
    obj_masks[:, 0, 0, :] = True
    obj_masks[:, 1, 1, 1] = True
    labels = torch.tensor([[1, 2]] * images)
    spans = torch.tensor([[[1, 3], [4, 6]]] * pairs)
    spans[1, 1] = -1  # a caption with one phrase
    return {
        "images": torch.randn(images, 3, side, side, generator=g),
        "pixel_mask": torch.ones(images, side, side, dtype=torch.bool),
        "image_ids": [f"img{i}" for i in range(images)],
        "text_ids": ids,
        "text_mask": mask,
        "pair_image": torch.arange(images).repeat_interleave(2),
        "itm_labels": torch.tensor([1, 0] * images),
        "obj_masks": obj_masks,
        "obj_labels": labels,
        "phrase_spans": spans,
    }


@pytest.fixture(scope="module")
def pretrainer() -> Pretrainer:
    torch.manual_seed(0)
    return build_pretrainer(mvptr_recipe())


# --------------------------------------------------------------------------- two-stage encoder


@pytest.fixture(scope="module")
def two_stage() -> FusionTransformer:
    torch.manual_seed(0)
    return FusionTransformer(FusionConfig(init="minilm", layers=3, unimodal_layers=2, max_grid=8)).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unimodal_layers_equal_a_block_diagonal_attention_mask(attn):
    torch.manual_seed(0)
    fusion = FusionTransformer(FusionConfig(init="minilm", layers=3, unimodal_layers=2, max_grid=8), attn_implementation=attn).eval()
    ids = torch.randint(2000, 5000, (2, 5))
    ids[:, 0] = CLS
    text_mask = torch.ones(2, 5, dtype=torch.int64)
    text_mask[1, 3:] = 0
    grid = torch.randn(2, 384, 2, 3)
    grid_mask = torch.ones(2, 2, 3, dtype=torch.bool)
    grid_mask[1, :, 2] = False
    with torch.no_grad():
        out = fusion(ids, text_mask, grid, grid_mask)
        # reference: one sequence [text ; grid], a block-diagonal mask for the first 2 layers, full after
        hidden = torch.cat([fusion.embed_text(ids), fusion.embed_grid(grid)], dim=1)
        keys = torch.cat([text_mask.bool(), grid_mask.flatten(1)], dim=1)
        modality = torch.tensor([0] * 5 + [1] * 6)
        block = (modality[:, None] == modality[None, :])[None] & keys[:, None, :]  # [N,S,S]
        for i, layer in enumerate(fusion.layers):
            allowed = block if i < 2 else keys[:, None, :].expand_as(block)
            mask = allowed[:, None] if attn == "sdpa" else torch.zeros(allowed[:, None].shape).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
            hidden = layer(hidden, mask)
    real_text = text_mask.bool()
    torch.testing.assert_close(out.text_states[real_text], hidden[:, :5][real_text], atol=1e-4, rtol=1e-4)
    real_cells = grid_mask.flatten(1)
    torch.testing.assert_close(out.image_states[real_cells], hidden[:, 5:][real_cells], atol=1e-4, rtol=1e-4)


def test_text_states_of_the_unimodal_stage_ignore_the_image(two_stage):
    ids = torch.randint(2000, 5000, (2, 6))
    ids[:, 0] = CLS
    mask = torch.ones(2, 6, dtype=torch.int64)
    grid_a, grid_b = torch.randn(2, 384, 2, 2), torch.randn(2, 384, 2, 2)
    with torch.no_grad():
        ua = two_stage.encode_unimodal(ids, mask, grid_a)
        ub = two_stage.encode_unimodal(ids, mask, grid_b)
        fa = two_stage(ids, mask, grid_a, None)
        fb = two_stage(ids, mask, grid_b, None)
        text_only = two_stage.encode_unimodal(ids, mask, None)
    torch.testing.assert_close(ua.text_states, ub.text_states)  # the image never reaches the uni-modal text
    torch.testing.assert_close(ua.text_cls, text_only.text_cls)
    assert not torch.allclose(ua.image_emb, ub.image_emb)
    assert not torch.allclose(fa.text_states, fb.text_states)  # ...but the cross-modal layer mixes them
    assert ua.text_cls.shape == (2, 384) and ua.text_mean.shape == (2, 384) and text_only.image_emb.shape == (0, 384)


def test_unimodal_image_embedding_pools_real_cells_and_batches_are_independent(two_stage):
    grid = torch.randn(3, 384, 2, 3)
    grid_mask = torch.ones(3, 2, 3, dtype=torch.bool)
    grid_mask[2, :, 1:] = False
    ids = torch.randint(2000, 5000, (5, 4))  # 5 captions, 3 images
    with torch.no_grad():
        u = two_stage.encode_unimodal(ids, torch.ones(5, 4, dtype=torch.int64), grid, grid_mask)
        noisy = grid.clone()
        noisy[2, :, :, 1:] = 50.0  # padded cells of image 2
        v = two_stage.encode_unimodal(None, None, noisy, grid_mask)
    assert u.text_cls.shape == (5, 384) and u.image_emb.shape == (3, 384) and u.image_states.shape == (3, 6, 384)
    torch.testing.assert_close(v.image_emb, u.image_emb, atol=1e-5, rtol=1e-5)
    expected = u.image_states[2][grid_mask[2].flatten()].mean(0)
    torch.testing.assert_close(u.image_emb[2], expected)


def test_unimodal_split_is_validated():
    with pytest.raises(ValueError, match="model.fusion.unimodal_layers=2 must be below model.fusion.layers=2"):
        FusionTransformer(FusionConfig(init="minilm", layers=2, unimodal_layers=2))
    plain = FusionTransformer(FusionConfig(init="minilm", layers=1))
    with pytest.raises(ValueError, match="unimodal_layers > 0"):
        plain.encode_unimodal(torch.ones(1, 3, dtype=torch.long), None, None)
    with pytest.raises(ConfigError, match="objectives.vsc.weight=1.0 needs MVPTR's uni-modal stage"):
        build_pretrainer(mvptr_recipe({"vsc": {"weight": 1.0}}, model={"fusion": {"layers": 2, "unimodal_layers": 0}}))
    with pytest.raises(ConfigError, match="temperature"):
        mvptr_recipe({"vsc": {"temperature": 0.9}})


# --------------------------------------------------------------------------- VSC


def test_in_batch_set_and_identical_captions():
    pair_image = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 1, 0, 1, 0, 0, 0])  # image 2 has no positive
    images, rows = first_positive_rows(pair_image, labels)
    assert images.tolist() == [0, 1] and rows.tolist() == [1, 3]
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 5, 6, 102, 7], [101, 5, 9, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    same = identical_rows(ids, mask)
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]  # padding ignored


def test_vsc_on_a_hand_made_batch(pretrainer):
    model = pretrainer.model
    assert isinstance(model.vsc, VSCHeads)
    transformer = {id(p) for p in model.param_groups()["transformer"]}
    assert {id(p) for p in model.vsc.parameters()} <= transformer
    batch = hand_batch()
    batch["text_ids"][2] = batch["text_ids"][0]  # images 0 and 1 share a caption string
    ctx = StepContext(model, batch, torch.Generator().manual_seed(0))
    out = pretrainer.objectives["vsc"](batch, ctx)
    vsc = batch_similarity(batch, ctx)
    assert vsc.sim.shape == (3, 3) and vsc.images.tolist() == [0, 1, 2] and vsc.text_rows.tolist() == [0, 2, 4]
    assert vsc.positives.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert float(out.metrics["vsc_chance"]) == pytest.approx(5 / 9)
    assert torch.isfinite(out.loss) and 0.0 <= float(out.metrics["vsc_acc"]) <= 1.0
    out.loss.backward()
    assert model.vsc.temp.grad is not None and model.vsc.text_proj.weight.grad is not None
    assert model.fusion.layers[1].attention.self.query.weight.grad is None  # the cross-modal layer is not used
    assert model.fusion.layers[0].attention.self.query.weight.grad is not None
    pretrainer.zero_grad()
    with torch.no_grad():
        model.vsc.temp.fill_(5.0)
    assert float(model.vsc.temperature().detach()) == 0.5  # clamped to max_temperature


# --------------------------------------------------------------------------- hard negatives


def test_hard_negative_pairs_modes():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.3], [0.2, 0.9, 0.7, 0.6], [0.5, 0.4, 0.9, 0.45], [0.1, 0.2, 0.3, 0.9]])
    hard = hard_negative_pairs(sim, "hard", num=2)
    assert hard.tolist() == [[1, 3], [2, 3], [0, 3], [2, 1]]
    exclude = torch.eye(4, dtype=torch.bool)
    exclude[0, 1] = True  # e.g. an identical caption
    assert hard_negative_pairs(sim, "hard", exclude=exclude)[0].tolist() == [3]
    everything = torch.ones(4, 4, dtype=torch.bool)
    everything[1, 0] = False
    out = hard_negative_pairs(sim, "sampled", torch.Generator().manual_seed(0), num=2, exclude=everything)
    assert out[0].tolist() == [-1, -1] and out[1].tolist() == [0, -1]  # nothing (or one) left to take
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 2.0, 0.0, 1.0]])
    draws = torch.cat([hard_negative_pairs(logits, "sampled", g, exclude=torch.tensor([[True, False, False, False]])) for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 3000
    expected = torch.softmax(torch.tensor([2.0, 0.0, 1.0]), 0)
    assert freq[0] == 0 and torch.allclose(freq[1:], expected, atol=0.03)
    uniform = torch.cat([hard_negative_pairs(logits, "random", g) for _ in range(3000)])
    assert torch.allclose(torch.bincount(uniform.flatten(), minlength=4).float()[1:] / 3000, torch.full((3,), 1 / 3), atol=0.03)
    a = hard_negative_pairs(sim, "sampled", torch.Generator().manual_seed(5), num=3)
    b = hard_negative_pairs(sim, "sampled", torch.Generator().manual_seed(5), num=3)
    assert torch.equal(a, b) and all(len(set(r)) == 3 and i not in r for i, r in enumerate(a.tolist()))
    with pytest.raises(ValueError, match="mode"):
        hard_negative_pairs(sim, "hardest")


def test_itm_negative_texts_take_other_images_captions_by_similarity(pretrainer):
    batch = hand_batch()
    ctx = StepContext(pretrainer.model, batch, torch.Generator().manual_seed(0))
    vsc = batch_similarity(batch, ctx)
    ids, mask, replaced = itm_negative_texts(batch, ctx, "hard")
    assert replaced == 3
    positives = batch["itm_labels"] == 1
    assert torch.equal(ids[positives], batch["text_ids"][positives])
    sim = vsc.sim.detach().masked_fill(vsc.positives, float("-inf"))
    for image in range(3):
        row = 2 * image + 1  # the image's negative
        hardest = int(sim[image].argmax())
        assert torch.equal(ids[row], batch["text_ids"][2 * hardest])


# --------------------------------------------------------------------------- WPG


def test_grounding_score_is_mean_over_phrases_of_best_region():
    regions = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    region_ok = torch.tensor([[True, True, False]])
    phrases = torch.tensor([[[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]]])
    phrase_ok = torch.tensor([[True, True, False]])
    score, ok = grounding_score(phrases, phrase_ok, regions, region_ok)
    assert bool(ok[0]) and float(score[0]) == pytest.approx((1.0 + 2**-0.5) / 2)
    score, ok = grounding_score(phrases, torch.zeros(1, 3, dtype=torch.bool), regions, region_ok)
    assert not bool(ok[0]) and float(score[0]) == 0.0
    states = torch.arange(8.0).reshape(1, 4, 2)
    masks = torch.tensor([[[[True, True], [False, False]], [[False, False], [False, True]]]])
    pooled, valid = region_states(states, masks, torch.tensor([[3, -1]]), torch.ones(1, 2, 2, dtype=torch.bool))
    assert valid.tolist() == [[True, False]] and pooled[0, 0].tolist() == [1.0, 2.0]


def test_wpg_on_a_hand_made_batch(pretrainer, monkeypatch):
    wpg = pretrainer.objectives["wpg"]
    assert wpg.share_clean  # ITM keeps random negatives: the clean pass is shared
    batch = hand_batch()
    negatives = []
    original = wpg.negative_images

    def spy(images, num_images, generator):
        out = original(images, num_images, generator)
        negatives.append((images.clone(), out))
        return out

    monkeypatch.setattr(wpg, "negative_images", spy)
    ctx = StepContext(pretrainer.model, batch, torch.Generator().manual_seed(0))
    out = wpg(batch, ctx)
    assert set(out.metrics) == {"wpg_loss", "wpg_acc", "wpg_skipped"} and out.metrics["wpg_skipped"] == 0.0
    images, chosen = negatives[0]
    assert (images != chosen).all() and chosen.max() < 3
    assert float(out.loss.detach()) >= 0.0
    out.loss.backward()
    assert pretrainer.model.fusion.layers[1].attention.self.query.weight.grad is not None
    pretrainer.zero_grad()
    one = hand_batch(images=1)
    assert wpg(one, StepContext(pretrainer.model, one)).metrics == {"wpg_skipped": 1.0}


def test_pretrainer_step_with_every_mvptr_objective(pretrainer):
    loss, metrics = pretrainer(hand_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert {"vsc_loss", "vsc_acc", "wpg_loss", "itm_loss"} <= set(metrics)


# --------------------------------------------------------------------------- on the synthetic world


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 6 minutes on a quiet 2-core machine; more when it is shared
def test_mvptr_learns_on_the_synthetic_world(tmp_path):
    """A short CPU run: VSC and WPG losses fall and their accuracies beat chance on the training batches."""
    from vlptune.data.dataset import build_loader
    from vlptune.data.prepare import ensure_data
    from vlptune.objectives.base import MetricMeter
    from vlptune.train.optim import build_optimizers

    steps = 240
    recipe = validate_recipe(
        {
            "name": "mvptr-world",
            "data": {
                "root": str(tmp_path / "world"),
                "synth": {"train": 48, "val": 8, "image_size": 64},
                "image_size": 64,
                "max_long_side": 96,
                "batch_images": 8,
                "hflip_prob": 0.0,
            },
            "model": {"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 32}, "fusion": {"layers": 2, "unimodal_layers": 1}},
            "objectives": {"vsc": {"text_pooling": "mean"}, "wpg": {}},
            "optim": {"warmup_steps": 5, "schedule": "constant", "transformer": {"lr": 5e-4}},
            "train": {"max_steps": steps},
        },
        "mvptr world recipe",
    )
    ensure_data(recipe)
    torch.manual_seed(0)
    pre = build_pretrainer(recipe).train()
    optim = build_optimizers(pre, pre.model.backbone, recipe.optim, steps)
    gen = torch.Generator().manual_seed(0)
    history = []
    while len(history) < steps:
        for batch in build_loader(recipe, train=True):
            loss, metrics = pre(batch, gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(optim.params()), 1.0)
            optim.step()
            optim.zero_grad()
            history.append({k: float(v) for k, v in metrics.items()})
            if len(history) == steps:
                break
    first = {k: sum(h[k] for h in history[:10]) / 10 for k in history[0]}
    meter = MetricMeter(pre.metric_names)
    pre.eval()
    with torch.no_grad():
        for batch in build_loader(recipe, train=True):
            meter.add(pre(batch, torch.Generator().manual_seed(1))[1])
    last = meter.means()
    print({k: round(v, 3) for k, v in first.items()}, {k: round(v, 3) for k, v in last.items()})
    assert last["vsc_loss"] < first["vsc_loss"] - 0.3
    assert last["vsc_acc"] > last["vsc_chance"] + 0.2
    assert last["wpg_acc"] > 0.6


def test_itm_with_hard_negatives_from_vsc(monkeypatch):
    with pytest.raises(ConfigError, match="objectives.itm.negatives='hard'.*objectives.vsc"):
        build_pretrainer(mvptr_recipe({"itm": {"negatives": "hard"}}))
    torch.manual_seed(0)
    pre = build_pretrainer(mvptr_recipe({"itm": {"negatives": "sampled"}, "vsc": {}, "wpg": {}}))
    assert not pre.objectives["wpg"].share_clean  # ITM's pairs are no longer the clean ones
    batch = hand_batch()
    fused = []
    original = pre.model.fuse

    def spy(text_ids, text_mask, grid, grid_mask=None):
        fused.append(text_ids.clone())
        return original(text_ids, text_mask, grid, grid_mask)

    monkeypatch.setattr(pre.model, "fuse", spy)
    ctx = StepContext(pre.model, batch, torch.Generator().manual_seed(0))
    out = pre.objectives["itm"](batch, ctx)
    assert torch.isfinite(out.loss) and set(out.metrics) == {"itm_loss", "itm_acc"}
    assert "itm_sampled" in ctx._views and "clean" not in ctx._views
    itm_ids = fused[-1]
    positives = batch["itm_labels"] == 1
    assert torch.equal(itm_ids[positives], batch["text_ids"][positives])
    own_caption = {b: batch["text_ids"][2 * b] for b in range(3)}
    for b in range(3):  # each negative is another image's caption
        neg = itm_ids[2 * b + 1]
        assert any(torch.equal(neg, own_caption[o]) for o in range(3) if o != b)
    loss, metrics = pre(hand_batch(), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and {"itm_loss", "vsc_loss", "wpg_loss"} <= set(metrics)
