"""The report's tables: retrieval and filter figures (formatted by :mod:`capfilt.pipeline.summary`,
as ``capfilt demo`` prints them), the threshold sweep, and the run overview.

Where the summary lacks a filter figure and the per-text parquet has what it takes, the figure is
computed from the parquet (by :func:`capfilt.eval.filter_metrics.filter_report`) and marked so.
"""

from __future__ import annotations

from html import escape
from typing import Any

import pandas as pd

from capfilt.eval.filter_metrics import filter_report
from capfilt.pipeline.demo import STAGES
from capfilt.pipeline.summary import (
    ABLATION_COLUMNS,
    DASH,
    RULE_KEYS,
    Figure,
    ablation_rows,
    demo_figures,
    dig,
    filter_rule,
    fmt_seconds,
    gap_figures,
    has_ablations,
    number,
    retrieval_rows,
    section,
    uses_itm,
)


def kv_table(rows: list[tuple[str, str]], css_class: str = "kv") -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="{css_class}"><tbody>{body}</tbody></table>'


def retrieval_table(summary: dict[str, Any], released: bool = False) -> tuple[str, list[str]]:
    """Baseline vs CapFilt retrieval recall (percent) with the difference; returns (html, notes).
    ``released``: a run of released models, which has no baseline by design."""
    notes = []
    if released:
        notes.append(
            "no baseline: the captioner and filter were released models, so no model was "
            "pretrained on the uncleaned data"
        )
    elif not isinstance(dig(summary, "baseline", "retrieval"), dict):
        notes.append("baseline retrieval results missing (summary.json: baseline.retrieval)")
    if not isinstance(dig(summary, "capfilt", "retrieval"), dict):
        notes.append("CapFilt retrieval results missing (summary.json: capfilt.retrieval)")
    rows = []
    for row in retrieval_rows(summary):
        change = row.change
        cls = "" if change is None or abs(change) < 0.05 else (" up" if change > 0 else " down")
        mean = " mean" if row.key.endswith("mean") else ""
        rows.append(
            f'<tr class="{mean.strip()}" data-key="{row.key}"><th>{escape(row.label)}</th><td>{row.baseline}</td><td>{row.capfilt}</td>'
            f'<td class="diff{cls}">{row.delta}</td></tr>'
        )
    head = "<thead><tr><th>Recall (%)</th><th>Baseline</th><th>CapFilt</th><th>Δ (CapFilt − baseline)</th></tr></thead>"
    return (
        f'<table class="metrics" id="retrieval-table">{head}<tbody>{"".join(rows)}</tbody></table>',
        notes,
    )


def ablation_table(summary: dict[str, Any]) -> str:
    """Every pretrain present (baseline, oracle, filter only, captioner only, CapFilt) and the
    gap CapFilt closes; empty when no ablation ran."""
    if not has_ablations(summary):
        return ""
    head = "".join(
        f"<th>{escape(h)}</th>"
        for h in ("Pretrain", "Data", *(f"{label} (%)" for _, label in ABLATION_COLUMNS))
    )
    body = "".join(
        f'<tr data-key="{escape(row.name)}"><th>{escape(row.label)}</th>'
        f'<td class="data">{escape(row.data)}</td>'
        + "".join(f"<td>{escape(cell)}</td>" for cell in row.cells)
        + "</tr>"
        for row in ablation_rows(summary)
    )
    gaps = "".join(
        f'<tr data-key="{escape(fig.key)}"><th>{escape(fig.label)}</th><td>{escape(fig.text)}</td></tr>'
        for fig in gap_figures(summary)
    )
    return (
        f'<table class="metrics" id="ablation-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
        f'<table class="metrics" id="gap-table"><tbody>{gaps}</tbody></table>'
    )


def filter_threshold(summary: dict[str, Any]) -> float | None:
    """The filter's ITM threshold as the summary gives it; None when its rule does not decide on
    the ITM probability (rule ``itc``), so that no ITM chart draws a line the filter never used."""
    rule = filter_rule(section(summary, "filter"))
    return rule["threshold"] if uses_itm(rule) else None


def _report_from_texts(texts: pd.DataFrame, rule: dict[str, Any] | None) -> dict[str, Any]:
    """``filter_report`` of the per-text parquet by the summary's rule (``{}`` when it cannot be
    computed)."""
    try:
        return filter_report(texts.rename(columns={"itm_score": "score"}), rule=rule)
    except ValueError:
        return {}


