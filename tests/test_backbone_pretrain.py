"""``vlptune backbone pretrain``: the classification objective, the rewritten recipe, save_pretrained and loading by directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_loop import loop_recipe
from vlptune.cli import main
from vlptune.config import ConfigError, dump_recipe
from vlptune.model.backbone import ResNetBackbone
from vlptune.model.vlp import VLPModel
from vlptune.objectives.backbone_cls import image_targets, micro_f1
from vlptune.train.backbone_pretrain import is_pretrained_backbone, pretrain_backbone, pretrain_recipe
from vlptune.train.loop import train_worker

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is as fast and immune to a busy second core


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from vlptune.data.prepare import ensure_data  # the synthetic world generator: only for the tests that train

    root = tmp_path_factory.getbasetemp() / "synth-loop"  # test_loop's tiny world (same recipe): made once per session
    ensure_data(loop_recipe(root))
    return root


def test_image_targets_are_the_classes_and_attributes_of_any_object():
    labels = torch.tensor([[2, 0, -1], [-1, -1, -1]])  # image 0: objects of class 2 and 0; image 1: none
    attrs = torch.zeros(2, 3, 4)
    attrs[0, 0, 1] = attrs[0, 1, 3] = 1.0
    got = image_targets(labels, attrs, num_classes=3, with_attributes=True)
    assert got.tolist() == [[1, 0, 1, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0]]
    assert image_targets(labels, attrs, 3, with_attributes=False).tolist() == [[1, 0, 1], [0, 0, 0]]
    # F1 by hand: 2 true positives, 3 predicted, 3 actual -> 2*2 / 6
    assert float(micro_f1(torch.tensor([True, True, True, False]), torch.tensor([1.0, 1.0, 0.0, 1.0]))) == pytest.approx(4 / 6)


def test_pretrain_recipe_trains_the_cnn_alone():
    recipe = pretrain_recipe(loop_recipe(Path("/nonexistent")), steps=7)
    assert set(recipe.active_objectives()) == {"backbone_cls"}
    assert recipe.model.vd.size == 0 and recipe.model.fusion.layers == 1
    assert recipe.train.max_steps == 7 and recipe.train.eval_every == 7 and recipe.train.keep_when_done == "last"
    assert recipe.model.backbone.depth == 18 and recipe.model.backbone.width_mult == 0.0625  # the recipe's own ResNet
    assert recipe.optim.transformer == recipe.optim.backbone  # the head learns with the CNN's optimiser, not the fusion side's
    assert recipe.optim.backbone.optimizer == "adamw" and recipe.optim.backbone.lr == recipe.model.backbone.pretrain_lr == 2e-3
    assert recipe.data.batch_images == recipe.model.backbone.pretrain_batch_images == 16 and recipe.data.itm_negatives == 0
    assert pretrain_recipe(loop_recipe(Path("/nonexistent"), model={"backbone": {"pretrain_steps": 9}})).train.max_steps == 9  # the recipe's default


def test_pretrained_backbone_is_saved_in_hf_format_and_loaded_by_directory(world, tmp_path):
    recipe = loop_recipe(world, train={"max_steps": 6, "eval_every": 6, "log_every": 2}, optim={"backbone": {"optimizer": "adamw", "lr": 3e-3}})
    out = tmp_path / "backbone"
    provenance = pretrain_backbone(recipe, out, train_worker, steps=6, run_dir=tmp_path / "run")
    assert is_pretrained_backbone(out) and (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "provenance.json").read_text()) == provenance
    assert provenance["steps"] == 6 and provenance["depth"] == 18 and provenance["synth"]["train"] == 16
    assert {"val/bcls_acc", "val/bcls_chance", "val/bcls_f1"} <= set(provenance["metrics"])
    assert not list(tmp_path.glob(".backbone.*"))  # no temporary left behind
    # the directory loads through model.backbone.init, like a hub name, into the recipe's ResNet
    loaded = VLPModel(loop_recipe(world, model={"backbone": {"width_mult": 0.0625, "pool": 1, "init": str(out)}, "vd": {"size": 16}, "fusion": {"layers": 1}}))
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    state = loaded.backbone.resnet.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items() if k in state)
    assert any(not torch.equal(v, ResNetBackbone(loaded.backbone.cfg.model_copy(update={"init": "random"})).resnet.state_dict()[k]) for k, v in state.items())
    # a width that does not match is refused, naming the field
    with pytest.raises(ValueError, match="model.backbone.width_mult"):
        ResNetBackbone(init=str(out), width_mult=0.125)


def test_cli_refuses_bad_steps_with_exit_2(world, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(loop_recipe(world)))
    assert main(["backbone", "pretrain", str(path), "--out", str(tmp_path / "b"), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        pretrain_recipe(loop_recipe(world), steps=0)
    assert main(["backbone", "pretrain", str(path), "--out", str(tmp_path / "b"), "--address", "auto"]) == 2
    assert "--address: only with --ray" in capsys.readouterr().err


@pytest.mark.slow  # a local Ray cluster and a Ray Train run of two DDP workers: about 60 s
def test_pretrain_command_with_ray_trains_on_two_ddp_workers(world, tmp_path):
    from helpers import run_ray_command

    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(loop_recipe(world, train={"log_every": 2})))
    out = tmp_path / "backbone"
    args = ["backbone", "pretrain", str(path), "--out", str(out), "--steps", "4", "--ray", "--quiet", "--run-dir", str(tmp_path / "run")]
    rc, text = run_ray_command([*args, "-o", "resources.workers=2", "-o", "resources.cpus_per_worker=0.5"])
    assert rc == 0, text
    assert "with Ray Train (2 worker(s))" in text and "val label accuracy" in text, text
    provenance = json.loads((out / "provenance.json").read_text())
    assert is_pretrained_backbone(out) and provenance["steps"] == 4 and "val/bcls_acc" in provenance["metrics"]
    assert list((tmp_path / "run" / "ray").rglob("checkpoint_*")), "the checkpoint it was read from is Ray Train's"
    loaded = VLPModel(loop_recipe(world, model={"backbone": {"width_mult": 0.0625, "pool": 1, "init": str(out)}, "vd": {"size": 16}, "fusion": {"layers": 1}}))
    assert loaded.backbone.resnet is not None


@pytest.mark.slow  # two train_worker runs (the pretraining and the run using it): about 10 s quiet, 30 s on a busy machine
def test_init_pretrained_is_made_once_under_the_data_root_and_used_by_the_loop(world, tmp_path):
    from vlptune.train import backbone_pretrain as bp
    from vlptune.train.reporting import LocalReporter

    backbone = {"width_mult": 0.0625, "pool": 1, "init": "pretrained", "pretrain_steps": 4, "pretrain_batch_images": 4}  # the mechanism of the demo's 1000
    model = {"backbone": backbone, "vd": {"size": 16}, "fusion": {"layers": 1}}
    recipe = loop_recipe(world, model=model, train={"max_steps": 2, "eval_every": 2, "log_every": 1, "seed": 3})
    with pytest.raises(ValueError, match="resolve_cached_backbone"):
        VLPModel(recipe)  # unresolved, outside the loop: a clear error
    cached = bp.cache_path(recipe)
    assert cached.parent == world / "backbones" and cached.name.endswith("steps4-b4-lr0.002-seed0")
    train_worker(recipe, LocalReporter(quiet=True), tmp_path / "a", resume=False)
    assert bp.is_pretrained_backbone(cached)
    made = (cached / "model.safetensors").stat().st_mtime_ns
    provenance = json.loads((cached / "provenance.json").read_text())
    assert provenance["seed"] == 0  # one backbone whatever the run's seed
    # the world's manifest lists it with the same provenance, next to the generator's parameters
    listed = json.loads((world / "manifest.json").read_text())["backbones"][cached.name]
    assert listed == {"path": f"backbones/{cached.name}", **provenance} and (provenance["steps"], provenance["batch_images"]) == (4, 4)
    resolved = bp.resolve_cached_backbone(recipe, train_worker)
    assert resolved.model.backbone.init == str(cached) and (cached / "model.safetensors").stat().st_mtime_ns == made  # not retrained
    VLPModel(resolved)  # loads through model.backbone.init: DIR


def test_a_run_that_makes_the_backbone_starts_like_one_that_finds_it(world, tmp_path):
    # the cached backbone's pretraining draws from torch's generator inside the run; the run's own weights are
    # seeded after it, so the same seed gives the same figures whether the backbone was made or found
    from vlptune.train.reporting import LocalReporter

    backbone = {"width_mult": 0.0625, "pool": 1, "init": "pretrained", "pretrain_steps": 3, "pretrain_batch_images": 4}
    spec = {"model": {"backbone": backbone, "vd": {"size": 16}, "fusion": {"layers": 1}}, "train": {"max_steps": 2, "eval_every": 2, "log_every": 1}}
    recipe = loop_recipe(tmp_path / "world", **spec)  # its own world: the backbone is not there yet
    made = train_worker(recipe, LocalReporter(quiet=True), tmp_path / "made", resume=False)
    found = train_worker(recipe, LocalReporter(quiet=True), tmp_path / "found", resume=False)
    assert made["val/loss"] == found["val/loss"], (made["val/loss"], found["val/loss"])
