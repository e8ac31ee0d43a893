"""Hyperparameter importance from a search's stored Optuna study (``vlptune importance``).

Two of Optuna's evaluators (``optuna.importance``):

* **fANOVA** (``FanovaImportanceEvaluator``): a random forest fitted to
  (parameters -> metric) and the variance of the metric each parameter
  explains. Needs scikit-learn. Assesses only parameters present in every
  trial it uses, so a conditional parameter (``when:``) is left out when some
  trial lacks it.
* **PED-ANOVA** (``PedAnovaImportanceEvaluator``): how differently each
  parameter is distributed in the top ``target_quantile`` of the trials than
  in all of them (Pearson divergence of Parzen estimators). Handles
  conditional parameters.

Both read COMPLETE trials only: a trial the scheduler stopped early (PRUNED)
has no final value and is not used by either, nor is a failed one; the table
says how many trials were used and how many were not. With fewer than
``min_trials`` completed trials the computation is refused.

Output: a table on the console, ``importance.md`` and ``importance.csv`` in
the experiment directory, and the same table as TensorBoard text in the run
``EXP_DIR/tb/importance`` (the Text tab of ``vlptune board EXP_DIR``).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlptune.io import atomic_write_text
from vlptune.search.layout import REPEAT_ATTR, TB_DIR, SearchError, read_meta, study_url

EVALUATORS = ("fanova", "ped-anova")
EVALUATOR_CHOICES = (*EVALUATORS, "both")
MIN_TRIALS_FLOOR = 2  # both evaluators return equal (meaningless) importances below this
DEFAULT_MIN_TRIALS = 3
TRIALS_PER_PARAM = 5  # below this many completed trials per assessed parameter, the table says the numbers are rough
DEFAULT_SEED = 0
DEFAULT_N_TREES = 64  # Optuna's fANOVA default
DEFAULT_TARGET_QUANTILE = 0.1  # Optuna's PED-ANOVA default: importance for reaching the top 10%
MARKDOWN_FILE = "importance.md"
CSV_FILE = "importance.csv"
TB_RUN = "importance"
TB_TAG = "hyperparameter_importance"


class ImportanceError(ValueError):
    """Importances that cannot be computed (names the experiment and the reason)."""


@dataclass
class Importance:
    evaluator: str
    values: dict[str, float]  # parameter -> normalised importance (sums to 1), most important first
    used: int  # completed trials the evaluator read
    params: list[str]  # parameters assessed
    left_out: list[str] = field(default_factory=list)  # searched parameters not assessed (and why, in notes)
    notes: list[str] = field(default_factory=list)


@dataclass
class StudyCounts:
    complete: int
    pruned: int
    failed: int
    other: int


def open_study(exp_dir: str | Path):
    """The Optuna study of a search experiment (its storage URL and name are in the experiment's meta)."""
    import optuna  # optuna: heavy, only when a study is opened

    try:
        meta = read_meta(exp_dir)
    except SearchError as exc:
        raise ImportanceError(str(exc)) from None
    if not meta.get("storage_url"):
        raise ImportanceError(
            f"{exp_dir}: this experiment has no Optuna study (kind {meta.get('kind', 'search')!r}: an ablation or promoted run has no searcher); give a search experiment"
        )
    # the experiment's own optuna.db wherever the directory now is, else the stored URL
    url = study_url(meta, exp_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise ImportanceError(f"{exp_dir}: the study's SQLite file {url[len('sqlite:///') :]} does not exist (did the search start?)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=meta["study_name"], storage=url)
    except Exception as exc:
        raise ImportanceError(f"{exp_dir}: cannot open the Optuna study {meta.get('study_name')!r} at {url}: {exc}") from None
    return study, meta


def count_trials(study: Any) -> StudyCounts:
    from optuna.trial import TrialState  # optuna: heavy, only when a study is read

    trials = study.get_trials(deepcopy=False)
    by = {s: sum(1 for t in trials if t.state == s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    return StudyCounts(by[TrialState.COMPLETE], by[TrialState.PRUNED], by[TrialState.FAIL], len(trials) - sum(by.values()))


def _evaluator(name: str, seed: int, n_trees: int, target_quantile: float):
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator  # optuna: heavy, only when importances are computed

    if name == "fanova":
        try:
            import sklearn  # noqa: F401  # fANOVA's forest: only checked for when fANOVA is asked for
        except ImportError:  # pragma: no cover - scikit-learn is a dependency
            raise ImportanceError("fANOVA needs scikit-learn (pip install scikit-learn); or use --evaluator ped-anova") from None
        return FanovaImportanceEvaluator(n_trees=n_trees, seed=seed)
    if name == "ped-anova":
        return PedAnovaImportanceEvaluator(target_quantile=target_quantile)
    raise ImportanceError(f"--evaluator: expected one of {', '.join(EVALUATOR_CHOICES)}, got {name!r}")


def compute(
    study: Any,
    evaluator: str,
    *,
    searched: list[str] | None = None,
    min_trials: int = DEFAULT_MIN_TRIALS,
    seed: int = DEFAULT_SEED,
    n_trees: int = DEFAULT_N_TREES,
    target_quantile: float = DEFAULT_TARGET_QUANTILE,
    source: str = "study",
) -> Importance:
    """Importances of one evaluator over the study's completed trials."""
    import optuna  # optuna: heavy, only when importances are computed
    from optuna.trial import TrialState  # optuna: as above

    if min_trials < MIN_TRIALS_FLOOR:
        raise ImportanceError(f"--min-trials: expected at least {MIN_TRIALS_FLOOR} (below that both evaluators return equal importances), got {min_trials}")
    if not 0.0 < target_quantile < 1.0:
        raise ImportanceError(f"--target-quantile: expected a fraction strictly between 0 and 1, got {target_quantile}")
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None and math.isfinite(t.value)]
    counts = count_trials(study)
    if len(complete) < min_trials:
        raise ImportanceError(
            f"{source}: {len(complete)} completed trial(s) with a finite value; {evaluator} needs at least {min_trials} (--min-trials). "
            f"{counts.pruned} pruned and {counts.failed} failed trial(s) are not used: neither evaluator reads a trial without a final value. "
            "Run more trials (num_samples), or a gentler scheduler so more trials reach the last step"
        )
    seen = list(dict.fromkeys(k for t in complete for k in t.params))
    searched = list(searched or seen)
    notes = [f"used {len(complete)} completed trial(s); not used: {counts.pruned} pruned, {counts.failed} failed ({evaluator} reads completed trials only)"]
    repeats = sum(1 for t in complete if REPEAT_ATTR in t.user_attrs)
    if repeats:
        notes.append(f"{repeats} of them repeat an earlier trial's values and carry its value (searcher.repeats: reuse; nothing was trained for them)")
    left_out: list[str] = [p for p in searched if p not in seen]
    if left_out:
        notes.append(f"never sampled in a completed trial: {', '.join(left_out)}")
    params = [p for p in searched if p in seen]
    if evaluator == "fanova":
        everywhere = [p for p in params if all(p in t.params for t in complete)]
        partial = [p for p in params if p not in everywhere]
        if partial:
            notes.append(f"fANOVA assesses parameters present in every trial; left out (conditional): {', '.join(partial)}")
            left_out += partial
        params = everywhere
    if not params:
        raise ImportanceError(f"{source}: no parameter to assess with {evaluator} (searched: {', '.join(searched) or 'none'})")
    if len({t.value for t in complete}) < MIN_TRIALS_FLOOR:
        raise ImportanceError(
            f"{source}: all {len(complete)} completed trials have the same value ({complete[0].value:g}); no parameter explains a difference that is not there"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study, evaluator=_evaluator(evaluator, seed, n_trees, target_quantile), params=params)
        except RuntimeError as exc:  # fANOVA: "zero total variance in all trees" (too few distinct points)
            raise ImportanceError(f"{source}: {evaluator} could not split the {len(complete)} completed trials ({exc}); run more trials") from None
    for w in caught:
        text = str(w.message).strip()
        if text and text not in notes and not issubclass(w.category, (DeprecationWarning, optuna.exceptions.ExperimentalWarning)):
            notes.append(f"optuna: {text}")
    if len(complete) < TRIALS_PER_PARAM * len(params):
        notes.append(
            f"{len(complete)} trials for {len(params)} parameters (fewer than {TRIALS_PER_PARAM} per parameter): these importances are rough; read the order of the clear leaders, not the numbers"
        )
    ordered = dict(sorted(((k, float(v)) for k, v in values.items()), key=lambda kv: -kv[1]))
    return Importance(evaluator, ordered, len(complete), params, left_out, notes)


def importances(exp_dir: str | Path, evaluator: str = "both", **kwargs: Any) -> list[Importance]:
    """Importances of a search experiment's study (``evaluator``: fanova, ped-anova or both)."""
    if evaluator not in EVALUATOR_CHOICES:
        raise ImportanceError(f"--evaluator: expected one of {', '.join(EVALUATOR_CHOICES)}, got {evaluator!r}")
    study, meta = open_study(exp_dir)
    names = EVALUATORS if evaluator == "both" else (evaluator,)
    return [compute(study, name, searched=list(meta.get("parameters") or []) or None, source=str(exp_dir), **kwargs) for name in names]


# ------------------------------------------------------------------ output


def table_rows(results: list[Importance]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows: one row per parameter, one column per evaluator (most important first by the first)."""
    header = ["parameter", *[r.evaluator for r in results]]
    order: list[str] = []
    for r in results:
        order += [p for p in r.values if p not in order]
        order += [p for p in r.left_out if p not in order]
    rows = [[p, *[r.values.get(p) for r in results]] for p in order]
    return header, rows


def format_markdown(results: list[Importance], metric: str | None = None) -> str:
    header, rows = table_rows(results)
    lines = []
    if metric:
        lines.append(f"hyperparameter importance for {metric} (normalised: each column sums to 1; '-' = not assessed)")
        lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        lines.append("| " + " | ".join([row[0], *("-" if v is None else f"{v:.3f}" for v in row[1:])]) + " |")
    lines.append("")
    for r in results:
        for note in r.notes:
            lines.append(f"- {r.evaluator}: {note}")
    return "\n".join(lines) + "\n"


def format_csv(results: list[Importance]) -> str:
    header, rows = table_rows(results)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        writer.writerow([row[0], *("" if v is None else f"{v:.6f}" for v in row[1:])])
    return buf.getvalue()


def write_outputs(exp_dir: str | Path, results: list[Importance], metric: str | None = None) -> list[Path]:
    """importance.md, importance.csv and TensorBoard text (run ``tb/importance``) in the experiment directory."""
    from torch.utils.tensorboard import SummaryWriter  # torch, tensorboard: heavy, only when the outputs are written

    exp_dir = Path(exp_dir)
    text = format_markdown(results, metric)
    md, cs = exp_dir / MARKDOWN_FILE, exp_dir / CSV_FILE
    atomic_write_text(md, text)
    atomic_write_text(cs, format_csv(results))
    tb = exp_dir / TB_DIR / TB_RUN
    writer = SummaryWriter(log_dir=str(tb))
    try:
        writer.add_text(TB_TAG, text)
    finally:
        writer.close()
    return [md, cs, tb]
