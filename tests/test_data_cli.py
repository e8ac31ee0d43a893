"""`vlptune data synth | inspect | verify` through `add_commands` on a stand-alone parser."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from vlptune.data import shards
from vlptune.data.cli import add_commands
from vlptune.data.schema import TABLE_IMAGE_TEXT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlptune")
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "world"
    rc = run(
        ["data", "synth", "--out", str(root), "--train", "12", "--val", "6", "--test", "4", "--image-size", "64", "--seed", "1", "--shard-size", "5", "--quiet"]
    )
    assert rc == 0
    return root


def test_synth_prints_counts_and_speed(tmp_path, capsys):
    out = tmp_path / "w"
    rc = run(
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--train",
            "5",
            "--val",
            "3",
            "--image-size",
            "48",
            "--seed",
            "2",
            "--captions-per-image",
            "3",
            "--roi-feature-dim",
            "8",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    text = captured.out
    assert f"wrote {out}" in text
    line = next(l for l in text.splitlines() if l.strip().startswith("image_text"))
    assert line.split()[1:] == ["5", "3"]
    assert "8 images in" in text and "images/s" in text and "cache hit rate" in text
    assert "train: 5/5 images" in captured.err  # progress
    manifest = shards.read_manifest(out)
    assert manifest["vocabularies"]["roi_feature_dim"] == 8
    rec = next(shards.iter_records(out, TABLE_IMAGE_TEXT, "train"))
    assert len(rec["captions"]) == 3 and len(rec["objects"][0]["roi_feature"]) == 8
    assert min(rec["width"], rec["height"]) == 48


def test_inspect_reports_counts_check_and_sample(world, capsys):
    rc = run(["data", "inspect", str(world), "--split", "val", "--index", "5"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "manifest check: OK" in text
    assert "sample: split val, index 5: synth-val-0000005" in text
    row = next(l for l in text.splitlines() if l.strip().startswith("image_text"))
    assert row.split()[1:4] == ["12", "6", "4"]
    rec = list(shards.iter_records(world, TABLE_IMAGE_TEXT, "val"))[5]
    for cap in rec["captions"]:
        assert cap in text
    for phrase in rec["phrases"][0]:
        assert f"[{phrase['text']}]@{phrase['start']}:{phrase['end']}" in text
    assert f"{rec['objects'][0]['name']} (" in text
    assert "vqa: " in text and "ve: " in text and "nlvr2: " in text


def test_inspect_image_writes_a_picture(world, tmp_path, capsys):
    png = tmp_path / "pics" / "sample.png"
    rc = run(["data", "inspect", str(world), "--image", str(png)])
    assert rc == 0
    assert f"picture written to {png}" in capsys.readouterr().out
    rec = next(shards.iter_records(world, TABLE_IMAGE_TEXT, "train"))
    with Image.open(png) as im:
        assert im.format == "PNG"
        # image and segmentation side by side, upscaled, captions below
        assert im.width > 2 * rec["width"] and im.height > rec["height"] * 4
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 10


def test_inspect_flags_a_corrupted_shard(world, tmp_path, capsys):
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(world, copy)
    victim = shards.list_shards(copy, "vqa", "train")[0]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0x55
    victim.write_bytes(bytes(data))
    assert run(["data", "inspect", str(copy)]) == 1
    text = capsys.readouterr().out
    assert "manifest check: FAILED" in text and f"{victim}: checksum mismatch" in text
    assert run(["data", "verify", str(copy)]) == 1
    assert f"{victim}: checksum mismatch" in capsys.readouterr().out
    assert run(["data", "verify", str(world)]) == 0
    assert "OK" in capsys.readouterr().out


def test_inspect_bad_index_split_and_dir(world, tmp_path, capsys):
    assert run(["data", "inspect", str(world), "--split", "test", "--index", "4"]) == 2
    assert "index 4 is out of range for split 'test' (4 image_text records)" in capsys.readouterr().out
    assert run(["data", "inspect", str(world), "--split", "dev"]) == 2
    assert "split 'dev' has no image_text records" in capsys.readouterr().out
    assert run(["data", "inspect", str(tmp_path / "missing")]) == 1
    assert "manifest not found" in capsys.readouterr().out


def test_synth_refuses_non_empty_dir_and_bad_numbers(world, capsys):
    assert run(["data", "synth", "--out", str(world), "--train", "2", "--val", "0", "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(["data", "synth", "--out", "x", "--train", "-1", "--val", "0"])
    assert exc.value.code == 2
    assert "must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["data", "synth", "--out", "x", "--train", "1", "--val", "0", "--image-size", "8"])
    assert "must be >= 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(["data"])
    assert exc.value.code == 2
