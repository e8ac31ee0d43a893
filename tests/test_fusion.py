"""Fusion Transformer (BERT over [text ; grid]) and the assembled VLPModel."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from vlptune.config import BackboneConfig, FusionConfig, ModelConfig, Recipe, VDConfig
from vlptune.data.text import minilm_path
from vlptune.grid import grid_shape, grid_stride
from vlptune.model.fusion import FusionTransformer, sine_table
from vlptune.model.vlp import VLPModel


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is as fast, and immune to a busy second core (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm2() -> FusionTransformer:
    return FusionTransformer(FusionConfig(init="minilm", layers=2, max_grid=8)).eval()


def test_truncation_and_width(minilm2):
    assert len(minilm2.layers) == 2 and minilm2.config.num_hidden_layers == 2
    assert minilm2.hidden_size == 384 and minilm2.vocab_size == 30522
    assert not hasattr(minilm2, "pooler")
    with pytest.raises(ValueError, match="only 6"):
        FusionTransformer(FusionConfig(init="minilm", layers=7))


def test_minilm_init_matches_package_weights():
    fusion = FusionTransformer(FusionConfig(init="minilm", layers=3))
    reference = load_file(f"{minilm_path()}/model.safetensors")
    reference = {k.removeprefix("bert."): v for k, v in reference.items()}
    state = fusion.state_dict()
    checked = 0
    for name, value in reference.items():
        if name.startswith("embeddings.") and name in state:
            assert torch.equal(state[name], value), name
            checked += 1
        elif name.startswith("encoder.layer."):
            index = int(name.split(".")[2])
            local = "layers." + name.split(".", 2)[2]
            if index < 3:
                assert torch.equal(state[local], value), name
                checked += 1
            else:
                assert local not in state
    assert checked == 5 + 3 * 16  # word/pos/type embeddings + LayerNorm w/b, 16 tensors per layer


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_does_not_change_real_positions(attn, minilm2):
    fusion = minilm2 if attn == "sdpa" else FusionTransformer(FusionConfig(init="minilm", layers=2, max_grid=8), attn_implementation="eager").eval()
    torch.manual_seed(0)
    d = fusion.hidden_size
    t_small, (gh_s, gw_s) = 5, (2, 3)
    t_big, (gh_b, gw_b) = 9, (4, 5)
    ids_small = torch.randint(1000, 2000, (1, t_small))
    ids_small[0, 0] = 101
    grid_small = torch.randn(1, d, gh_s, gw_s)
    alone = fusion(ids_small, torch.ones(1, t_small, dtype=torch.long), grid_small, torch.ones(1, gh_s, gw_s, dtype=torch.bool))

    # batch: row 0 = the same sample padded with garbage; row 1 = a longer text and a bigger image
    ids = torch.randint(1000, 2000, (2, t_big))
    ids[0, :t_small] = ids_small[0]
    text_mask = torch.ones(2, t_big, dtype=torch.long)
    text_mask[0, t_small:] = 0
    grid = torch.randn(2, d, gh_b, gw_b) * 50  # garbage in the padded cells
    grid[0, :, :gh_s, :gw_s] = grid_small[0]
    grid_mask = torch.ones(2, gh_b, gw_b, dtype=torch.bool)
    grid_mask[0] = False
    grid_mask[0, :gh_s, :gw_s] = True
    batched = fusion(ids, text_mask, grid, grid_mask)

    torch.testing.assert_close(batched.text_states[0, :t_small], alone.text_states[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched.cls[0], alone.cls[0], atol=1e-4, rtol=1e-4)
    cells = batched.image_states[0].view(gh_b, gw_b, d)[:gh_s, :gw_s].reshape(-1, d)
    torch.testing.assert_close(cells, alone.image_states[0], atol=1e-4, rtol=1e-4)
    assert batched.image_mask[0].sum() == gh_s * gw_s and batched.image_mask.shape == (2, gh_b * gw_b)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = FusionTransformer(FusionConfig(init="minilm", layers=2)).train()
    ckpt = FusionTransformer(FusionConfig(init="minilm", layers=2, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):  # dropout off so both passes are deterministic
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    ids = torch.randint(1000, 2000, (2, 6))
    grid = torch.randn(2, 384, 2, 2)
    grads = []
    for m in (plain, ckpt):
        g = grid.clone().requires_grad_(True)
        out = m(ids, torch.ones(2, 6), g, None)
        (out.text_states.pow(2).mean() + out.image_states.mean()).backward()
        grads.append((g.grad, m.layers[0].attention.self.query.weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_local_bert_directory_and_limits(tmp_path):
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(tmp_path / "tiny")
    fusion = FusionTransformer(FusionConfig(init=str(tmp_path / "tiny"), layers=2, max_grid=4))
    assert fusion.hidden_size == 32 and fusion.vocab_size == 100 and len(fusion.layers) == 2
    out = fusion(torch.randint(0, 100, (3, 7)), torch.ones(3, 7), torch.randn(3, 32, 4, 3), None)
    assert out.text_states.shape == (3, 7, 32) and out.image_states.shape == (3, 12, 32) and out.cls.shape == (3, 32)
    with pytest.raises(ValueError, match="max_grid"):
        fusion(torch.randint(0, 100, (1, 7)), torch.ones(1, 7), torch.randn(1, 32, 5, 1), None)
    with pytest.raises(ValueError, match="fusion width"):
        fusion(torch.randint(0, 100, (1, 7)), torch.ones(1, 7), torch.randn(1, 16, 2, 2), None)
    with pytest.raises(ValueError, match="unimodal_layers=2 must be below"):
        FusionTransformer(FusionConfig(init=str(tmp_path / "tiny"), layers=2), unimodal_layers=2)
    with pytest.raises(ValueError, match="could not be loaded"):
        FusionTransformer(FusionConfig(init="no-such-org/no-such-bert", layers=2))


def test_sine_positions_distinct():
    table = sine_table(16, 10)
    assert table.shape == (16, 10)
    assert torch.cdist(table, table).add(torch.eye(16) * 10).min() > 0.1


def test_grid_norm_init_text_copies_the_checkpoint_layernorm_and_matches_the_text_scale():
    unit = FusionTransformer(FusionConfig(init="minilm", layers=1, max_grid=8)).eval()
    text = FusionTransformer(FusionConfig(init="minilm", layers=1, max_grid=8, grid_norm_init="text")).eval()
    assert torch.equal(unit.grid_norm.weight, torch.ones(unit.hidden_size)) and torch.equal(unit.grid_norm.bias, torch.zeros(unit.hidden_size))
    reference = text.embeddings.LayerNorm
    assert torch.equal(text.grid_norm.weight, reference.weight) and torch.equal(text.grid_norm.bias, reference.bias)
    assert text.grid_norm.weight.data_ptr() != reference.weight.data_ptr()  # a copy: each trains on its own
    torch.manual_seed(0)
    grid = torch.randn(2, text.hidden_size, 3, 4) * 10
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        text_norm = text.embed_text(ids).norm(dim=-1).mean()
        unit_ratio = unit.embed_grid(grid).norm(dim=-1).mean() / text_norm
        text_ratio = text.embed_grid(grid).norm(dim=-1).mean() / text_norm
    # MiniLM's embedding LayerNorm has weights of mean |w| ~0.6: unit-weight grid tokens start ~2x larger than
    # words (measured 2.3 here, 2.0 on demo-light batches), copied ones near the words' scale (1.4 here, 1.2 there)
    assert unit_ratio > 1.8 and 0.7 < text_ratio < 1.6 and text_ratio < 0.7 * unit_ratio, (unit_ratio, text_ratio)


# --------------------------------------------------------------------- VLPModel


def tiny_model_config(vd_size: int = 16) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(depth=18, width_mult=0.125, pool=1),
        vd=VDConfig(size=vd_size, momentum=0.9),
        fusion=FusionConfig(init="minilm", layers=2),
    )


def test_vlp_model_contract():
    torch.manual_seed(0)
    model = VLPModel(tiny_model_config()).train()
    assert model.hidden_size == 384 and model.vocab_size == 30522
    assert model.word_embeddings is model.fusion.embeddings.word_embeddings
    images = torch.randn(2, 3, 70, 100)
    pixel_mask = torch.zeros(2, 70, 100, dtype=torch.bool)
    pixel_mask[0] = True
    pixel_mask[1, :40, :33] = True
    feats = model.encode_images(images, pixel_mask)
    gh, gw = grid_shape(70, 100, grid_stride(1))
    assert feats.feats.shape == feats.raw.shape == (2, 384, gh, gw)
    assert feats.grid_mask.shape == (2, gh, gw) and feats.grid_mask[1].sum() == 2 * 2
    assert feats.codes.dtype == torch.int64 and (feats.codes[~feats.grid_mask] == -1).all()
    assert set(feats.vd_stats) >= {"perplexity", "codes_used", "dead_codes"}
    assert all(isinstance(v, float) for v in feats.vd_stats.values())
    pair = torch.tensor([0, 0, 1, 1])
    ids = torch.randint(1000, 2000, (4, 6))
    out = model.fuse(ids, torch.ones(4, 6, dtype=torch.long), feats.feats[pair], feats.grid_mask[pair])
    assert out.text_states.shape == (4, 6, 384) and out.image_states.shape == (4, gh * gw, 384) and out.cls.shape == (4, 384)
    out.cls.sum().backward()
    groups = model.param_groups()
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.backbone.parameters()}
    transformer = {id(p) for p in groups["transformer"]}
    assert {id(p) for p in model.proj.parameters()} <= transformer
    assert transformer.isdisjoint(id(p) for p in groups["backbone"])
    assert len(transformer) + len(groups["backbone"]) == len([p for p in model.parameters() if p.requires_grad])
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_vlp_model_without_vd_and_frozen_backbone():
    recipe = Recipe(model=tiny_model_config(vd_size=0))
    model = VLPModel(recipe).train()
    assert model.vd is None
    model.set_backbone_frozen(True)
    model.train()
    assert model.backbone_frozen
    feats = model.encode_images(torch.randn(1, 3, 64, 64), None)
    assert feats.codes is None and feats.vd_stats == {} and feats.feats is feats.raw
    out = model.fuse(torch.randint(1000, 2000, (1, 4)), torch.ones(1, 4), feats.feats, feats.grid_mask)
    out.cls.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.proj.conv.weight.grad is not None
