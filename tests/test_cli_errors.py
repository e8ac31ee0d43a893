"""Bad input on the `vlptune` command line: one message naming the file, field or path and
what would do, exit code 2, never a traceback. In-process (vlptune.cli.main), no training,
no Ray: missing data, directories that are not experiments (with the listing of the
experiments under runs/), and "did you mean" for misspelled keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlptune import cli
from vlptune.data.schema import DataError
from vlptune.errors import EXIT_USER_ERROR, did_you_mean
from vlptune.objectives.base import prepare_dataset
from vlptune.search import layout as experiments
from vlptune.search.layout import META_FILE

REPO = Path(__file__).resolve().parents[1]
LIGHT = REPO / "trials" / "light.yaml"
DEMO_LIGHT = REPO / "trials" / "demo-light.yaml"
FULL = REPO / "trials" / "full.yaml"


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``vlptune ARGV``, checked to be a clean user error."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err
    assert err.startswith("vlptune: "), err
    return code, err


# ------------------------------------------------------------------ missing data


def test_train_without_data_names_the_path_and_how_to_make_it(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # light.yaml's data.root is data/coco, relative: absent here
    _, err = run(["train", LIGHT, "--out", tmp_path / "run", "--quiet"], capsys)
    assert "data.root 'data/coco'" in err and "data/coco/manifest.json not found: no such directory" in err
    assert "data.synthesize: false" in err
    assert "`vlptune data synth --out data/coco --train 2000 --val 200 " in err  # light.yaml's data.synth (the defaults)
    assert "-o data.synthesize=true" in err
    assert "`vlptune data convert SOURCE ... --out data/coco` (docs/convert.md)" in err and "manifest.json and the Parquet shards it lists" in err
    assert len(err.strip().splitlines()) == 1  # one paragraph


def test_missing_data_of_a_recipe_needing_phrase_similarities_says_only_synthesis_writes_them(tmp_path):
    from helpers import tiny_recipe

    recipe = tiny_recipe("pra", {"itm": {"weight": 1.0}, "pra": {"weight": 1.0}}, data={"root": str(tmp_path / "world"), "synthesize": False})
    (tmp_path / "world").mkdir()
    with pytest.raises(DataError) as info:
        prepare_dataset(recipe)  # the objectives tell the data which columns they read
    message = str(info.value)
    assert "the directory exists but has no manifest" in message
    assert "set data.synthesize: true" in message and "`vlptune data synth` does not write them" in message
    assert "vlptune data synth --out" not in message  # that command would make a world this recipe refuses


# ------------------------------------------------------------------ experiment directories


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A working directory whose runs/ holds a search, the demo's search and promoted run, and a training run."""
    monkeypatch.chdir(tmp_path)
    for rel, meta in (("runs/search/tpe-1", {"metric": "retrieval/rsum"}), ("runs/demo/search", {}), ("runs/demo/promoted", {"kind": "ablation"})):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / META_FILE).write_text(json.dumps(meta))
    (tmp_path / "runs/demo/promoted/vlptune_promotion.json").write_text("{}")
    (tmp_path / "runs/light-20250101/checkpoints").mkdir(parents=True)  # a training run: not an experiment
    return tmp_path


LISTING = ("experiments under runs/ (3):", "runs/demo/promoted  (promoted run)", "runs/demo/search    (search)", "runs/search/tpe-1   (search)")


@pytest.mark.parametrize(
    "argv",
    [
        ["results", "runs/search/demo"],
        ["board", "runs/search/demo", "--port", "0"],
        ["promote", "runs/search/demo", "--to", FULL],
        ["promote", "--report", "runs/search/demo"],
        ["importance", "runs/search/demo"],
        ["ablate", "--table", "runs/search/demo"],
        ["search", "--resume", "runs/search/demo"],
    ],
    ids=lambda argv: " ".join(str(a) for a in argv[:2]),
)
def test_a_missing_experiment_is_said_not_to_exist_with_the_experiments_found(runs, argv, capsys):
    _, err = run(argv, capsys)
    first = err.splitlines()[0]
    assert "runs/search/demo does not exist" in first and "vlptune_search.json is missing" not in err
    for line in LISTING:
        assert line in err
    assert "light-20250101" not in err


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["results", "runs/light-20250101"], "runs/light-20250101: not a vlptune search experiment (vlptune_search.json is missing)"),
        (["board", "runs/light-20250101", "--port", "0"], "runs/light-20250101: no TensorBoard runs"),
        (["ablate", "--table", "runs/demo/search"], "runs/demo/search: not a vlptune ablation study (vlptune_study.json is missing)"),
        (["promote", "--report", "runs/demo/search"], "runs/demo/search: not a promoted run (vlptune_promotion.json is missing)"),
    ],
    ids=lambda v: " ".join(str(a) for a in v[:2]) if isinstance(v, list) else None,
)
def test_an_existing_directory_that_is_not_one_keeps_its_message_and_gets_the_listing(runs, argv, problem, capsys):
    _, err = run(argv, capsys)
    assert problem in err.splitlines()[0]
    for line in LISTING:
        assert line in err


