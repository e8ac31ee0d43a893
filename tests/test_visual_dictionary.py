"""Visual dictionary: assignment, moving-average update, straight-through gradient, DDP statistics."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlptune.config import VDConfig
from vlptune.model.visual_dictionary import VisualDictionary, perplexity


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is as fast, and immune to a busy second core (OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def as_grid(vectors: torch.Tensor) -> torch.Tensor:
    """[N,D] -> [1,D,1,N] (one image, a 1 x N grid)."""
    return vectors.t().unsqueeze(0).unsqueeze(2).contiguous()


def hand_vd(momentum: float = 0.5, **kw) -> VisualDictionary:
    vd = VisualDictionary(size=3, dim=2, momentum=momentum, **kw)
    vd.init_codes(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    return vd.train()


VECTORS = torch.tensor([[1.0, 0.0], [3.0, 0.0], [9.0, 1.0]])  # -> codes 0, 0, 1; code 2 receives nothing


def test_update_matches_hand_computation():
    vd = hand_vd(momentum=0.5)
    out = vd(as_grid(VECTORS))
    assert out.codes.flatten().tolist() == [0, 0, 1]
    # d0 = 0.5*[0,0] + 0.5*mean([1,0],[3,0]) = [1,0]; d1 = 0.5*[10,0] + 0.5*[9,1] = [9.5,0.5]; d2 untouched
    expected = torch.tensor([[1.0, 0.0], [9.5, 0.5], [0.0, 10.0]])
    torch.testing.assert_close(vd.codes, expected)
    # the output is the (updated) code of each vector
    torch.testing.assert_close(out.feats[0, :, 0, :].t(), expected[[0, 0, 1]])
    assert vd.idle.tolist() == [0, 0, 1]
    assert int(vd.updates) == 1
    assert out.stats["codes_used"] == 2.0
    # usage 2/3, 1/3 -> perplexity exp(H)
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert out.stats["perplexity"] == pytest.approx(math.exp(h), rel=1e-5)


def test_only_codes_that_received_features_move():
    torch.manual_seed(0)
    vd = VisualDictionary(size=16, dim=8, momentum=0.9)
    vd.init_codes(torch.randn(16, 8) * 5)
    before = vd.codes.clone()
    feats = vd.codes[[2, 5]].repeat(3, 1) + 0.1 * torch.randn(6, 8)  # close to codes 2 and 5 only
    vd.train()(as_grid(feats))
    moved = (vd.codes != before).any(dim=1)
    assert moved.nonzero().flatten().tolist() == [2, 5]


def test_laplace_update_matches_hand_computation():
    eps = 0.1
    vd = hand_vd(momentum=0.5, laplace_eps=eps)
    vd(as_grid(VECTORS))
    # N = 0.5*[2,1,0] = [1, .5, 0]; S = 0.5*sums; smoothed N~ = (N+eps)/(sum N + 3 eps) * sum N
    n = torch.tensor([1.0, 0.5, 0.0])
    s = 0.5 * torch.tensor([[4.0, 0.0], [9.0, 1.0], [0.0, 0.0]])
    smoothed = (n + eps) / (n.sum() + 3 * eps) * n.sum()
    expected = s / smoothed.unsqueeze(1)
    expected[2] = torch.tensor([0.0, 10.0])  # unused code untouched
    torch.testing.assert_close(vd.codes, expected)


def test_straight_through_gradient():
    torch.manual_seed(0)
    vd = VisualDictionary(size=4, dim=3, momentum=0.5).train()
    v = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = vd(v)
    out.feats.retain_grad()
    loss = (out.feats**3).sum() + out.feats.sin().sum()
    loss.backward()
    assert v.grad is not None
    torch.testing.assert_close(v.grad, out.feats.grad)
    # forward value is the code, not v
    codes = out.codes.flatten()
    torch.testing.assert_close(out.feats.permute(0, 2, 3, 1).reshape(-1, 3), vd.codes[codes])


def test_eval_mode_does_not_update_or_initialise():
    vd = VisualDictionary(size=4, dim=2, momentum=0.5).eval()
    state = {k: v.clone() for k, v in vd.state_dict().items()}
    vd(as_grid(torch.randn(5, 2)))
    for k, v in vd.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not bool(vd.initialised)
    trained = hand_vd(momentum=0.5).eval()
    before = trained.codes.clone()
    out = trained(as_grid(VECTORS))
    assert torch.equal(trained.codes, before)
    assert int(trained.updates) == 0
    assert out.stats["codes_used"] == 2.0


def test_padded_cells_ignored():
    vd = hand_vd(momentum=0.5)
    feats = as_grid(torch.cat([VECTORS, torch.tensor([[0.0, 9.0], [100.0, 100.0]])]))  # last two are padding
    mask = torch.tensor([[[True, True, True, False, False]]])
    out = vd(feats, mask)
    torch.testing.assert_close(vd.codes, torch.tensor([[1.0, 0.0], [9.5, 0.5], [0.0, 10.0]]))
    assert out.codes.flatten().tolist() == [0, 0, 1, -1, -1]
    torch.testing.assert_close(out.feats[..., 3:], feats[..., 3:])  # padded cells pass through raw


def test_first_training_batch_initialises_codes_from_features():
    torch.manual_seed(0)
    vd = VisualDictionary(size=4, dim=3, momentum=0.0).train()
    feats = torch.randn(10, 3) * 7 + 3
    vd(as_grid(feats))
    assert bool(vd.initialised)
    # momentum 0: every used code is now the mean of its features; every code lies in the data's range
    assert vd.codes.min() >= feats.min() - 1e-4 and vd.codes.max() <= feats.max() + 1e-4
    # fewer features than codes: with replacement plus noise, codes still distinct
    small = VisualDictionary(size=8, dim=3).train()
    small(as_grid(torch.randn(3, 3)))
    assert torch.unique(small.codes, dim=0).shape[0] == 8


def test_dead_codes_are_counted_and_reseeded():
    vd = hand_vd(momentum=0.5, reseed_dead=True, reseed_after=2)
    out1 = vd(as_grid(VECTORS))
    assert out1.stats["dead_codes"] == 0.0 and out1.stats["reseeded"] == 0.0
    out2 = vd(as_grid(VECTORS))  # code 2 idle for 2 updates -> re-seeded from a current feature
    assert out2.stats["reseeded"] == 1.0
    assert any(torch.allclose(vd.codes[2], v) for v in VECTORS)
    assert int(vd.idle[2]) == 0
    plain = hand_vd(momentum=0.5, reseed_after=2)  # reseeding off: only counted
    plain(as_grid(VECTORS))
    assert plain(as_grid(VECTORS)).stats["dead_codes"] == 1.0
    assert torch.equal(plain.codes[2], torch.tensor([0.0, 10.0]))


def test_gate_mixes_quantized_and_raw():
    vd = hand_vd(momentum=0.5, gate=True)
    v = as_grid(VECTORS).requires_grad_(True)
    out = vd(v)
    codes = vd.codes[[0, 0, 1]]
    torch.testing.assert_close(out.feats[0, :, 0, :].t(), 0.5 * codes + 0.5 * VECTORS)  # sigmoid(0) = 0.5
    out.feats.sum().backward()
    assert vd.gate_logit.grad is not None and vd.gate_logit.grad.abs().sum() > 0
    assert out.stats["gate"] == pytest.approx(0.5)


def test_from_config_and_perplexity():
    assert VisualDictionary.from_config(VDConfig(size=0), dim=8) is None
    vd = VisualDictionary.from_config(VDConfig(size=32, momentum=0.4, laplace_eps=1e-5, gate=True), dim=8)
    assert vd.size == 32 and vd.momentum == 0.4 and vd.gate_logit is not None and "ema_count" in vd.state_dict()
    assert perplexity(torch.tensor([5.0, 5.0, 0.0])) == pytest.approx(2.0)
    assert perplexity(torch.tensor([0.0, 7.0])) == pytest.approx(1.0)


# ------------------------------------------------------------------ DDP (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_FEATS = [
    torch.tensor([[1.0, 0.0], [3.0, 0.0]]),  # rank 0: both near code 0
    torch.tensor([[9.0, 1.0], [2.0, 0.0], [11.0, -1.0]]),  # rank 1: codes 1, 0, 1
]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        vd = hand_vd(momentum=0.5, reseed_dead=True, reseed_after=2, seed=rank)  # different seeds: reseed must still agree
        first = vd(as_grid(RANK_FEATS[rank]))
        after_first = vd.codes.clone()
        vd(as_grid(RANK_FEATS[rank]))  # code 2 dies -> re-seeded on rank 0 and broadcast
        fresh = VisualDictionary(size=3, dim=2, seed=rank).train()  # first-batch init must agree too
        fresh(as_grid(RANK_FEATS[rank] + rank))
        torch.save(
            {"after_first": after_first, "codes": vd.codes, "fresh": fresh.codes, "used": first.stats["codes_used"]},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_sums_statistics_over_ranks(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # one process on all features gives the same update: code 0 mean([1,0],[3,0],[2,0]) = [2,0]; code 1 mean = [10,0]
    single = hand_vd(momentum=0.5)
    single(as_grid(torch.cat(RANK_FEATS)))
    expected = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    torch.testing.assert_close(single.codes, expected)
    torch.testing.assert_close(r0["after_first"], expected)
    torch.testing.assert_close(r1["after_first"], expected)
    assert r0["used"] == r1["used"] == 2.0  # global usage, not the rank's own
    torch.testing.assert_close(r0["codes"], r1["codes"])  # re-seeding synchronised
    torch.testing.assert_close(r0["fresh"], r1["fresh"])  # initialisation synchronised
