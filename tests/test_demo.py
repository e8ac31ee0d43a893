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