def test_the_listing_is_bounded_and_says_when_there_is_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "there is no runs/ directory" in experiments.format_listing()
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert experiments.format_listing().startswith("no experiments under runs/")
    extra = 2
    for i in range(experiments.MAX_LISTED + extra):
        (tmp_path / "runs" / "search" / f"exp-{i:02d}").mkdir(parents=True)
        (tmp_path / "runs" / "search" / f"exp-{i:02d}" / META_FILE).write_text("{}")
    text = experiments.format_listing()
    assert text.splitlines()[0] == f"experiments under runs/ ({experiments.MAX_LISTED + extra}):"
    assert len(text.splitlines()) == 1 + experiments.MAX_LISTED + 1 and text.endswith(f"... and {extra} more")
    assert "runs/search/exp-00" in text and "runs/search/exp-11" not in text  # sorted, the first ten


def test_the_listing_root_holds_every_default_storage():
    from vlptune.search.layout import DEFAULT_STORAGE
    from vlptune.study.ablation import DEFAULT_STORAGE as ABLATION_STORAGE
    from vlptune.study.promote_cli import DEFAULT_RUN_STORAGE

    for storage in (DEFAULT_STORAGE, ABLATION_STORAGE, DEFAULT_RUN_STORAGE):
        assert Path(storage).parent == experiments.EXPERIMENTS_ROOT, storage


def test_a_bug_keeps_its_traceback(monkeypatch):
    from vlptune.search import results

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(results, "collect", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["results", "anywhere"])


# ------------------------------------------------------------------ did you mean


def test_a_misspelled_recipe_key_gets_a_suggestion(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(DEMO_LIGHT), "optim": {"transfomer": {"lr": 1e-3}}, "objectives": {"mlmm": {"weight": 1.0}}}))
    _, err = run(["config", "show", recipe], capsys)
    assert str(recipe) in err
    assert "optim.transfomer: unknown field (value {'lr': 0.001}); did you mean 'transformer'?" in err
    assert "objectives.mlmm: unknown objective 'mlmm' (did you mean 'mlm'?)" in err


def test_a_misspelled_override_gets_a_suggestion(capsys):
    _, err = run(["config", "show", DEMO_LIGHT, "-o", "optim.transformer.lrr=1e-3"], capsys)
    assert "optim.transformer.lrr: unknown field" in err and "did you mean 'lr'?" in err and "[set in override 'optim.transformer.lrr=1e-3']" in err
    _, err = run(["train", DEMO_LIGHT, "-o", "optm.transformer.lr=1e-3"], capsys)
    assert "optm: unknown field" in err and "did you mean 'optim'?" in err


def space_file(tmp_path: Path, **changes) -> Path:
    doc = {
        "base": str(DEMO_LIGHT),
        "metric": "retrieval/rsum",
        "mode": "max",
        "parameters": {"optim.transformer.lr": {"loguniform": [1e-5, 1e-3]}},
        "fixed": {"train.max_steps": 4},
    }
    doc.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_misspelled_search_space_paths_and_keys_get_suggestions(tmp_path, capsys):
    space = space_file(
        tmp_path,
        parameters={"optim.transfomer.lr": {"loguniform": [1e-5, 1e-3]}, "objectives.mvm.wieght": {"uniform": [0.1, 1.0]}},
        fixed={"train.max_stepz": 4},
        num_samles=3,
    )
    _, err = run(["space", "check", space], capsys)
    assert f"{space}: invalid search space:" in err
    assert "parameters.optim.transfomer.lr: optim.transfomer.lr: no field 'transfomer' in optim (did you mean 'transformer'?)" in err
    assert "objective 'mvm' has no field 'wieght' (did you mean 'weight'?)" in err
    assert "fixed.train.max_stepz: train.max_stepz: no field 'max_stepz' in train (did you mean 'max_steps'?)" in err
    assert "num_samles: unknown field (value 3); did you mean 'num_samples'?" in err


def test_a_misspelled_space_override_is_refused_with_a_suggestion(tmp_path, capsys):
    _, err = run(["space", "check", space_file(tmp_path), "-o", "num_samles=3"], capsys)
    assert "override 'num_samles=3': 'num_samles' is neither a setting of this file" in err and "(did you mean 'num_samples'?)" in err


def test_misspelled_study_keys_get_suggestions(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    doc = {
        "base": str(DEMO_LIGHT),
        "baseline": "no-vd",
        "variants": {"no-vd": {"model.vd.sise": 0}, "vd-16": {"model.vd.size": 16}},
        "metrics": ["retrieval/rsum"],
        "metric": "retrieval/rsum",
        "mode": "max",
    }
    study.write_text(yaml.safe_dump({**doc, "seedz": 2}))
    _, err = run(["ablate", "--check", study], capsys)
    assert "seedz: unknown field (value 2); did you mean 'seeds'?" in err
    study.write_text(yaml.safe_dump(doc))
    _, err = run(["ablate", "--check", study], capsys)
    assert "variants.no-vd.model.vd.sise: model.vd.sise: no field 'sise' in model.vd (did you mean 'size'?)" in err


def test_did_you_mean_ignores_case_and_stays_quiet_when_nothing_is_close():
    assert did_you_mean("LR", ["lr", "momentum"]) == " (did you mean 'lr'?)"
    assert did_you_mean("transfomer", ["backbone", "transformer"], aside=False) == "did you mean 'transformer'?"
    assert did_you_mean("zzz", ["backbone", "transformer"]) == ""
