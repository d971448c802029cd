"""The report's numbers: formatting, the retrieval and filter tables, and the run overview.

``summary.json`` may come from different versions of the demo, so the filter section accepts
both the names of the demo summary (``roc_auc``, ``kept_fraction_web``, ``by_noise``) and those of
``capfilt eval filter`` (``auc``, ``origins.web.kept_frac``, ``rejection_by_noise``). Where the
summary lacks a filter number and the per-text parquet has what it takes, the number is
computed from the parquet and marked so.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from capfilt.pipeline.demo import STAGES as STAGE_ORDER  # the demo's stages, in pipeline order

DASH = "—"
STAR = '<span class="star" title="computed from data/web_filtered">*</span>'

RETRIEVAL_ROWS = (
    ("tr_r1", "Text retrieval R@1"),
    ("tr_r5", "Text retrieval R@5"),
    ("tr_r10", "Text retrieval R@10"),
    ("ir_r1", "Image retrieval R@1"),
    ("ir_r5", "Image retrieval R@5"),
    ("ir_r10", "Image retrieval R@10"),
    ("tr_mean", "Text retrieval mean"),
    ("ir_mean", "Image retrieval mean"),
    ("r_mean", "Mean of all"),
)


def number(value: Any) -> float | None:
    """``value`` as a finite float, else None (bools, strings, NaN and missing all give None)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def fmt(value: Any, digits: int = 3) -> str:
    v = number(value)
    return DASH if v is None else f"{v:.{digits}f}"


def fmt_pct(fraction: Any, digits: int = 1) -> str:
    v = number(fraction)
    return DASH if v is None else f"{100 * v:.{digits}f}%"


