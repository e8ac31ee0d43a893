"""train.compile: the compiled model gives the eager model's losses on a fixed batch, and its compilations are counted."""

from __future__ import annotations

import logging

import pytest
import torch

from test_objectives import hand_batch, tiny_recipe
from vlptune.objectives.base import build_pretrainer
from vlptune.train.compiling import CompileWatch


def forward(pretrainer, batch):
    with torch.no_grad():
        _, metrics = pretrainer(batch, torch.Generator().manual_seed(0))
    return {key: float(metrics[key]) for key in ("mlm_loss", "itm_loss", "mvm_loss", "loss")}


@pytest.fixture
def quiet_compile_trace():
    """Keep torch.compile's structured trace (graph dumps at DEBUG) out of pytest's log capture: formatting it
    for the capture handler made this test ten times slower; restored after the test."""
    trace = logging.getLogger("torch.__trace")
    propagate = trace.propagate
    trace.propagate = False
    yield
    trace.propagate = propagate


@pytest.mark.slow  # torch.compile (inductor, CPU) of the tiny model: measured 424 s in pytest, 197 s as a plain script, on the shared 2-core machine at load ~20
def test_compiled_model_gives_the_eager_losses_and_counts_recompiles(quiet_compile_trace):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_pretrainer(tiny_recipe()).eval()
    torch.manual_seed(0)
    compiled = build_pretrainer(tiny_recipe()).eval()
    watch = CompileWatch(compiled.model, enabled=True)
    assert watch.counts() == {"frames": 0, "recompiles": 0}
    assert set(compiled.state_dict()) == set(eager.state_dict())  # compiled in place: checkpoints keep their names

    batch = hand_batch(images=2)
    reference = forward(eager, batch)
    first = forward(compiled, batch)
    watch.step_done()
    for key, value in reference.items():
        assert first[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    frames = watch.counts()["frames"]
    assert frames > 0  # the backbone, the projection and the fusion compiled

    forward(compiled, hand_batch(images=2, seed=1))  # other values, the same shapes: no compilation
    assert watch.counts() == {"frames": frames, "recompiles": 0}
    other = forward(compiled, hand_batch(images=2, side=96))  # another image shape: compiled again, counted
    assert watch.counts()["recompiles"] > 0
    assert other == pytest.approx(forward(eager, hand_batch(images=2, side=96)), rel=1e-4, abs=1e-5)
    assert watch.summary()["compile_recompiles"] == watch.counts()["recompiles"]


def test_compile_off_compiles_nothing_and_reports_nothing():
    pretrainer = build_pretrainer(tiny_recipe())
    watch = CompileWatch(pretrainer.model, enabled=False)
    watch.step_done()
    assert watch.counts() == {} and watch.summary() == {}
    assert not hasattr(pretrainer.model.fusion, "_compiled_call_impl") or pretrainer.model.fusion._compiled_call_impl is None
