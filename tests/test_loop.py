"""The training loop: data position, freeze schedule, NaN stop, TensorBoard contents, reporting."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch

from vlptune.config import ConfigError, ObjectiveConfig, recipe_to_dict, validate_recipe
from vlptune.objectives.base import Objective, ObjectiveOutput
from vlptune.objectives.registry import register
from vlptune.train.loop import BatchStream, backbone_frozen_at, train_worker
from vlptune.train.reporting import LocalReporter, ProgressLines, Reporter, loop_progress
from vlptune.train.tensorboard import FIXED_HPARAMS, HPARAM_METRICS, HParamsPlan, hparam_values


class NaNProbeConfig(ObjectiveConfig, objective="nan_probe"):
    """The test objective's config: only the weight every objective has."""


@register("nan_probe")
class NaNProbe(Objective):
    """A test objective whose loss is NaN: the loop must stop with a reason."""

    metric_names = ("nan_probe_loss",)

    def __init__(self, cfg, model, recipe, info=None):
        super().__init__(cfg, model, recipe, info)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, batch, ctx):
        loss = self.scale * torch.tensor(float("nan"))
        return ObjectiveOutput(loss, {"nan_probe_loss": loss.detach()})


def loop_recipe(root: Path, **sections):
    spec = {
        "name": "loop-test",
        "data": {"root": str(root), "synth": {"train": 16, "val": 8, "image_size": 64}, "image_size": 64, "max_long_side": 96, "batch_images": 4},
        "model": {"backbone": {"width_mult": 0.0625, "pool": 1}, "vd": {"size": 16}, "fusion": {"layers": 1}},
        "objectives": {"mlm": {"weight": 1.0}, "itm": {"weight": 1.0}, "mvm": {"weight": 1.0}},
        "train": {"max_steps": 4, "eval_every": 2, "log_every": 1},
        "eval": {"max_images": 4, "loss_batches": 1, "vd_picture_codes": 4},
        "resources": {"cpus_per_worker": 2},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if key != "objectives" else value
    return validate_recipe(spec, "loop test")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from vlptune.data.prepare import ensure_data

    root = tmp_path_factory.getbasetemp() / "synth-loop"
    ensure_data(loop_recipe(root))
    return root


def test_local_reporter_is_a_reporter(capsys):
    reporter = LocalReporter()
    assert isinstance(reporter, Reporter)
    reporter.report({"step": 3, "loss": 1.23456, "retrieval/rsum": 250.0}, "/x/ckpt")
    line = capsys.readouterr().out
    assert "step=3" in line and "loss=1.235" in line and "checkpoint=/x/ckpt" in line
    assert reporter.last["retrieval/rsum"] == 250.0 and reporter.checkpoints == ["/x/ckpt"]


def test_freeze_schedule_in_steps_and_epochs(world):
    steps = loop_recipe(world, model={"backbone": {"width_mult": 0.0625, "pool": 1, "freeze_for": 3}, "vd": {"size": 16}, "fusion": {"layers": 1}})
    assert [backbone_frozen_at(s, steps, steps_per_epoch=10) for s in range(5)] == [True, True, True, False, False]
    epochs = loop_recipe(
        world, model={"backbone": {"width_mult": 0.0625, "pool": 1, "freeze_for": 2, "freeze_unit": "epochs"}, "vd": {"size": 16}, "fusion": {"layers": 1}}
    )
    assert backbone_frozen_at(7, epochs, steps_per_epoch=4) and not backbone_frozen_at(8, epochs, steps_per_epoch=4)
    assert not backbone_frozen_at(0, loop_recipe(world), steps_per_epoch=4)


def test_batch_stream_resumes_at_its_data_position(world):
    from vlptune.data.dataset import build_loader

    recipe = loop_recipe(world)
    loader = build_loader(recipe)  # 16 images / 4 = 4 batches per epoch
    fresh = BatchStream(loader)
    ids = [fresh.next()["image_ids"] for _ in range(7)]
    assert fresh.state()["epoch"] == 1 and fresh.state()["position"] == 3
    assert ids[4] != ids[0]  # the next epoch is another order
    later = BatchStream(build_loader(recipe), epoch=0, position=3)
    assert [later.next()["image_ids"] for _ in range(4)] == ids[3:7]


SEARCHED = ("objectives.mvm.prob", "optim.global_batch")  # as a search over these two would pass them


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One short run shared by the tests below: 4 steps of 2 accumulated micro-batches, evaluations at 2 and 4."""
    from vlptune.model.vlp import VLPModel

    run = tmp_path_factory.mktemp("trained") / "run"
    reporter = LocalReporter(quiet=True)
    recipe = loop_recipe(
        world,
        optim={"global_batch": 8},
        model={"backbone": {"width_mult": 0.0625, "pool": 1, "freeze_for": 2}, "vd": {"size": 16}, "fusion": {"layers": 1}},
    )
    calls: list[bool] = []
    original = VLPModel.set_backbone_frozen
    progress = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, loop_progress("progress ", every_s=0.0, stream=progress):
        mp.setattr(VLPModel, "set_backbone_frozen", lambda self, frozen: calls.append(frozen) or original(self, frozen))
        result = train_worker(recipe, reporter, run, resume=False, hparams=HParamsPlan(hparam_values(SEARCHED, recipe_to_dict(recipe)), "val/mlm_acc"))
    return run, reporter, result, calls, progress.getvalue().splitlines()


def test_run_reports_checkpoints_accumulates_and_freezes(trained):
    run, reporter, result, freeze_calls, _ = trained
    assert freeze_calls == [True, False]  # frozen for steps 0-1, released at step 2
    assert result["stop_reason"] == "max_steps" and result["step"] == 4
    assert result["images_seen"] == 4 * 2 * 4  # steps x micro-batches x images
    assert [r["step"] for r in reporter.history] == [2, 4]
    assert all(c is not None for c in reporter.checkpoints)
    # train.keep_checkpoints=1: each checkpoint replaced the one before; the last one stays
    assert [Path(c).is_dir() for c in reporter.checkpoints] == [False, True]
    assert result["checkpoint"] == reporter.checkpoints[-1]
    assert (run / "recipe.yaml").is_file()
    for key in ("retrieval/tr_r1", "retrieval/chance_ir_r1", "val/itm_acc", "val/mlm_acc", "run_dir", "train_seconds"):
        assert key in result
    assert result["retrieval/chance_ir_r1"] == pytest.approx(100.0 / 4)
    assert 0.0 <= result["retrieval/tr_r1"] <= 100.0


def test_each_logged_window_says_how_far_the_run_is_and_its_eta(trained):
    *_, progress = trained
    # train.log_every 1: one line per step of 4, each "N/4, ETA ..." (the last with nothing left)
    assert [line.split(",")[0] for line in progress] == [f"progress {n}/4" for n in (1, 2, 3, 4)]
    assert all(", ETA " in line for line in progress) and progress[-1].endswith("ETA 0s")


def test_progress_lines_print_at_most_once_per_interval():
    out = io.StringIO()
    handler = ProgressLines("at ", every_s=3600.0, stream=out)
    for n in (1, 2):
        handler.emit(logging.LogRecord("vlptune.train", logging.INFO, __file__, 0, "step", None, None))  # no progress: nothing
        record = logging.LogRecord("vlptune.train", logging.INFO, __file__, 0, "step", None, None)
        record.progress = f"{n}/9, ETA 1m00s"
        handler.emit(record)
    assert out.getvalue() == "at 1/9, ETA 1m00s\n"  # the second came within the hour


def test_tensorboard_run_has_scalars_hparams_and_vd_picture_in_one_directory(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = trained[0]
    subdirs = [p.name for p in run.iterdir() if p.is_dir()]
    assert subdirs == ["checkpoints"]  # no hparams sub-run
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/mlm_loss",
        "train/mlm_acc",
        "train/itm_loss",
        "train/itm_acc",
        "train/mvm_loss",
        "train/mvm_acc",
        "train/grad_norm",
        "lr/backbone",
        "lr/transformer",
        "vd/perplexity",
        "vd/codes_used",
        "vd/dead_codes",
        "throughput/images_per_s",
        "throughput/pairs_per_s",
        "val/loss",
        "val/itm_acc",
        "val/mlm_acc",
        "val/mvm_acc",
        "retrieval/tr_r1",
        "retrieval/ir_r1",
        "retrieval/rsum",
        "retrieval/chance_rsum",
    ):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("retrieval/rsum")] == [2, 4]
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams)
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert set(start.hparams) == {*SEARCHED, *FIXED_HPARAMS}  # the searched and the short fixed list, not the whole recipe
    assert start.hparams["model.vd.size"].number_value == 16
    assert start.hparams["objectives.mvm.prob"].number_value == 1.0
    assert start.hparams["optim.global_batch"].number_value == 8
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert [h.name for h in experiment.hparam_infos] == [*SEARCHED, *FIXED_HPARAMS]
    # the search metric, its chance level (MLM reports one), then the other columns
    assert [m.name.tag for m in experiment.metric_infos] == ["val/mlm_acc", "val/mlm_chance", *(m for m in HPARAM_METRICS if m != "val/mlm_acc")]
    assert "vd/codes" in acc.Tags()["images"]


def test_non_finite_losses_stop_the_run_with_a_reason(world, tmp_path):
    recipe = loop_recipe(
        world, objectives={"itm": {"weight": 1.0}, "nan_probe": {"weight": 1.0}}, train={"max_steps": 10, "eval_every": 5, "log_every": 1, "nan_patience": 3}
    )
    reporter = LocalReporter(quiet=True)
    result = train_worker(recipe, reporter, tmp_path / "nan", resume=False)
    assert result["step"] == 3
    assert "non-finite" in result["stop_reason"] and "train.nan_patience=3" in result["stop_reason"]
    assert reporter.last["stop_reason"] == result["stop_reason"]
    assert result["checkpoint"] is None  # nothing worth keeping was written


def test_indivisible_global_batch_is_refused_before_training(world, tmp_path):
    recipe = loop_recipe(world, optim={"global_batch": 6})
    with pytest.raises(ConfigError, match="optim.global_batch=6"):
        train_worker(recipe, LocalReporter(quiet=True), tmp_path / "bad", resume=False)
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- two workers (DDP, gloo)


def _ddp_worker(rank: int, world_size: int, init_file: str, root: str, out: str, result_dir: str) -> None:
    import json

    import torch.distributed as dist

    import vlptune.train.loop as loop

    built = {}
    original = loop.build_pretrainer

    def capture(*args, **kwargs):
        built["module"] = original(*args, **kwargs)
        return built["module"]

    loop.build_pretrainer = capture
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        recipe = loop_recipe(Path(root), train={"max_steps": 3, "eval_every": 3, "log_every": 1}, resources={"cpus_per_worker": 1})
        result = loop.train_worker(recipe, LocalReporter(quiet=True), out, resume=False)
        checksum = float(sum(p.detach().double().sum() for p in built["module"].parameters()))
        codes = float(built["module"].model.vd.codes.double().sum())
        Path(result_dir, f"{rank}.json").write_text(
            json.dumps({"result": {k: v for k, v in result.items() if v is None or isinstance(v, (int, float, str))}, "checksum": checksum, "codes": codes})
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_with_ddp_stay_in_sync(world, tmp_path):
    import json

    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir()
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(world), str(tmp_path / "run"), str(results)), nprocs=2, start_method="spawn")
    rank0, rank1 = (json.loads((results / f"{r}.json").read_text()) for r in (0, 1))
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-9)  # DDP kept the weights identical
    assert rank0["codes"] == pytest.approx(rank1["codes"], rel=1e-9)  # and the VD (all-reduced statistics)
    assert rank0["result"]["retrieval/rsum"] == rank1["result"]["retrieval/rsum"]
    assert rank0["result"]["val/loss"] == pytest.approx(rank1["result"]["val/loss"])
    assert rank0["result"]["images_seen"] == 3 * 2 * 4  # steps x workers x images per worker
    assert rank0["result"]["checkpoint"] and rank1["result"]["checkpoint"] is None  # rank 0 writes


# --------------------------------------------------------------------------- evaluation


def test_ranks_are_pessimistic_on_ties_and_chance_levels_are_exact():
    from math import comb

    from vlptune.train.evaluate import chance_recall, gt_ranks, recall_metrics

    relevant = torch.eye(4, dtype=torch.bool)
    tier = torch.zeros(4, 4, dtype=torch.int64)
    flat = gt_ranks(tier, torch.zeros(4, 4), relevant)
    assert flat.tolist() == [3, 3, 3, 3]  # all tied: ranked last, never first
    perfect = gt_ranks(tier, torch.eye(4), relevant)
    assert perfect.tolist() == [0, 0, 0, 0]
    tiered = gt_ranks(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[9.0, 0.0, 1.0, 2.0]]), torch.tensor([[True, False, False, False]]))
    assert tiered.tolist() == [3]  # a higher tier (candidates) outranks any score below it
    assert chance_recall(1, 10, 1) == pytest.approx(0.1)
    assert chance_recall(5, 10, 2) == pytest.approx(1 - comb(8, 5) / comb(10, 5))
    assert chance_recall(10, 5, 1) == 1.0
    m = recall_metrics(perfect, perfect, [1, 1, 1, 1], 4)
    assert m["tr_r1"] == m["ir_r1"] == 100.0 and m["rsum"] == 600.0 and m["chance_ir_r1"] == pytest.approx(25.0)


def test_candidate_reranking_matches_full_scoring_when_it_keeps_everything(world):
    from vlptune.objectives.base import build_pretrainer
    from vlptune.train.evaluate import RetrievalInputs, evaluate_retrieval

    torch.manual_seed(0)
    recipe = loop_recipe(world)
    pretrainer = build_pretrainer(recipe)
    inputs = RetrievalInputs.load(recipe)
    full, _ = evaluate_retrieval(pretrainer, recipe, inputs, torch.device("cpu"))
    recipe.eval.candidates = 2
    cheap, enc = evaluate_retrieval(pretrainer, recipe, inputs, torch.device("cpu"))
    assert "cand_recall_tr" in cheap and "cand_recall_tr" not in full
    assert 0.0 <= cheap["cand_recall_tr"] <= 100.0 and full["pairs_scored"] < cheap["pairs_scored"] <= 2 * full["pairs_scored"]
    for key in ("tr_r5", "ir_r5"):  # with 4 images, R@5 covers every candidate and non-candidate alike
        assert cheap[key] == full[key] == 100.0
    recipe.eval.candidates = 4  # keeps every pair: identical to full scoring
    same, _ = evaluate_retrieval(pretrainer, recipe, inputs, torch.device("cpu"))
    assert {k: same[k] for k in ("tr_r1", "ir_r1", "rsum")} == {k: full[k] for k in ("tr_r1", "ir_r1", "rsum")}
    assert len(enc.codes) == 4 and full["vd_codes_used"] >= 1


def test_vlptune_train_command(world, tmp_path, capsys):
    import yaml

    from vlptune.cli import main

    recipe_file = tmp_path / "tiny.yaml"
    spec = loop_recipe(world, train={"max_steps": 2, "eval_every": 2, "log_every": 1}).model_dump(mode="json")
    recipe_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "-o", "train.max_steps=1", "-o", "train.eval_every=1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "TR R@1" in printed and "RSUM" in printed and "chance" in printed and "stop reason: max_steps" in printed
    assert main(["train", str(recipe_file), "--out", str(out), "--quiet"]) == 2  # refuses to overwrite a run
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(recipe_file), "-o", "train.max_steps=2", "--out", str(out), "--resume", "--quiet"]) == 0
    assert "step 2" in capsys.readouterr().out