def report_filter_figures(summary: dict[str, Any], texts: pd.DataFrame | None) -> list[Figure]:
    """The filter table's figures: the summary's, with gaps filled from the parquet where it can."""
    figures = demo_figures(summary)
    gaps = any(f.text == DASH for f in figures if f.key not in (*RULE_KEYS, "truth_rate"))
    if gaps and texts is not None and not texts.empty:
        rule = filter_rule(section(summary, "filter"))
        figures = demo_figures(summary, _report_from_texts(texts, rule))
    return figures


def _star(source: str) -> str:
    """The mark of a figure the report computed from the per-text tables, not the summary."""
    return f'<span class="star" title="computed from {escape(source)}">*</span>'


def filter_table(
    summary: dict[str, Any], texts: pd.DataFrame | None, source: str = "data/web_filtered"
) -> tuple[str, list[str]]:
    """Filter quality on the web noise, kept fractions, per-noise rejection and caption truth."""
    figures = report_filter_figures(summary, texts)
    computed = any(f.derived for f in figures)
    notes = []
    f = section(summary, "filter")
    if not f:
        notes.append(
            "filter evaluation missing (summary.json: filter)"
            + (
                f"; numbers marked * are computed by the report from the per-text scores in {source}"
                if computed
                else ""
            )
        )
    elif computed:
        notes.append(
            f"numbers marked * are computed by the report from the per-text scores in {source}"
        )
    notes += [f"filter evaluation: {n}" for n in f.get("notes") or [] if isinstance(n, str)]
    if not section(summary, "captions"):
        notes.append(
            "synthetic caption truth rate: `capfilt demo` computes it (it needs the truth the "
            "built-in benchmark stores with its images)"
        )
    body = [
        f'<tr data-key="{escape(fig.key)}"><th>{escape(fig.label)}</th><td>{fig.text}{_star(source) if fig.derived else ""}</td></tr>'
        for fig in figures
    ]
    head = "<thead><tr><th>Filter and captioner</th><th>Value</th></tr></thead>"
    return (
        f'<table class="metrics" id="filter-table">{head}<tbody>{"".join(body)}</tbody></table>',
        notes,
    )


def sweep_rows(summary: dict[str, Any]) -> list[dict[str, float | None]]:
    """The filter's threshold sweep (``filter_report``'s ``sweep``), kept fractions as kept_web / kept_synthetic."""
    sweep = dig(summary, "filter", "sweep")
    if not isinstance(sweep, list):
        return []
    rows = []
    for r in sweep:
        if not isinstance(r, dict) or number(r.get("threshold")) is None:
            continue
        rows.append(
            {
                "threshold": number(r["threshold"]),
                "precision": number(r.get("precision")),
                "recall": number(r.get("recall")),
                "f1": number(r.get("f1")),
                "kept_web": number(r.get("web_kept_fraction")),
                "kept_synthetic": number(r.get("synthetic_kept_fraction")),
            }
        )
    return sorted(rows, key=lambda r: r["threshold"])


def _flatten(d: dict[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    out = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth < 2:
            out += _flatten(value, f"{name}.", depth + 1)
        elif isinstance(value, bool) or isinstance(value, str):
            out.append((name, str(value)))
        elif number(value) is not None:
            v = number(value)
            out.append((name, f"{int(v):,}" if v == int(v) else f"{v:.4g}"))
    return out


def overview_tables(summary: dict[str, Any]) -> tuple[str, str]:
    """(timings table, data counts table) as HTML; empty notes where absent."""
    timings = summary.get("timings") if isinstance(summary.get("timings"), dict) else {}
    order = {name: i for i, name in enumerate(STAGES)}
    stages = sorted(
        timings, key=lambda k: order.get(str(k), len(order))
    )  # stable: others keep order
    rows = [(str(k), fmt_seconds(timings[k])) for k in stages if number(timings[k]) is not None]
    if rows:
        total = sum(number(s) for s in timings.values() if number(s) is not None)
        rows.append(("total", fmt_seconds(total)))
        timing_html = kv_table(rows, "kv timings")
    else:
        timing_html = '<p class="note">No timings in summary.json.</p>'
    data = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    flat = _flatten(data)[:40]
    data_html = (
        kv_table(flat, "kv data") if flat else '<p class="note">No data counts in summary.json.</p>'
    )
    return timing_html, data_html
