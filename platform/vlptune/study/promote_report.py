"""How well did the light ranking predict the full one? (``vlptune promote --report``)

Pure functions over numbers (:func:`rank_report`, :func:`format_report`) and
one reader (:func:`collect_report`) that pairs each promoted config's light
metric (its search trial's final value, from the promotion record) with its
full metric (the mean over seeds of the promoted run, from the ablation
study's results).

Rank correlations are ``scipy.stats.spearmanr`` and ``scipy.stats.kendalltau``
(tau-b) over the configs that have both numbers. They do not depend on the
metric's direction (both rankings use the same metric); the winners do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlptune.io import atomic_write_text, finite
from vlptune.study.promote import read_promotion_record

DEFAULT_MIN_CORRELATION = 0.0  # Spearman's rho at or below this: the light ranking did not predict the full one
MIN_CONFIGS_FOR_CORRELATION = 2  # pairs below which a rank correlation is undefined
SIGN_ONLY_CONFIGS = 2  # with exactly this many pairs a rank correlation is +1 or -1: a sign, not evidence


@dataclass
class PairRow:
    name: str
    light: float | None
    full: float | None  # mean over seeds
    full_n: int  # seeds that reported the metric
    light_rank: int | None = None  # 1 = best
    full_rank: int | None = None


@dataclass
class RankReport:
    metric: str
    mode: str
    rows: list[PairRow]
    n: int  # configs with both numbers
    spearman: float | None
    spearman_p: float | None
    kendall: float | None
    kendall_p: float | None
    light_winner: str | None
    full_winner: str | None
    same_winner: bool | None
    predicted: bool | None  # None when there are too few pairs to say
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _ranks(values: dict[str, float], mode: str) -> dict[str, int]:
    """Competition ranks, 1 = best by ``mode`` (ties share the better rank)."""
    ordered = sorted(values.values(), reverse=mode == "max")
    return {name: ordered.index(v) + 1 for name, v in values.items()}


def _best(values: dict[str, float], mode: str) -> str | None:
    if not values:
        return None
    pick = max if mode == "max" else min
    return pick(values, key=lambda k: values[k])


def _nan_to_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def rank_report(
    names: Sequence[str],
    light: Sequence[float | None],
    full: Sequence[float | None],
    *,
    metric: str,
    mode: str,
    full_n: Sequence[int] | None = None,
    min_correlation: float = DEFAULT_MIN_CORRELATION,
) -> RankReport:
    """Compare light and full values of the same configs (same order in the three sequences)."""
    from scipy import stats  # scipy: heavy, only when a report is computed

    if mode not in ("max", "min"):
        raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
    if not (len(names) == len(light) == len(full)):
        raise ValueError(f"names, light and full must have the same length; got {len(names)}, {len(light)}, {len(full)}")
    if not -1.0 <= min_correlation <= 1.0:
        raise ValueError(f"min_correlation: expected a value in [-1, 1], got {min_correlation}")
    counts = list(full_n) if full_n is not None else [1 if finite(v) else 0 for v in full]
    rows = [PairRow(str(n), float(l) if finite(l) else None, float(f) if finite(f) else None, int(c)) for n, l, f, c in zip(names, light, full, counts)]
    paired = [r for r in rows if r.light is not None and r.full is not None]
    notes: list[str] = []
    warnings: list[str] = []
    missing = [r.name for r in rows if r.full is None]
    if missing:
        notes.append(f"no full result for {', '.join(missing)} (not finished, failed or non-finite); left out of the comparison")
    light_vals = {r.name: r.light for r in paired if r.light is not None}  # paired: both are set
    full_vals = {r.name: r.full for r in paired if r.full is not None}
    for name, rank in _ranks(light_vals, mode).items():
        next(r for r in rows if r.name == name).light_rank = rank
    for name, rank in _ranks(full_vals, mode).items():
        next(r for r in rows if r.name == name).full_rank = rank
    n = len(paired)
    rho = rho_p = tau = tau_p = None
    if n >= MIN_CONFIGS_FOR_CORRELATION:
        x = [r.light for r in paired]
        y = [r.full for r in paired]
        if len(set(x)) > 1 and len(set(y)) > 1:
            s = stats.spearmanr(x, y)
            k = stats.kendalltau(x, y)
            rho, rho_p = _nan_to_none(s.statistic), _nan_to_none(s.pvalue)
            tau, tau_p = _nan_to_none(k.statistic), _nan_to_none(k.pvalue)
        else:
            notes.append("all light values or all full values are equal: a rank correlation is undefined")
    else:
        notes.append(f"{n} config(s) with both a light and a full result: a rank correlation needs at least {MIN_CONFIGS_FOR_CORRELATION}")
    if n == SIGN_ONLY_CONFIGS:
        notes.append(
            "with 2 configs a rank correlation can only be +1 or -1: it is a sign (same order or swapped), not evidence of how well light predicts full"
        )
    light_winner, full_winner = _best(light_vals, mode), _best(full_vals, mode)
    same = None if n < MIN_CONFIGS_FOR_CORRELATION else light_winner == full_winner
    predicted: bool | None = None
    if n >= MIN_CONFIGS_FOR_CORRELATION:
        predicted = bool(same) and (rho is None or rho > min_correlation)
        if same is False:
            warnings.append(
                f"the light winner ({light_winner}) is not the full winner ({full_winner}): promoting only the light winner would have picked the wrong config"
            )
        if rho is not None and rho <= min_correlation:
            order = "reversed" if rho < 0 else "unrelated"
            warnings.append(
                f"the light ranking did not predict the full one: Spearman rho = {rho:.3g} (Kendall tau = {tau:.3g}), the full order is {order} to the light order; trust the light search less for these knobs (longer light runs, or promote more configs)"
            )
    return RankReport(metric, mode, rows, n, rho, rho_p, tau, tau_p, light_winner, full_winner, same, predicted, notes, warnings)


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def format_report(report: RankReport) -> str:
    """The report as Markdown: a table per config, then correlations, winners, notes and warnings."""
    lines = [
        f"| config | light {report.metric} | light rank | full {report.metric} (mean) | seeds | full rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        lines.append(f"| {r.name} | {_f(r.light)} | {r.light_rank or '-'} | {_f(r.full)} | {r.full_n} | {r.full_rank or '-'} |")
    lines.append("")
    lines.append(f"configs compared: {report.n} ({report.mode} is better)")
    lines.append(f"Spearman rho: {_f(report.spearman, 3)} (p {_f(report.spearman_p, 3)}); Kendall tau: {_f(report.kendall, 3)} (p {_f(report.kendall_p, 3)})")
    if report.same_winner is not None:
        verdict = "yes" if report.same_winner else "no"
        lines.append(f"light winner {report.light_winner} is the full winner: {verdict} (full winner: {report.full_winner})")
    for note in report.notes:
        lines.append(f"note: {note}")
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    if report.predicted:
        lines.append("the light ranking predicted the full one for these configs")
    return "\n".join(lines)


# ------------------------------------------------------------------ reading a promoted run


def full_means(study_results: Any, metric: str, names: Sequence[str]) -> dict[str, tuple[float | None, int]]:
    """Variant name -> (mean of ``metric`` over its finished seeds, how many), from ``collect_study``'s results."""
    out: dict[str, tuple[float | None, int]] = {}
    for name in names:
        values = [float(v) for v in study_results.values(name, metric) if finite(v)]
        out[name] = (math.fsum(values) / len(values) if values else None, len(values))
    return out