def fmt_seconds(seconds: Any) -> str:
    s = number(seconds)
    if s is None:
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _dig(d: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _first(*values: Any) -> float | None:
    return next((number(v) for v in values if number(v) is not None), None)


def kv_table(rows: list[tuple[str, str]], css_class: str = "kv") -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="{css_class}"><tbody>{body}</tbody></table>'


def retrieval_table(summary: dict[str, Any]) -> tuple[str, list[str]]:
    """Baseline vs CapFilt retrieval recall (percent) with the difference; returns (html, notes)."""
    base = _dig(summary, "baseline", "retrieval")
    cap = _dig(summary, "capfilt", "retrieval")
    notes = []
    if not isinstance(base, dict):
        notes.append("baseline retrieval results missing (summary.json: baseline.retrieval)")
        base = {}
    if not isinstance(cap, dict):
        notes.append("CapFilt retrieval results missing (summary.json: capfilt.retrieval)")
        cap = {}
    rows = []
    for key, label in RETRIEVAL_ROWS:
        b, c = number(base.get(key)), number(cap.get(key))
        diff = None if b is None or c is None else c - b
        cls = "" if diff is None or abs(diff) < 0.05 else (" up" if diff > 0 else " down")
        diff_s = DASH if diff is None else f"{diff:+.1f}"
        mean = " mean" if key.endswith("mean") else ""
        rows.append(
            f'<tr class="{mean.strip()}" data-key="{key}"><th>{escape(label)}</th><td>{fmt(b, 1)}</td><td>{fmt(c, 1)}</td>'
            f'<td class="diff{cls}">{diff_s}</td></tr>'
        )
    head = "<thead><tr><th>Recall (%)</th><th>Baseline</th><th>CapFilt</th><th>Δ (CapFilt − baseline)</th></tr></thead>"
    return (
        f'<table class="metrics" id="retrieval-table">{head}<tbody>{"".join(rows)}</tbody></table>',
        notes,
    )


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC by ranks (ties averaged): how well ``scores`` put positives above negatives."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def filter_stats_from_texts(texts: pd.DataFrame | None) -> dict[str, Any]:
    """Filter numbers computed from the per-text parquet (whatever its columns allow)."""
    if texts is None or texts.empty:
        return {}
    out: dict[str, Any] = {}
    for origin in ("web", "synthetic"):
        rows = texts[texts["origin"] == origin]
        if len(rows):
            out[f"kept_fraction_{origin}"] = float(rows["kept"].mean())
    if "clean" not in texts.columns:
        return out
    web = texts[(texts["origin"] == "web") & texts["clean"].notna()]
    if web.empty:
        return out
    noisy = ~web["clean"].astype(bool).to_numpy()
    rejected = ~web["kept"].to_numpy()
    tp = int((rejected & noisy).sum())
    precision = tp / rejected.sum() if rejected.sum() else None
    recall = tp / noisy.sum() if noisy.sum() else None
    out["precision"], out["recall"] = precision, recall
    if precision is not None and recall is not None:
        out["f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    scores = web["itm_score"].to_numpy(dtype=float)
    ok = np.isfinite(scores)
    out["roc_auc"] = _auc(scores[ok], ~noisy[ok])
    if "noise" in web.columns:
        kinds = web["noise"].fillna("none").astype(str).to_numpy()
        out["by_noise"] = {k: float(rejected[kinds == k].mean()) for k in sorted(set(kinds))}
    return out


def _rate(value: Any) -> float | None:
    """A per-noise-kind rejection rate given as a number or as ``{"rejected_frac"|"rejection_rate": x}``."""
    if isinstance(value, dict):
        return _first(value.get("rejection_rate"), value.get("rejected_frac"), value.get("rate"))
    return number(value)


def filter_numbers(
    summary: dict[str, Any], texts: pd.DataFrame | None
) -> tuple[dict[str, Any], set[str]]:
    """The filter table's numbers; also the set of names computed from the parquet."""
    f = summary.get("filter") if isinstance(summary.get("filter"), dict) else {}
    vals: dict[str, Any] = {
        "threshold": _first(f.get("threshold")),
        "precision": _first(f.get("precision")),
        "recall": _first(f.get("recall")),
        "f1": _first(f.get("f1")),
        "roc_auc": _first(f.get("roc_auc"), f.get("auc")),
        "kept_fraction_web": _first(
            f.get("kept_fraction_web"),
            _dig(f, "origins", "web", "kept_frac"),
            _dig(f, "origins", "web", "kept_fraction"),
        ),
        "kept_fraction_synthetic": _first(
            f.get("kept_fraction_synthetic"),
            _dig(f, "origins", "synthetic", "kept_frac"),
            _dig(f, "origins", "synthetic", "kept_fraction"),
        ),
    }
    by_noise = (
        f.get("by_noise") if isinstance(f.get("by_noise"), dict) else f.get("rejection_by_noise")
    )
    vals["by_noise"] = (
        {str(k): _rate(v) for k, v in by_noise.items()} if isinstance(by_noise, dict) else {}
    )
    computed: set[str] = set()
    if any(v is None for k, v in vals.items() if k != "threshold") or not vals["by_noise"]:
        derived = filter_stats_from_texts(texts)
        for key, value in derived.items():
            if key == "by_noise":
                if not vals["by_noise"] and value:
                    vals["by_noise"], computed = value, computed | {key}
            elif vals.get(key) is None and number(value) is not None:
                vals[key] = value
                computed.add(key)
    return vals, computed


def filter_table(summary: dict[str, Any], texts: pd.DataFrame | None) -> tuple[str, list[str]]:
    """Filter quality on the web noise, kept fractions, per-noise rejection and caption truth."""
    vals, computed = filter_numbers(summary, texts)
    notes = []
    if not isinstance(summary.get("filter"), dict) or not summary["filter"]:
        notes.append(
            "filter evaluation missing (summary.json: filter)"
            + ("; numbers marked * computed from data/web_filtered" if computed else "")
        )
    elif computed:
        notes.append("numbers marked * are computed from data/web_filtered (not in summary.json)")
    f = summary.get("filter") if isinstance(summary.get("filter"), dict) else {}
    notes += [f"filter evaluation: {n}" for n in f.get("notes") or [] if isinstance(n, str)]

    def star(key: str) -> str:
        return STAR if key in computed else ""

    thr = fmt(vals["threshold"], 2)
    rows = [
        ("threshold", "ITM threshold (keep if score &gt; t)", thr),
        ("precision", "Precision (rejected texts that are noisy)", fmt(vals["precision"])),
        ("recall", "Recall (noisy web texts rejected)", fmt(vals["recall"])),
        ("f1", "F1", fmt(vals["f1"])),
        ("roc_auc", "ROC AUC (score: clean vs noisy)", fmt(vals["roc_auc"])),
        ("kept_fraction_web", "Kept fraction, web texts", fmt_pct(vals["kept_fraction_web"])),
        (
            "kept_fraction_synthetic",
            "Kept fraction, synthetic captions",
            fmt_pct(vals["kept_fraction_synthetic"]),
        ),
    ]
    body = [
        f'<tr data-key="{k}"><th>{label}</th><td>{v}{star(k)}</td></tr>' for k, label, v in rows
    ]
    for kind, rate in sorted(vals["by_noise"].items(), key=lambda kv: (kv[0] == "none", kv[0])):
        label = (
            "False rejection rate (clean web texts)"
            if kind == "none"
            else f"Rejection rate, noise “{kind}”"
        )
        body.append(
            f'<tr data-key="by_noise.{escape(kind)}"><th>{escape(label)}</th><td>{fmt_pct(rate)}{star("by_noise")}</td></tr>'
        )
    if not vals["by_noise"]:
        body.append(
            f'<tr data-key="by_noise"><th>Rejection rate per noise kind</th><td>{DASH}</td></tr>'
        )
    cap = summary.get("captions") if isinstance(summary.get("captions"), dict) else {}
    if not cap:
        notes.append("caption evaluation missing (summary.json: captions)")
    n = number(cap.get("n"))
    n_s = f" (n = {int(n)})" if n is not None else ""
    body.append(
        f'<tr data-key="truth_rate"><th>Synthetic caption truth rate{escape(n_s)}</th><td>{fmt_pct(cap.get("truth_rate"))}</td></tr>'
    )
    head = "<thead><tr><th>Filter and captioner</th><th>Value</th></tr></thead>"
    return (
        f'<table class="metrics" id="filter-table">{head}<tbody>{"".join(body)}</tbody></table>',
        notes,
    )


def sweep_rows(summary: dict[str, Any]) -> list[dict[str, float | None]]:
    """The filter's threshold sweep with normalised keys (kept_web / kept_synthetic)."""
    sweep = _dig(summary, "filter", "sweep")
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
                "kept_web": _first(r.get("kept_web"), r.get("web_kept_frac")),
                "kept_synthetic": _first(r.get("kept_synthetic"), r.get("synthetic_kept_frac")),
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
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
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
