"""Objectives: MVM masking, shapes and metrics on hand-made batches, views, refusals."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_recipe as shared_tiny_recipe
from vlptune.config import ConfigError
from vlptune.objectives.base import Pretrainer, StepContext, build_objectives, build_pretrainer
from vlptune.objectives.mlm import IGNORE_INDEX
from vlptune.objectives.mvm import choose_masks

CLS, SEP, MASK = 101, 102, 103  # BERT uncased special ids (MiniLM's vocabulary)


def tiny_recipe(objectives=None, **sections):
    return shared_tiny_recipe("tiny", objectives or {"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}, "mvm": {"weight": 1.0, "prob": 1.0}}, **sections)


def hand_batch(images: int = 2, side: int = 64, text_len: int = 6, seed: int = 0) -> dict:
    """P=1, N=1 per image: rows 2b (positive) and 2b+1 (negative, the next image's caption)."""
    g = torch.Generator().manual_seed(seed)
    pairs = 2 * images
    ids = torch.randint(2000, 5000, (pairs, text_len), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones(pairs, text_len, dtype=torch.int64)
    itm = torch.tensor([1, 0] * images)
    mlm_ids, mlm_labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    for r in range(0, pairs, 2):  # positives: mask tokens 1 and 2
        mlm_labels[r, 1:3] = ids[r, 1:3]
        mlm_ids[r, 1:3] = MASK
    pixel_mask = torch.ones(images, side, side, dtype=torch.bool)
    pixel_mask[1, :, side // 2 :] = False  # image 1 is half padding: half of its grid is invalid
    return {
        "images": torch.randn(images, 3, side, side, generator=g),
        "pixel_mask": pixel_mask,
        "text_ids": ids,
        "text_mask": mask,
        "pair_image": torch.arange(images).repeat_interleave(2),
        "itm_labels": itm,
        "mlm_ids": mlm_ids,
        "mlm_labels": mlm_labels,
    }


@pytest.fixture(scope="module")
def pretrainer() -> Pretrainer:
    torch.manual_seed(0)
    return build_pretrainer(tiny_recipe())


# --------------------------------------------------------------------------- MVM masking


def test_choose_masks_masks_all_cells_of_the_chosen_code_and_only_those():
    codes = torch.tensor(
        [
            [[0, 1, 1], [2, 1, 0], [3, 3, 1]],
            [[5, 5, 5], [5, 6, 5], [7, 7, 7]],
            [[4, 4, 9], [4, 9, 9], [9, 9, 9]],
        ]
    )
    valid = torch.ones_like(codes, dtype=torch.bool)
    valid[2, :, 2] = False  # code 9 also sits on invalid cells of row 2
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        selected, chosen, mask = choose_masks(codes, valid, 1.0, 10, g)
        assert selected.all()
        for r in range(3):
            present = set(codes[r][valid[r]].tolist())
            assert int(chosen[r]) in present
            expected = valid[r] & (codes[r] == chosen[r])
            assert torch.equal(mask[r], expected)
            assert not (mask[r] & ~valid[r]).any()


def test_choose_masks_is_uniform_over_codes_not_cells():
    codes = torch.zeros(1, 4, 4, dtype=torch.int64)
    codes[0, 0, 0] = 1  # code 0 covers 15 cells, code 1 one cell
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    picks = torch.stack([choose_masks(codes, valid, 1.0, 2, g)[1] for _ in range(2000)])
    share_of_rare = float((picks == 1).float().mean())
    assert 0.45 < share_of_rare < 0.55


def test_choose_masks_probability_and_empty_rows():
    codes = torch.randint(0, 8, (400, 3, 3), generator=torch.Generator().manual_seed(2))
    valid = torch.ones(400, 3, 3, dtype=torch.bool)
    valid[:10] = False  # rows without a valid cell are never selected
    selected, _, mask = choose_masks(codes, valid, 0.25, 8, torch.Generator().manual_seed(3))
    assert not selected[:10].any() and not mask[:10].any()
    assert 0.15 < float(selected[10:].float().mean()) < 0.35
    none, _, mask0 = choose_masks(codes, valid, 0.0, 8, torch.Generator().manual_seed(3))
    assert not none.any() and not mask0.any()


def test_mvm_replaces_exactly_the_masked_cells_with_its_mask_vector(pretrainer, monkeypatch):
    batch = hand_batch()
    pretrainer.eval()  # no VD update, no dropout: deterministic features
    seen: dict[str, torch.Tensor] = {}
    ctx = StepContext(pretrainer.model, batch, torch.Generator().manual_seed(0))
    original = ctx.fuse

    def spy(text_ids, text_mask, grid, grid_mask):
        seen["grid"], seen["text_ids"] = grid.detach().clone(), text_ids.clone()
        return original(text_ids, text_mask, grid, grid_mask)

    monkeypatch.setattr(ctx, "fuse", spy)
    mvm = pretrainer.objectives["mvm"]
    out = mvm(batch, ctx)
    assert torch.isfinite(out.loss) and out.metrics["mvm_skipped"] == 0.0
    positives = ctx.positive_rows
    images = ctx.images
    feats = images.feats[batch["pair_image"][positives]].detach()
    codes = images.codes[batch["pair_image"][positives]]
    valid = images.grid_mask[batch["pair_image"][positives]]
    grid = seen["grid"]
    assert grid.shape == feats.shape
    is_mask = (grid == mvm.mask_embedding.detach()[None, :, None, None]).all(dim=1)
    for r in range(grid.shape[0]):
        masked_codes = codes[r][is_mask[r]].unique()
        assert masked_codes.numel() == 1  # one index, ...
        assert torch.equal(is_mask[r], valid[r] & (codes[r] == masked_codes[0]))  # ... all its valid cells, only those
        assert torch.equal(grid[r][:, ~is_mask[r]], feats[r][:, ~is_mask[r]])
    assert torch.equal(seen["text_ids"], batch["text_ids"][positives])  # MVM sees clean text
    pretrainer.train()


# --------------------------------------------------------------------------- shapes & metrics


def test_objectives_on_a_hand_made_batch(pretrainer):
    batch = hand_batch()
    pretrainer.train()
    pretrainer.zero_grad(set_to_none=True)
    loss, metrics = pretrainer(batch, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    for key in ("mlm_loss", "mlm_acc", "itm_loss", "itm_acc", "mvm_loss", "mvm_acc", "mvm_chance", "loss", "vd_perplexity", "vd_codes_used"):
        assert key in metrics, key
    weighted = sum(float(metrics[f"{n}_loss"]) for n in ("mlm", "itm", "mvm"))
    assert float(loss.detach()) == pytest.approx(weighted, rel=1e-5)
    for key in ("mlm_acc", "itm_acc", "mvm_acc"):
        assert 0.0 <= float(metrics[key]) <= 1.0
    masked = batch["mlm_labels"][batch["mlm_labels"] != IGNORE_INDEX]  # positives' tokens 1 and 2, all distinct here
    top = max(int((masked == t).sum()) for t in masked.unique())
    assert float(metrics["mlm_chance"]) == pytest.approx(top / masked.numel())
    loss.backward()
    objectives = pretrainer.objectives
    for name, param in [
        ("mlm transform", objectives["mlm"].transform[0].weight),
        ("mlm bias", objectives["mlm"].bias),
        ("itm head", objectives["itm"].head[-1].weight),
        ("mvm decoder", objectives["mvm"].decoder.weight),
        ("mvm mask vector", objectives["mvm"].mask_embedding),
        ("backbone", next(pretrainer.model.backbone.parameters())),
    ]:
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    pretrainer.zero_grad(set_to_none=True)


def test_views_mlm_on_positives_with_masked_text_itm_on_all_pairs_with_clean_text(pretrainer, monkeypatch):
    batch = hand_batch()
    ctx = StepContext(pretrainer.model, batch, torch.Generator().manual_seed(0))
    calls: list[torch.Tensor] = []
    original = ctx.fuse
    monkeypatch.setattr(ctx, "fuse", lambda ids, mask, grid, gm: calls.append(ids.clone()) or original(ids, mask, grid, gm))
    pretrainer.objectives["mlm"](batch, ctx)
    pretrainer.objectives["itm"](batch, ctx)
    pretrainer.objectives["itm"](batch, ctx)  # a second user of the clean view: served from the cache
    assert len(calls) == 2
    positives = batch["itm_labels"] == 1
    assert torch.equal(calls[0], batch["mlm_ids"][positives])
    assert torch.equal(calls[1], batch["text_ids"])
    assert not (calls[1] == MASK).any()


def test_mlm_decoder_is_tied_to_the_word_embeddings(pretrainer):
    mlm = pretrainer.objectives["mlm"]
    assert mlm.decoder_weight is pretrainer.model.word_embeddings.weight
    names = list(pretrainer.state_dict())
    assert sum(1 for n in names if n.endswith("word_embeddings.weight")) == 1
    assert mlm.logits(torch.zeros(3, pretrainer.model.hidden_size)).shape == (3, pretrainer.model.vocab_size)


def test_mlm_without_masked_tokens_gives_zero_loss_and_no_metrics(pretrainer):
    batch = hand_batch()
    batch["mlm_labels"] = torch.full_like(batch["mlm_labels"], IGNORE_INDEX)
    out = pretrainer.objectives["mlm"](batch, StepContext(pretrainer.model, batch))
    assert float(out.loss) == 0.0 and out.metrics == {}


def test_itm_scores_every_pair_and_match_score_is_the_log_odds(pretrainer):
    batch = hand_batch()
    pretrainer.eval()
    ctx = StepContext(pretrainer.model, batch)
    itm = pretrainer.objectives["itm"]
    out = itm(batch, ctx)
    fused = ctx.view("clean", lambda: None)  # the cached clean pass
    logits = itm.pair_logits(fused, batch["text_mask"])
    assert logits.shape == (4, 2)
    assert torch.allclose(logits, itm.head(fused.cls))  # default pooling: the fused [CLS]
    expected = torch.nn.functional.cross_entropy(logits.float(), batch["itm_labels"])
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert torch.allclose(itm.match_score(fused, batch["text_mask"]), logits[:, 1] - logits[:, 0])
    pretrainer.train()


def test_itm_mean_and_product_pooling_read_only_real_tokens_and_cells():
    from types import SimpleNamespace

    from vlptune.objectives.itm import mean_state, product_state

    text = torch.tensor([[[1.0], [3.0], [100.0]]])  # third token is padding
    image = torch.tensor([[[5.0], [100.0]]])  # second cell is padding
    fused = SimpleNamespace(text_states=text, image_states=image, image_mask=torch.tensor([[True, False]]))
    assert mean_state(fused, torch.tensor([[1, 1, 0]])).item() == pytest.approx(3.0)
    assert product_state(fused, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0 * 5.0)  # mean text x mean image


# --------------------------------------------------------------------------- VD off


def test_mvm_with_the_vd_off_is_refused_before_the_model_is_built():
    recipe = tiny_recipe(model={"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 0}, "fusion": {"layers": 1}})
    with pytest.raises(ConfigError) as err:
        build_pretrainer(recipe)
    assert "objectives.mvm.weight" in str(err.value) and "model.vd.size" in str(err.value)


def test_mvm_skips_a_step_without_codes(pretrainer):
    batch = hand_batch()
    ctx = StepContext(pretrainer.model, batch)
    images = ctx.images
    images.codes = None  # as when the VD is off
    out = pretrainer.objectives["mvm"](batch, ctx)
    assert float(out.loss) == 0.0 and out.metrics == {"mvm_skipped": 1.0}


def test_no_active_objective_is_refused():
    recipe = tiny_recipe(objectives={"itm": {"weight": 0.0}})
    with pytest.raises(ConfigError, match="no objective has a weight"):
        build_objectives(recipe, model=None)
