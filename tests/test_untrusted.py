"""Reading an experiment directory never runs code from it (docs/search.md, "Trust boundary").

Experiments are shared between colleagues and copied from clusters. A pickle
payload is planted in every file Tune writes pickled (the pickled fields of
``experiment_state-*.json``, ``tuner.pkl``, the searcher state, each trial's
``params.pkl``) and a trial's config is replaced by a pickled one; then every
reading command (``results``, ``promote``, ``importance``, ``ablate --table``,
``board``) reads the directory, and the payload must not have run. The same
payload, given to Ray's own reader, does run: the test can fail.
"""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_promote import MAP, TARGET, TRIALS, make_experiment
from vlptune.cli import main as vlptune_main
from vlptune.search.layout import TB_DIR
from vlptune.study import ablation

STUDY_FILE = Path(__file__).resolve().parents[1] / "search_spaces" / "ablations" / "soho_mvm_demo.yaml"
BOARD_START_S = 60.0  # how long TensorBoard may take to answer (it imports TensorFlow's stub and scans the runs)


class _Payload:
    """Unpickling this writes ``mark``: the proof that a reader ran code from the file."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (exec, (f"open({str(self.mark)!r}, 'a').write('ran\\n')",))


def _hex(mark: Path) -> str:
    return pickle.dumps(_Payload(mark)).hex()


def _plant_in_state(state_file: Path, mark: Path, pickled_config_trial: str | None) -> int:
    """Replace every pickled value of Tune's experiment state by the payload (and, for one trial, its config)."""
    data = json.loads(state_file.read_text())
    planted = 0

    def swap(obj):
        nonlocal planted
        if isinstance(obj, dict):
            if obj.get("_type") == "CLOUDPICKLE_FALLBACK":
                planted += 1
                return {"_type": "CLOUDPICKLE_FALLBACK", "value": _hex(mark)}
            return {k: swap(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [swap(v) for v in obj]
        return obj

    rows = []
    for trial_json, runtime_json in data["trial_data"]:
        trial = swap(json.loads(trial_json))
        if trial["trial_id"] == pickled_config_trial:
            trial["config"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": _hex(mark)}
            planted += 1
        rows.append([json.dumps(trial), json.dumps(swap(json.loads(runtime_json)))])
    data["trial_data"] = rows
    state_file.write_text(json.dumps(data))
    return planted


def _plant_files(exp: Path, mark: Path) -> None:
    """Tune's pickled files, with the payload inside."""
    blob = pickle.dumps(_Payload(mark))
    for name in ("tuner.pkl", "trainable.pkl", "searcher-state-2025-01-01_00-00-00.pkl", "search_gen_state-2025-01-01_00-00-00.json"):
        (exp / name).write_bytes(blob)
    for trial_dir in exp.glob("vlptune_trial_*"):
        (trial_dir / "params.pkl").write_bytes(blob)
    (exp / TB_DIR).mkdir(exist_ok=True)
    (exp / TB_DIR / "planted.pkl").write_bytes(blob)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _board_answers(exp: Path) -> dict:
    """Run `vlptune board EXP` and fetch its list of runs (TensorBoard reads the tb/ directory)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlptune.cli", "board", str(exp), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + BOARD_START_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as r:
                    return {"runs": json.loads(r.read())}
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"board did not answer: {proc.stdout.read() if proc.stdout else ''}") from None
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _study_experiment(root: Path) -> Path:
    """An ablation study's directory (its resolved copy and meta) with the hand-written trials of make_experiment."""
    exp = make_experiment(root, "study-exp")
    spec = ablation.load_study(STUDY_FILE)
    ablation.write_experiment_files(spec, exp, None)
    state_file = next(exp.glob("experiment_state-*.json"))
    data = json.loads(state_file.read_text())
    rows = []
    for i, (trial_json, runtime_json) in enumerate(data["trial_data"]):
        trial = json.loads(trial_json)
        config = {ablation.VARIANT_KEY: list(spec.variants)[i % 2], ablation.SEED_KEY: i // 2}
        trial["config"] = config
        (exp / f"vlptune_trial_{trial['trial_id']}" / "params.json").write_text(json.dumps(config))
        rows.append([json.dumps(trial), runtime_json])
    data["trial_data"] = rows
    state_file.write_text(json.dumps(data))
    return exp


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    mark = root / "payload-ran"
    exp = make_experiment(root / "search")
    pickled_trial = next(iter(TRIALS))
    (exp / f"vlptune_trial_{pickled_trial}" / "params.json").write_text(json.dumps(TRIALS[pickled_trial][0]))
    count = _plant_in_state(next(exp.glob("experiment_state-*.json")), mark, pickled_trial)
    assert count > len(TRIALS)  # Tune's state holds pickled fields in every trial, and one config
    _plant_files(exp, mark)
    study = _study_experiment(root / "study")
    _plant_in_state(next(study.glob("experiment_state-*.json")), mark, None)
    _plant_files(study, mark)
    return {"root": root, "mark": mark, "exp": exp, "study": study}


def test_the_payload_is_live(planted, tmp_path):
    """The planted bytes run when unpickled, and Ray's own reader of an experiment unpickles them."""
    mark = tmp_path / "live"
    pickle.loads(bytes.fromhex(_hex(mark)))
    assert mark.read_text() == "ran\n"
    from ray.tune import ExperimentAnalysis

    mark.unlink()
    probe = make_experiment(tmp_path, "probe")
    _plant_in_state(next(probe.glob("experiment_state-*.json")), mark, None)
    try:
        ExperimentAnalysis(str(probe))
    except Exception:
        pass  # the payload is not what Ray expected to find: it ran first
    assert mark.is_file(), "Ray's reader no longer unpickles the state: the planted payload proves nothing"


def test_reading_commands_never_unpickle(planted, tmp_path, capsys):
    exp, study, mark = planted["exp"], planted["study"], planted["mark"]
    target = tmp_path / "trials" / "full-test.yaml"
    target.parent.mkdir(parents=True)
    target.write_text(TARGET)
    fmap = tmp_path / "map.yaml"
    fmap.write_text(MAP)

    assert vlptune_main(["results", str(exp), "--csv", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert all(tid in out for tid in TRIALS)
    rows = {t["trial_id"]: t for t in json.loads((tmp_path / "r.json").read_text())["trials"]}
    first = next(iter(TRIALS))
    assert rows[first]["params"] == TRIALS[first][0]  # the pickled config came from the trial's params.json
    assert vlptune_main(["promote", str(exp), "--top-k", "1", "--to", str(target), "--map", str(fmap), "--promoted-dir", str(tmp_path / "p")]) == 0
    assert vlptune_main(["importance", str(exp)]) == 0
    assert vlptune_main(["ablate", "--table", str(study)]) == 0
    assert "no-mvm" in capsys.readouterr().out
    assert _board_answers(exp)["runs"] is not None
    assert not mark.exists(), f"a reading command ran the planted payload: {mark.read_text()}"
