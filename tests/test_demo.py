"""The main job's first stages (`python -m vlptune.demo --no-search`): world, inspection, one batch,
each stage's line with its time, and the closing line with the disk used. The search, promotion and
importance stages are the library's, tested in test_search.py, test_promote.py and test_importance.py."""

from __future__ import annotations

import re

from vlptune import demo


def test_demo_without_search_runs_its_stages_and_says_how_long_each_took(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--no-search", "-o", "data.synth.train=16", "-o", "data.synth.val=8"]) == 0
    text = capsys.readouterr().out
    for stage in ("=== 1. synthetic world", "=== 2. inspect", "=== 3. one training batch of demo-light.yaml"):
        assert stage in text, stage
    assert len(re.findall(r"\[\d+s into the demo\]", text)) == 3
    assert len(re.findall(r"^\(stage took \d+s\)$", text, re.M)) == 3
    assert re.search(r"demo finished in \d+s; outputs under .* \(\d+ MB on disk\)", text), text[-300:]
    assert (out / "sample.png").is_file() and (out / "world" / "manifest.json").is_file()


def test_disk_usage_counts_every_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big").write_bytes(b"x" * 3_000_000)
    (tmp_path / "small").write_bytes(b"x" * 1_000)
    assert demo.disk_usage(tmp_path) == "3 MB on disk"
    with open(tmp_path / "a" / "huge", "wb") as f:
        f.truncate(200_000_000)  # sparse: its size counts, no disk is used
    assert demo.disk_usage(tmp_path) == "0.20 GB on disk"


def test_backbone_stage_pretrains_once_then_finds_it(tmp_path, capsys):
    out = tmp_path / "demo"
    small = ["data.synth.train=16", "data.synth.val=8", "model.backbone.pretrain_steps=3", "model.backbone.pretrain_batch_images=4"]
    root = demo.stage_world(demo.DEMO_RECIPE, out, small)
    demo.stage_backbone(demo.DEMO_RECIPE, root, small)
    first = capsys.readouterr().out
    assert "=== 4. pretrained backbone" in first and "pretraining the ResNet-18 x0.25 on the world's object labels (3 steps of 4 images)" in first
    assert re.search(r"backbone made in \d+ s: val label accuracy 0\.\d{3} against the prior's 0\.\d{3}", first), first
    assert re.search(r"^  pretraining step \d/3, ETA \d+s$", first, re.M), first  # progress while it trains (at most one line per 15 s)
    made = list((root / "backbones").iterdir())
    assert [p.name for p in made if not p.name.startswith(".")] == ["resnet18-w0.25-px96-steps3-b4-lr0.002-seed0"]
    demo.stage_backbone(demo.DEMO_RECIPE, root, small)  # a second demo on the same world reuses it
    assert "backbone already there" in capsys.readouterr().out
    demo.stage_backbone(demo.DEMO_RECIPE, root, [*small, "model.backbone.init=random"])  # a recipe without it: no stage
    assert capsys.readouterr().out == ""
