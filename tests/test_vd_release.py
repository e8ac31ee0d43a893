"""The SOHO release's visual-dictionary behaviours (model.vd.variant: release), each on its own, against hand-computed numbers.

The release code is researchmm/soho, SOHO/models/necks/utils.py (SOHO_Pre_VD) and necks.py
(SimpleVDforPreGate); the numbers below are computed by hand from its formulas, not by running it.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_visual_dictionary import VECTORS, as_grid, hand_vd
from vlptune.config import VDConfig
from vlptune.model.visual_dictionary import CellGate, VisualDictionary

EPS = 1e-5
G = 0.4  # the release's decay (set_decay_updates, the ramp, is defined there but never called)


def smoothed(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [(n + EPS) / (total + len(counts) * EPS) * total for n in counts]


def test_a_update_all_rewrites_every_code_unused_ones_become_zero():
    vd = hand_vd(momentum=G, laplace_eps=EPS, update_all=True)
    vd(as_grid(VECTORS))
    # counts n = (2, 1, 0), sums s = ((4, 0), (9, 1), 0); N = (1-g) n, S = (1-g) s (both start at 0)
    n = [0.6 * 2, 0.6 * 1, 0.0]
    tilde = smoothed(n)
    expected = [[0.6 * 4 / tilde[0], 0.0], [0.6 * 9 / tilde[1], 0.6 * 1 / tilde[1]], [0.0, 0.0]]
    assert vd.codes.flatten().tolist() == pytest.approx([v for row in expected for v in row], rel=1e-6)
    assert vd.codes[2].tolist() == [0.0, 0.0]  # never used: exactly 0 (the paper update keeps (0, 10))
    kept = hand_vd(momentum=G, laplace_eps=EPS)
    kept(as_grid(VECTORS))
    assert kept.codes[2].tolist() == [0.0, 10.0]
    # second step, only code 0 used: code 1 drifts (S and N decay by g, their ratio re-smoothed)
    vd(as_grid(torch.tensor([[1.0, 0.0]])))
    n2 = [G * n[0] + 0.6, G * n[1], 0.0]
    s1 = [G * 0.6 * 9, G * 0.6 * 1]
    t2 = smoothed(n2)
    assert vd.codes[1].tolist() == pytest.approx([s1[0] / t2[1], s1[1] / t2[1]], rel=1e-6)
    with pytest.raises(ValueError, match="laplace_eps"):
        VisualDictionary(size=3, dim=2, update_all=True)


def test_b_padded_cells_are_quantised_and_counted():
    feats = as_grid(torch.tensor([[1.0, 0.0], [3.0, 0.0], [9.0, 1.0]]))
    mask = torch.tensor([[[True, True, False]]])  # the third cell is padding
    paper = hand_vd(momentum=0.5)
    out = paper(feats, mask)
    assert out.feats[0, :, 0, 2].tolist() == [9.0, 1.0]  # padding keeps its raw feature
    assert paper.codes[1].tolist() == [10.0, 0.0]  # and does not move code 1
    release = hand_vd(momentum=0.5, quantise_padding=True)
    out = release(feats, mask)
    assert release.codes[1].tolist() == pytest.approx([0.5 * 10 + 0.5 * 9, 0.5 * 1])  # (9.5, 0.5): the padded cell updated it
    assert out.feats[0, :, 0, 2].tolist() == pytest.approx([9.5, 0.5])  # and is quantised to it
    assert out.codes[0, 0].tolist() == [0, 0, -1]  # still no MVM target on padding
    assert out.stats["codes_used"] == 2.0


def test_c_normal_init_keeps_the_noise():
    torch.manual_seed(7)
    expected = torch.randn(4, 3)
    torch.manual_seed(7)
    vd = VisualDictionary(size=4, dim=3, momentum=0.0, init="normal").train()
    assert bool(vd.initialised) and torch.equal(vd.codes, expected)
    x = torch.full((1, 3, 1, 1), 100.0)
    vd(x)  # momentum 0: the nearest code jumps to the feature, the others stay N(0, 1)
    j = int(((expected - 100.0) ** 2).sum(1).argmin())
    assert vd.codes[j].tolist() == [100.0] * 3
    assert torch.equal(vd.codes[[i for i in range(4) if i != j]], expected[[i for i in range(4) if i != j]])
    first = VisualDictionary(size=4, dim=3, momentum=0.0).train()
    first(x)
    assert float((first.codes - 100.0).abs().max()) < 5.0  # first_batch: every code starts at (noisy copies of) the batch's feature


def test_d_cell_gate_by_hand_and_its_gradient_into_the_raw_features():
    gate = CellGate(2)
    with torch.no_grad():
        gate.pos_line.weight.copy_(torch.eye(2))
        gate.pos_line.bias.zero_()
        gate.gate_fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))  # logit a = p_0, logit b = v_1
        gate.gate_fc.bias.zero_()
    raw = torch.tensor([[1.0, 2.0]], requires_grad=True)
    code = torch.tensor([[3.0, 4.0]])
    out = gate(raw + (code - raw).detach(), raw)
    a, b = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))  # softmax(3, 2)
    assert out.tolist()[0] == pytest.approx([a * 3 + b * 1, a * 4 + b * 2])
    out.sum().backward()
    # d/dv of a p + b v with p = v + const: a + b = 1 on each channel, plus (sum p - sum v) da/dv = 4 a b (+1 on v_0 via p_0, -1 on v_1)
    assert raw.grad.tolist()[0] == pytest.approx([1 + 4 * a * b, 1 - 4 * a * b])
    assert gate.last_share == pytest.approx(a)


def test_cell_gate_in_the_dictionary_and_the_release_preset():
    cfg = VDConfig(size=3, variant="release")
    assert (cfg.momentum, cfg.laplace_eps, cfg.update_all, cfg.quantise_padding, cfg.init, cfg.gate, cfg.gate_form) == (
        0.4,
        1e-5,
        True,
        True,
        "normal",
        True,
        "cell_softmax",
    )
    assert VDConfig(size=3, variant="release", quantise_padding=False).quantise_padding is False  # each behaviour on its own
    assert VDConfig(size=3).update_all is False and VDConfig(size=3).init == "first_batch"  # paper: nothing changes
    vd = VisualDictionary.from_config(cfg, dim=2)
    assert vd is not None and vd.cell_gate is not None and vd.gate_logit is None and vd.update_all and vd.quantise_padding
    x = torch.randn(2, 2, 2, 3, requires_grad=True)
    out = vd.train()(x, torch.ones(2, 2, 3, dtype=torch.bool))
    out.feats.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and "gate" in out.stats
    assert any(p.grad is not None for p in vd.cell_gate.parameters())
