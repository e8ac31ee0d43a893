"""What a run's HParams show: the selection (searched first, a short fixed list, the
metric columns) and what a real TensorBoard server serves over two runs (HTTP API)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import stop_process
from vlptune.config import Recipe, recipe_to_dict
from vlptune.train.tensorboard import (
    FIXED_HPARAMS,
    HPARAM_METRICS,
    HParamsPlan,
    RunWriter,
    chance_keys,
    hparam_metrics,
    hparam_values,
    select_hparams,
)

REPO = Path(__file__).resolve().parents[1]
METRIC = "val/mlm_acc"
CHANCE = "val/mlm_chance"
# the space's order on purpose not alphabetical: the dashboard sorts by name, the files keep this order
SEARCHED = ("optim.backbone.lr", "model.vd.size", "data.mlm_prob")
SERVER_START_S = 20.0  # TensorBoard's import and first load of two tiny runs take a few seconds
POLL_S = 0.25


def recipe_tree(**sections) -> dict:
    tree = recipe_to_dict(Recipe())
    for section, values in sections.items():
        tree[section].update(values)
    return tree


# ------------------------------------------------------------------ the selection


def test_without_a_plan_only_the_fixed_list_is_logged():
    selection = select_hparams(recipe_tree())
    assert list(selection.values) == list(FIXED_HPARAMS)
    assert selection.searched == frozenset() and selection.metric is None
    assert selection.values["model.vd.size"] == Recipe().model.vd.size


def test_searched_hparams_come_first_in_their_order_then_the_fixed_ones_they_do_not_repeat():
    tree = recipe_tree()
    plan = HParamsPlan(hparam_values(SEARCHED, tree), METRIC)
    selection = select_hparams(tree, plan)
    names = list(selection.values)
    assert names[: len(SEARCHED)] == list(SEARCHED)
    assert names[len(SEARCHED) :] == [n for n in FIXED_HPARAMS if n not in SEARCHED]  # model.vd.size once
    assert selection.searched == frozenset(SEARCHED) and selection.metric == METRIC
    assert len(names) < len(hparam_values(["data", "model", "optim", "train"], tree))  # not the whole recipe


def test_hparam_values_reads_the_recipe_then_the_extra_names_and_skips_what_neither_has():
    tree = recipe_tree()
    names = ["variant", "train.seed", "objectives.ssul.weight", "optim.backbone", "data.mean"]
    values = hparam_values(names, tree, {"variant": "vd-16", "seed": 2})
    assert list(values)[:2] == ["variant", "train.seed"]
    assert values["variant"] == "vd-16" and values["train.seed"] == 0  # a recipe path takes the recipe's value
    assert "objectives.ssul.weight" not in values  # an objective this recipe does not have
    assert values["optim.backbone.lr"] == tree["optim"]["backbone"]["lr"]  # a section: its leaves
    assert values["data.mean"] == str(list(Recipe().data.mean))  # a tuple: its string form


def test_metric_columns_start_with_the_search_metric_and_its_chance_level():
    reported = {METRIC, CHANCE, "retrieval/rsum", "retrieval/chance_rsum"}
    assert hparam_metrics(METRIC, reported)[:2] == [METRIC, CHANCE]
    assert hparam_metrics("retrieval/rsum", reported)[:2] == ["retrieval/rsum", "retrieval/chance_rsum"]
    columns = hparam_metrics("val/itm_acc", reported)  # ITM reports no chance level
    assert columns[0] == "val/itm_acc" and not any("chance" in c for c in columns)
    assert sorted(columns) == sorted(HPARAM_METRICS)  # each once
    assert hparam_metrics(None, reported) == list(HPARAM_METRICS)
    assert chance_keys(METRIC) == ["val/chance_mlm_acc", CHANCE] and chance_keys("loss") == []


def test_a_study_lists_variant_seed_and_the_paths_its_variants_set():
    from vlptune.study.ablation import study_from_dict, study_hparams

    doc = {
        "name": "unit",
        "base": str(REPO / "trials" / "demo-light.yaml"),
        "baseline": "no-vd",
        "variants": {"no-vd": {"model.vd.size": 0, "objectives.mvm.weight": 0.0}, "vd-16": {"model.vd.size": 16}, "lr": {"optim.backbone.lr": 0.002}},
        "seeds": 2,
        "metrics": [METRIC],
        "metric": METRIC,
        "mode": "max",
        "fixed": {"train.max_steps": 4},
    }
    spec = study_from_dict(doc, source="unit.yaml", base_dir=REPO)
    assert study_hparams(spec) == ["variant", "train.seed", "model.vd.size", "objectives.mvm.weight", "optim.backbone.lr"]


def test_the_trial_passes_hparams_only_to_a_worker_that_takes_them():
    from vlptune.search.trainable import hparams_kwargs

    config = {"hparams": {"model.vd.size": 16}, "metric": METRIC}

    def old_standin(recipe, reporter, out_dir, resume=True):
        return {}

    def new_worker(recipe, reporter, out_dir, resume=True, hparams=None):
        return {}

    assert hparams_kwargs(old_standin, config) == {}
    assert hparams_kwargs(new_worker, config) == {"hparams": HParamsPlan({"model.vd.size": 16}, METRIC)}


# ------------------------------------------------------------------ the event file and the dashboard


def write_run(run_dir: Path, searched: dict, metric_value: float) -> None:
    """One run as the loop writes it: session start, an evaluation (scalars, then the experiment), session end."""
    tree = recipe_tree(train={"seed": 0})
    for path, value in searched.items():
        section, *rest = path.split(".")
        node = tree[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    writer = RunWriter(run_dir)
    writer.hparams_start(tree, HParamsPlan(hparam_values(SEARCHED, tree), METRIC))
    evaluation = {METRIC: metric_value, CHANCE: 0.1, "retrieval/rsum": 30.0, "retrieval/chance_rsum": 25.0, "val/loss": 5.0}
    writer.scalars(evaluation, step=2)
    writer.hparams_experiment(evaluation)
    writer.hparams_experiment(evaluation)  # once per run: a second call writes nothing
    writer.hparams_end()
    writer.close()


def test_the_event_file_holds_the_experiment_once_in_the_written_order(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    write_run(tmp_path / "run", {"model.vd.size": 32, "optim.backbone.lr": 0.002, "data.mlm_prob": 0.2}, 0.4)
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    names = [h.name for h in experiment.hparam_infos]
    assert names == [*SEARCHED, *(n for n in FIXED_HPARAMS if n not in SEARCHED)]
    assert [h.differs for h in experiment.hparam_infos] == [n in SEARCHED for n in names]
    assert [m.name.tag for m in experiment.metric_infos][:2] == [METRIC, CHANCE]
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert set(start.hparams) == set(names)
    assert start.hparams["model.vd.size"].number_value == 32 and start.hparams["optim.backbone.lr"].number_value == pytest.approx(0.002)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def board(tmp_path):
    """A TensorBoard server (``vlptune board``, a subprocess on 127.0.0.1) over two runs; always stopped."""
    exp_dir = tmp_path / "exp"
    write_run(exp_dir / "tb" / "trial_a", {"model.vd.size": 0, "optim.backbone.lr": 0.001, "data.mlm_prob": 0.15}, 0.3)
    write_run(exp_dir / "tb" / "trial_b", {"model.vd.size": 32, "optim.backbone.lr": 0.002, "data.mlm_prob": 0.25}, 0.4)
    port = _free_port()
    code = "import sys; from vlptune.search.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "board", str(exp_dir), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
    )
    try:
        yield f"http://127.0.0.1:{port}/", proc
    finally:
        stop_process(proc, 10)


def _served_experiment(url: str, proc: subprocess.Popen) -> dict:
    from helpers import hparams_experiment

    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "TensorBoard exited"
        try:
            experiment = hparams_experiment(url)
        except OSError:  # not listening yet
            experiment = {}
        if experiment.get("metricInfos"):
            return experiment
        time.sleep(POLL_S)
    raise AssertionError(f"TensorBoard at {url} served no hparams experiment within {SERVER_START_S} s")


def test_the_dashboard_opens_on_the_searched_hparams_and_the_search_metric(board):
    from helpers import hparams_sessions

    url, proc = board
    experiment = _served_experiment(url, proc)
    names = [h["name"] for h in experiment["hparamInfos"]]
    # TensorBoard sorts the hparams by (differs first, name): the searched ones, then the fixed ones
    assert names == [*sorted(SEARCHED), *sorted(n for n in FIXED_HPARAMS if n not in SEARCHED)]
    assert all(h.get("differs") for h in experiment["hparamInfos"][: len(SEARCHED)])
    # the metrics keep the written order: the search metric, its chance level, the rest
    tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert tags == [METRIC, CHANCE, *(m for m in HPARAM_METRICS if m != METRIC)]
    groups = hparams_sessions(url, [METRIC, CHANCE])
    by_run = {g["sessions"][0]["name"]: g for g in groups}
    assert set(by_run) == {"trial_a", "trial_b"}
    assert by_run["trial_b"]["hparams"]["model.vd.size"] == 32
    assert {m["name"]["tag"]: m["value"] for m in by_run["trial_b"]["metricValues"]}[METRIC] == pytest.approx(0.4)
