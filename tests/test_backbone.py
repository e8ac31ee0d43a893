"""ResNet backbone: architecture, grid geometry, freezing, checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from transformers import ResNetModel

from vlptune.grid import grid_shape, grid_stride
from vlptune.model.backbone import GridProjection, ResNetBackbone, grid_mask_from_pixels, resnet_config

TINY = {"depth": 18, "width_mult": 0.125}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is as fast, and immune to a busy second core (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bn_modules(backbone: ResNetBackbone) -> list[torch.nn.Module]:
    return [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_standard_architectures():
    c18 = resnet_config(18)
    assert (c18.layer_type, list(c18.depths), list(c18.hidden_sizes), c18.embedding_size) == ("basic", [2, 2, 2, 2], [64, 128, 256, 512], 64)
    c101 = resnet_config(101)
    assert (c101.layer_type, list(c101.depths), list(c101.hidden_sizes)) == ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048])
    assert list(resnet_config(152).depths) == [3, 8, 36, 3] and list(resnet_config(34).depths) == [3, 4, 6, 3]
    tiny = resnet_config(50, 0.125)
    assert list(tiny.hidden_sizes) == [32, 64, 128, 256] and tiny.embedding_size == 8
    with pytest.raises(ValueError, match="depth"):
        resnet_config(42)


@pytest.mark.parametrize("depth,width", [(18, 0.125), (50, 0.03125)])
def test_grid_shape_for_odd_sizes(depth, width):
    backbone = ResNetBackbone(depth=depth, width_mult=width).eval()
    projections = {pool: GridProjection(backbone.out_channels, 4, pool) for pool in (1, 2, 3)}
    for h, w in [(1, 1), (31, 33), (65, 97), (100, 37), (161, 95)]:
        with torch.no_grad():
            cnn = backbone(torch.randn(1, 3, h, w))
            assert tuple(cnn.shape[-2:]) == grid_shape(h, w, 32)
            for pool, proj in projections.items():
                out = proj(cnn)
                assert tuple(out.shape[-2:]) == grid_shape(h, w, grid_stride(pool)), (pool, h, w)
                assert out.shape[1] == 4


def test_grid_mask_from_pixel_mask():
    stride = grid_stride(2)  # 64
    pixel_mask = torch.zeros(2, 150, 200, dtype=torch.bool)
    pixel_mask[0, :150, :200] = True
    pixel_mask[1, :65, :64] = True  # 65 rows touch 2 cell rows, 64 cols exactly 1 cell column
    gm = grid_mask_from_pixels(pixel_mask, stride)
    assert tuple(gm.shape) == (2, *grid_shape(150, 200, stride)) == (2, 3, 4)
    assert gm[0].all()
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[:2, :1] = True
    assert torch.equal(gm[1], expected)


def test_frozen_bn_survives_train():
    backbone = ResNetBackbone(**TINY, frozen_bn=True)
    backbone.train()
    bns = bn_modules(backbone)
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    stats = [m.running_mean.clone() for m in bns]
    backbone(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.grad is not None for m in convs)


def test_frozen_stages():
    backbone = ResNetBackbone(**TINY, frozen_stages=2).train()
    stem, s1, s2, s3, s4 = backbone.stages
    for part in (stem, s1, s2):
        assert all(not p.requires_grad for p in part.parameters())
        assert all(not m.training for m in part.modules())
    for part in (s3, s4):
        assert all(p.requires_grad for p in part.parameters())
        assert all(m.training for m in part.modules())
    before = [m.running_mean.clone() for m in bn_modules(s1)]
    backbone(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bn_modules(s1), before))
    assert all(p.grad is None for p in s2.parameters())
    assert all(p.grad is not None for p in s3.parameters())


def test_freeze_schedule_blocks_grads_and_bn_updates():
    backbone = ResNetBackbone(**TINY)
    proj = GridProjection(backbone.out_channels, 8, 1)
    backbone.set_frozen(True)
    backbone.train()  # a later model.train() must not undo the freeze
    assert backbone.frozen and all(not m.training for m in backbone.modules() if m is not backbone)
    stats = [m.running_mean.clone() for m in bn_modules(backbone)]
    proj(backbone(torch.randn(2, 3, 64, 64))).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.requires_grad for p in backbone.parameters())  # optimiser / DDP coverage kept
    assert proj.conv.weight.grad is not None  # the projection keeps learning
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bn_modules(backbone), stats))
    backbone.set_frozen(False)
    assert all(m.training for m in bn_modules(backbone))
    proj(backbone(torch.randn(2, 3, 64, 64))).sum().backward()
    assert all(p.grad is not None for p in backbone.parameters())


def test_init_from_local_checkpoint(tmp_path):
    reference = ResNetModel(resnet_config(18, 0.125))
    reference.save_pretrained(tmp_path / "r18")
    loaded = ResNetBackbone(**TINY, init=str(tmp_path / "r18"))
    ref_state = reference.state_dict()
    for name, value in loaded.resnet.state_dict().items():
        assert torch.equal(value, ref_state[name]), name
    with pytest.raises(ValueError, match="width_mult"):
        ResNetBackbone(depth=18, width_mult=0.25, init=str(tmp_path / "r18"))
    with pytest.raises(ValueError, match="depth"):
        ResNetBackbone(depth=34, width_mult=0.125, init=str(tmp_path / "r18"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not hold a loadable HF ResNet"):
        ResNetBackbone(**TINY, init=str(tmp_path / "empty"))


def test_hub_name_offline_error_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as info:
        ResNetBackbone(depth=18, init="microsoft/resnet-18")
    msg = str(info.value)
    assert "model.backbone.init" in msg and "could not be loaded" in msg and "local directory" in msg
