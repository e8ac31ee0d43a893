"""The table of an ablation study: statistics per metric and variant, as rows, Markdown and CSV.

:func:`study_table` turns :class:`~vlptune.study.ablation.StudyResults` into
one row per metric and variant (mean, std, the difference to the baseline
with its Welch confidence interval and p-value, from :mod:`vlptune.study.stats`);
:func:`format_markdown` and :func:`format_csv` write the rows out;
:func:`summary_table` puts them side by side, one row per variant and one
column per metric (mean ± std, Δ to the baseline with its interval): the shape
of the papers' ablation tables, e.g. SOHO's Table 7 with the downstream metrics
``downstream/retrieval/tr_r1``, ``downstream/vqa/score``, ...
(:func:`vlptune.study.ablation.write_study_outputs` puts them in the
experiment directory).
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from vlptune.study import stats

if TYPE_CHECKING:  # ablation.py imports this module: the annotation only
    from vlptune.study.ablation import StudyResults

TABLE_COLUMNS = ("metric", "variant", "is_baseline", "n", "mean", "std", "diff", "ci_low", "ci_high", "df", "t", "p", "confidence", "note")


def study_table(results: StudyResults) -> list[dict[str, Any]]:
    """One row per metric and variant (primary metric first, baseline first), keys :data:`TABLE_COLUMNS`."""
    rows = []
    for metric in results.metrics:
        base_values = results.values(results.baseline, metric)
        for variant in results.variants:
            values = results.values(variant, metric)
            summary = stats.summarize(values)
            row: dict[str, Any] = {
                "metric": metric,
                "variant": variant,
                "is_baseline": variant == results.baseline,
                "n": summary.n,
                "mean": summary.mean,
                "std": summary.std,
                "diff": None,
                "ci_low": None,
                "ci_high": None,
                "df": None,
                "t": None,
                "p": None,
                "confidence": results.confidence,
                "note": None,
            }
            finished = len(results.runs[variant])
            if finished and not values:
                row["note"] = f"not reported by this variant's {finished} finished trial(s) (its objectives do not produce {metric})"
            elif variant == results.baseline:
                row["note"] = "baseline" if summary.n >= stats.MIN_SEEDS else f"baseline; {summary.n} finished seed(s): no standard deviation"
            elif results.runs[results.baseline] and not base_values:
                row["note"] = f"the baseline does not report {metric} (its objectives do not produce it): nothing to compare"
            else:
                cmp = stats.compare(values, base_values, results.confidence)
                row.update(diff=cmp.diff, ci_low=cmp.ci_low, ci_high=cmp.ci_high, df=cmp.df, t=cmp.t, p=cmp.p, note=cmp.note)
            rows.append(row)
    return rows


# ------------------------------------------------------------------ text


def _num(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return ""
    text = f"{value:+.{digits}g}" if sign else f"{value:.{digits}g}"
    return text


def _p(value: float | None) -> str:
    if value is None:
        return ""
    return "< 0.0001" if value < 1e-4 else f"{value:.3g}"


def _cell(row: dict[str, Any]) -> str:
    """``mean ± std`` and, for a variant compared with the baseline, ``Δ [low, high]``."""
    if row["mean"] is None:
        return "-"
    text = _num(row["mean"]) if row["std"] is None else f"{_num(row['mean'])} ± {_num(row['std'], 3)}"
    if row["diff"] is not None:
        ci = f" [{_num(row['ci_low'], 3, sign=True)}, {_num(row['ci_high'], 3, sign=True)}]" if row["ci_low"] is not None else ""
        text += f"; Δ {_num(row['diff'], 3, sign=True)}{ci}"
    return text


def summary_table(results: StudyResults, rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the side-by-side table: one row per variant (baseline first), one column per metric."""
    short = [metric.removeprefix("downstream/") for metric in results.metrics]
    level = f"{results.confidence:.0%}"
    out = [
        f"| variant | {' | '.join(short)} |",
        "|---|" + "---|" * len(short),
    ]
    for variant in results.variants:
        cells = [_cell(r) for metric in results.metrics for r in rows if r["metric"] == metric and r["variant"] == variant]
        name = f"{variant} (baseline)" if variant == results.baseline else variant
        out.append(f"| {name} | {' | '.join(cells)} |")
    return [*out, "", f"Each cell: mean ± std over the finished seeds; Δ: the difference to {results.baseline} with its {level} interval."]


def format_markdown(results: StudyResults, rows: list[dict[str, Any]] | None = None) -> str:
    """The table as Markdown: one section per metric, one line per variant, then what is missing."""
    rows = study_table(results) if rows is None else rows
    level = f"{results.confidence:.0%}"
    done = sum(len(v) for v in results.runs.values())
    total = len(results.variants) * len(results.seeds)
    out = [f"# Ablation: {results.name}", ""]
    if results.description:
        out += [results.description.strip(), ""]
    out += [
        f"{len(results.variants)} variants x {len(results.seeds)} seeds (train.seed {', '.join(str(s) for s in results.seeds)}), "
        f"each trained to step {results.max_fidelity}; {done} of {total} trials finished. Experiment: `{results.exp_dir}`.",
        "",
        f"mean ± std: over the finished seeds (sample std, ddof=1). Δ: variant mean - baseline mean. "
        f"{level} CI: Welch-Satterthwaite degrees of freedom, Student t quantile. p: Welch's two-sided t-test (unequal variances).",
    ]
    if len(results.metrics) > 1:
        out += ["", "## Summary", "", *summary_table(results, rows)]
    for metric in results.metrics:
        better = {"max": "higher is better", "min": "lower is better"}[results.mode] if metric == results.metric else ""
        title = f"{metric} (primary, {better})" if better else metric
        out += ["", f"## {title}", "", f"| variant | n | mean ± std | Δ vs {results.baseline} | {level} CI | p | note |", "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["metric"] == metric):
            name = f"{r['variant']} (baseline)" if r["is_baseline"] else r["variant"]
            if r["mean"] is None:
                cell = "-"
            elif r["std"] is None:
                cell = _num(r["mean"])
            else:
                cell = f"{_num(r['mean'])} ± {_num(r['std'], 3)}"
            ci = f"[{_num(r['ci_low'], sign=True)}, {_num(r['ci_high'], sign=True)}]" if r["ci_low"] is not None else ""
            note = "" if r["is_baseline"] and r["note"] == "baseline" else (r["note"] or "")
            out.append(f"| {name} | {r['n']} | {cell} | {_num(r['diff'], sign=True)} | {ci} | {_p(r['p'])} | {note} |")
    missing = [t for v in results.variants for t in results.unfinished(v)]
    absent = [(v, s) for v in results.variants for s in results.seeds if not any(t.variant == v and t.seed == s for t in results.trials)]
    if missing or absent:
        out += ["", "## Not finished (left out of the statistics)", ""]
        for t in missing:
            why = t.status if not t.error or t.status != "error" else f"error: {t.error}"
            out.append(f"- {t.variant}, seed {t.seed} (trial {t.trial_id}): {why}, last step {t.step if t.step is not None else '-'}")
        for v, s in absent:
            out.append(f"- {v}, seed {s}: not started")
    return "\n".join(out) + "\n"


def format_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r[k] is None else r[k]) for k in TABLE_COLUMNS})
    return buf.getvalue()
