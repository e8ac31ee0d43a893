"""Bad data at train time: a shard error is one line naming the shard with exit 2, each shard's
checksum is checked once per run, corrupt records skipped are counted in the reports, TensorBoard,
the run summary and ``vlptune results``, and a run past ``data.max_skip_fraction`` stops with that reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import vlptune.data.shard_checks as shards_mod
from test_loop import loop_recipe
from test_promote import make_experiment
from vlptune.cli import main
from vlptune.data.dataset import ShardDataset
from vlptune.data.schema import TABLE_IMAGE_TEXT, DataError
from vlptune.data.shard_checks import SKIP_STOP_PREFIX, SKIPPED_KEY, read_checked_shard, skip_share_exceeded
from vlptune.data.shards import ShardWriter, read_manifest, read_table
from vlptune.search import results as res

TRAIN = {"max_steps": 2, "eval_every": 2, "log_every": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from vlptune.data.prepare import ensure_data

    root = tmp_path_factory.getbasetemp() / "synth-loop"  # test_loop's world (same recipe): built once per session
    ensure_data(loop_recipe(root))
    return root


def _copy(world: Path, dest: Path) -> tuple[Path, dict]:
    shutil.copytree(world, dest)
    manifest = read_manifest(dest)
    return dest, manifest["shards"][TABLE_IMAGE_TEXT]["train"][0]


def _train(tmp_path: Path, root: Path, *extra: str) -> int:
    recipe_file = tmp_path / f"{root.name}.yaml"
    recipe_file.write_text(yaml.safe_dump(loop_recipe(root, train=TRAIN).model_dump(mode="json")))
    return main(["train", str(recipe_file), "--out", str(tmp_path / f"run-{root.name}"), "--quiet", *extra])


def test_a_bad_shard_stops_vlptune_train_with_exit_2_naming_it(world, tmp_path, capsys):
    # a truncated shard (checksum off, so the Parquet reader meets it), a missing one, a changed one
    cases = {}
    trunc, entry = _copy(world, tmp_path / "trunc")
    shard = trunc / entry["path"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cases["trunc"] = (trunc, shard, ["-o", "data.verify_shards=false"], "not a readable Parquet file")
    missing, entry = _copy(world, tmp_path / "missing")
    (missing / entry["path"]).unlink()
    cases["missing"] = (missing, missing / entry["path"], [], "not found")
    changed, entry = _copy(world, tmp_path / "changed")
    manifest = read_manifest(changed)
    manifest["shards"][TABLE_IMAGE_TEXT]["train"][0]["sha256"] = "0" * 64  # as if the file changed after the manifest
    (changed / "manifest.json").write_text(json.dumps(manifest))
    cases["changed"] = (changed, changed / entry["path"], [], "checksum mismatch")
    for name, (root, path, extra, what) in cases.items():
        assert _train(tmp_path, root, *extra) == 2, name
        err = capsys.readouterr().err
        assert str(path) in err and what in err and f"vlptune data verify {root}" in err, (name, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)


def test_each_shard_checksum_is_checked_once_per_run(world, tmp_path, monkeypatch):
    root, entry = _copy(world, tmp_path / "once")
    hashed: list[Path] = []
    real = shards_mod.sha256_file
    monkeypatch.setattr(shards_mod, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    recipe = loop_recipe(root)
    ds = ShardDataset(recipe, "train", root=root)
    ds.set_epoch(1)
    ds.set_epoch(2)
    ShardDataset(recipe, "train", root=root)  # another loader of the same run (the same process)
    train_shards = [root / e["path"] for e in read_manifest(root)["shards"][TABLE_IMAGE_TEXT]["train"]]
    assert sorted(hashed) == sorted(train_shards)  # each once, over three epochs and two datasets
    assert ShardDataset(recipe.model_copy(update={"data": recipe.data.model_copy(update={"verify_shards": False})}), "train", root=root)
    assert len(hashed) == len(train_shards)  # data.verify_shards: false hashes nothing
    # a shard rewritten in place (another size) is checked again, and its mismatch named
    path = root / entry["path"]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match=rf"{path}: checksum mismatch.*vlptune data verify {root}"):
        read_checked_shard(path, TABLE_IMAGE_TEXT, root, entry["sha256"])
    assert hashed[-1] == path


def test_skip_share_rule():
    assert skip_share_exceeded(5, 95, 0.05, "d") is None  # exactly at the share: within
    reason = skip_share_exceeded(6, 94, 0.05, "d")
    assert reason is not None and reason.startswith(SKIP_STOP_PREFIX) and "6 of 100" in reason and "vlptune data verify d" in reason
    assert skip_share_exceeded(50, 49, 0.05, "d") is None  # fewer than MIN_RECORDS_FOR_SKIP_CHECK read: not judged yet
    assert skip_share_exceeded(99, 1, 1.0, "d") is None  # 1 = never


def _corrupt_copy(world: Path, dest: Path, bad: int) -> Path:
    """``world`` with the images of the first ``bad`` train records its first epoch reads broken."""
    manifest = read_manifest(world)
    records = read_table(world, TABLE_IMAGE_TEXT).to_pylist()
    first_read = ShardDataset(loop_recipe(world), "train", root=world).image_ids[:bad]  # the same order in the copy (same count, seed)
    for r in records:
        if r["image_id"] in first_read:
            r["image"] = b"\x89PNG garbage, not an image"
    with ShardWriter(dest, vocabularies=manifest["vocabularies"], created_by="test") as w:
        w.add_many(TABLE_IMAGE_TEXT, records)
    for extra in set(manifest) - set(read_manifest(dest)):  # similarity, synth settings: as in the source
        fresh = read_manifest(dest)
        fresh[extra] = manifest[extra]
        (dest / "manifest.json").write_text(json.dumps(fresh))
    return dest


@pytest.mark.slow  # two real training runs: ~20 s each on a busy 2-core machine
def test_skipped_records_are_reported_and_a_run_past_max_skip_fraction_stops(world, tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the first 2 records read are corrupt: the first step (4 images) skips them and takes the next ones
    root = _corrupt_copy(world, tmp_path / "corrupt", bad=2)
    monkeypatch.setattr(shards_mod, "MIN_RECORDS_FOR_SKIP_CHECK", 1)  # judged at the first evaluation of this tiny run
    assert _train(tmp_path, root, "-o", "data.max_skip_fraction=0.1", "-o", "train.max_steps=4") == 2
    out = capsys.readouterr().out
    assert "corrupt training records skipped: 2 (data.max_skip_fraction=0.1)" in out, out
    # 2 skipped of 2 + 8 used (2 steps of 4 images) = 20% > 10%: stopped at the first evaluation, not at step 4
    assert f"stop reason: {SKIP_STOP_PREFIX}2 of 10 training records" in out and "step 2;" in out, out
    run = tmp_path / f"run-{root.name}"
    events = EventAccumulator(str(run)).Reload()
    assert [e.value for e in events.Scalars(SKIPPED_KEY)] == [2.0]
    # within the share: the run goes on to the end, the count still reported
    assert _train(tmp_path, root, "-o", "data.max_skip_fraction=0.25", "--out", str(tmp_path / "within")) == 0
    out = capsys.readouterr().out
    assert "corrupt training records skipped: 2 (data.max_skip_fraction=0.25)" in out and "stop reason: max_steps" in out, out


def test_results_show_each_trials_skipped_records(tmp_path):
    exp = make_experiment(tmp_path)
    trial_dir = next(exp.glob("vlptune_trial_*"))
    lines = [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines()]
    for i, line in enumerate(lines):
        line[SKIPPED_KEY] = i + 3  # a running total
    (trial_dir / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    collected = res.collect(exp)
    skipped = {r.trial_id: r.skipped for r in collected.rows}
    tid = trial_dir.name.removeprefix("vlptune_trial_")
    assert skipped.pop(tid) == len(lines) + 2 and set(skipped.values()) == {None}
    header = res.format_table(collected).splitlines()[0].split()
    assert header[-1] == "skipped" and "skipped" in res.table_columns(collected)
    row = next(r for r in res.table_rows(collected) if r[0] == tid)
    assert row[-1] == len(lines) + 2
