"""Pretraining mixtures (data.sources): weighted, deterministic, rank-equal epochs; vlptune train on converted COCO + VG."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from convert_fixtures import GOOD_FILES, awkward_images, coco_official, visual_genome
from vlptune.config import load_recipe
from vlptune.data.convert.captioned import parse_coco_official, parse_pairs
from vlptune.data.convert.images import ImageOptions
from vlptune.data.convert.pipeline import ConvertOptions, convert
from vlptune.data.convert.vg import parse_vg
from vlptune.data.dataset import ObjectlessShardDataset, build_loader
from vlptune.data.mixture import MixtureDataset, check_vocabularies, source_counts
from vlptune.data.schema import DataError
from vlptune.search.layout import SearchError
from vlptune.search.preflight import prepare_recipes_data


class Fake:
    """A per-rank source: its items are (name, position)."""

    def __init__(self, name: str, n: int):
        self.name, self.n, self.epochs = name, n, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return (self.name, i)


def test_source_counts_follow_the_weights_and_sum_to_the_epoch():
    assert source_counts([8, 4], [1, 1]) == [6, 6]
    assert source_counts([8, 4], [3, 1]) == [9, 3]
    assert source_counts([5, 5, 5], [1, 1, 1]) == [5, 5, 5]
    assert sum(source_counts([7, 3, 1], [0.3, 2.0, 1.1])) == 11


def test_a_mixture_epoch_is_weighted_seeded_and_cycles_a_small_source():
    mix = MixtureDataset([Fake("coco", 8), Fake("vg", 4)], [1.0, 1.0], seed=3)
    items = [mix[i] for i in range(len(mix))]
    assert len(items) == 12 and Counter(n for n, _ in items) == {"coco": 6, "vg": 6}
    vg = Counter(i for n, i in items if n == "vg")
    assert sorted(vg) == [0, 1, 2, 3] and sorted(vg.values()) == [1, 1, 2, 2]  # 6 draws of 4: every one, then 2 of a fresh shuffle
    assert [mix[i] for i in range(12)] == [MixtureDataset([Fake("coco", 8), Fake("vg", 4)], [1.0, 1.0], seed=3)[i] for i in range(12)]  # seeded
    first = list(mix.index.tolist())
    mix.set_epoch(1)
    assert mix.index.tolist() != first and mix.sources[0].epochs == [0, 1]  # the sources re-shuffle their own rank share
    evaluation = MixtureDataset([Fake("coco", 3), Fake("vg", 2)], [5.0, 1.0], seed=0, train=False)
    assert [evaluation[i] for i in range(5)] == [("coco", 0), ("coco", 1), ("coco", 2), ("vg", 0), ("vg", 1)]


def test_sources_with_another_object_vocabulary_are_refused():
    check_vocabularies({"classes": ["dog"]}, {"coco": {"classes": []}}, "vg")  # no objects: mixes with anything
    with pytest.raises(DataError, match="'classes' vocabulary of 2 names that differs from data.root='vg'"):
        check_vocabularies({"classes": ["dog"]}, {"other": {"classes": ["cat", "dog"]}}, "vg")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("mix")
    small = ImageOptions(max_short_side=64, max_long_side=96)
    files, images = coco_official(base / "c")
    convert(parse_coco_official(files, images), ConvertOptions(out=base / "coco", images=small, shard_size=4, executor="inline", max_bad_fraction=0.6))
    p = visual_genome(base / "v")
    parsed = parse_vg(p["image_data"], p["regions"], p["objects"], p["images"], p["attributes"])
    convert(parsed, ConvertOptions(out=base / "vg", images=small, shard_size=4, executor="inline", max_bad_fraction=0.6))
    awkward_images(base / "w")
    (base / "w" / "pairs.tsv").write_text("".join(f"{n}\ta web photo of {n.split('.')[0]} on a table\n" for n in GOOD_FILES))
    convert(
        parse_pairs(base / "w" / "pairs.tsv", base / "w", "tsv", "train", "web"),
        ConvertOptions(out=base / "web", images=small, shard_size=4, executor="inline"),
    )
    return base


def _recipe_file(roots, tmp_path, **data):
    spec = {
        "name": "coco-vg-mixture",
        "data": {"root": str(roots / "coco"), "synthesize": False, "image_size": 64, "max_long_side": 96, "batch_images": 4, "max_text_len": 24, **data},
        "model": {"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 16}, "fusion": {"layers": 1}},
        "objectives": {"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}, "mvm": {"weight": 1.0}},
        "train": {"max_steps": 3, "eval_every": 3, "log_every": 1},
        "eval": {"max_images": 2, "loss_batches": 1, "captions_per_image": 2, "vd_picture_codes": 2},
        "resources": {"cpus_per_worker": 2},
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_loader_mixes_converted_coco_and_vg(roots, tmp_path):
    sources = [{"root": str(roots / "coco"), "weight": 1.0}, {"root": str(roots / "vg"), "weight": 3.0}]
    recipe = load_recipe(_recipe_file(roots, tmp_path, sources=sources))
    loader = build_loader(recipe, train=True)
    mix = loader.dataset
    assert isinstance(mix, MixtureDataset) and isinstance(mix.sources[1], ObjectlessShardDataset)  # COCO has no classes: VG's objects not read
    # train splits: COCO 6, VG 9 (8 + image 50, kept without --drop-coco-eval); 1:3 of 15 = 3.75 / 11.25 -> 4 / 11
    assert len(mix) == 6 + 9 and Counter(mix.source_of(i) for i in range(len(mix))) == {0: 4, 1: 11}
    ids = [mix[i]["image_id"] for i in range(len(mix))]
    assert sum(i.startswith("vg-") for i in ids) == 11 and all(i.startswith(("vg-", "coco-")) for i in ids)
    batch = next(iter(loader))
    assert batch["images"].shape[0] == 4
    val = build_loader(recipe, train=False)
    assert not isinstance(val.dataset, MixtureDataset)  # evaluation: data.root's val split
    missing = load_recipe(_recipe_file(roots, tmp_path, sources=[{"root": str(tmp_path / "nowhere")}]))
    with pytest.raises(DataError, match=r"data.sources\[0\].root .*nowhere.*vlptune data convert"):
        build_loader(missing, train=True)
    with pytest.raises(SearchError, match=r"data.sources\[0\].root .*nowhere"):  # a search refuses it before any trial starts
        prepare_recipes_data([missing])


@pytest.mark.slow  # 26 s each on 2 shared cores
@pytest.mark.parametrize("root", ["coco+vg", "vg", "web"])
def test_vlptune_train_runs_and_logs_on_converted_roots(roots, root, tmp_path, capsys):
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlptune.cli import main

    if root == "coco+vg":  # the light recipe's mixture: retrieval on COCO's converted val split
        data = {"sources": [{"root": str(roots / "coco"), "weight": 1.0}, {"root": str(roots / "vg"), "weight": 1.0}]}
    else:  # one root alone (VG with its objects and classes; a web TSV): train only, so evaluate on train
        data = {"root": str(roots / root), "val_split": "train"}
    out = tmp_path / "run"
    assert main(["train", str(_recipe_file(roots, tmp_path, **data)), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "stop reason: max_steps" in printed and "TR R@1" in printed
    acc = EventAccumulator(str(out))
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) and v > 0 for v in losses.values())


def test_each_rank_mixes_its_own_share_with_equal_lengths(roots, tmp_path):
    from vlptune.data.dataset import build_dataset

    sources = [{"root": str(roots / "coco"), "weight": 1.0}, {"root": str(roots / "vg"), "weight": 1.0}]
    recipe = load_recipe(_recipe_file(roots, tmp_path, sources=sources))
    ranks = [build_dataset(recipe, "train", roots / "coco", rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3 + 4  # COCO 6 -> 3 a rank, VG 9 -> 4 a rank (drop_last)
    shares = [set(ds.sources[i].image_ids) for ds in ranks for i in (0, 1)]
    assert not shares[0] & shares[2] and not shares[1] & shares[3]  # the ranks' records are disjoint, per source
    assert [ds.index.tolist() for ds in ranks][0] == build_dataset(recipe, "train", roots / "coco", rank=0, world_size=2).index.tolist()