def collect_report(promoted_exp: Any, *, min_correlation: float = DEFAULT_MIN_CORRELATION) -> tuple[RankReport, Any]:
    """Pair light and full results of a promoted run's experiment directory."""
    from vlptune.study.ablation import collect_study  # scipy (via study.stats): heavy, only when a study runs or is read

    promotion, _ = read_promotion_record(promoted_exp)
    study_results = collect_study(promoted_exp)
    names = [t.trial_id for t in promotion.trials]
    means = full_means(study_results, promotion.metric, names)
    light = [t.metric_value for t in promotion.trials]
    full = [means.get(n, (None, 0))[0] for n in names]
    counts = [means.get(n, (None, 0))[1] for n in names]
    report = rank_report(names, light, full, metric=promotion.metric, mode=promotion.mode, full_n=counts, min_correlation=min_correlation)
    return report, promotion


REPORT_FILE = "promotion_report.md"


def report_header(promotion: Any, promoted_exp: Any) -> str:
    return (
        f"promotion report: {promoted_exp}\n"
        f"  light: {promotion.source_experiment} (final fidelity step {promotion.max_fidelity}); full: {promotion.target}; metric {promotion.metric} ({promotion.mode})"
    )


def write_report(promoted_exp: Any, promotion: Any, report: RankReport) -> Any:
    """``promotion_report.md`` in the promoted run's experiment directory."""
    path = Path(promoted_exp) / REPORT_FILE
    atomic_write_text(path, f"# Promotion report\n\n{report_header(promotion, promoted_exp)}\n\n{format_report(report)}\n")
    return path
