"""The demo summary's figures as labelled rows of text: what ``capfilt demo`` prints and the
HTML report shows, formatted once here so that the two only lay them out.

``summary.json`` (written by :func:`capfilt.pipeline.demo.run_demo`) holds ``baseline.retrieval``
and ``capfilt.retrieval`` (:func:`capfilt.eval.retrieval.evaluate_retrieval`), ``filter``
(:func:`capfilt.eval.filter_metrics.filter_report`), ``captions`` (truth rate of the synthetic
captions), ``timings``, and with ``--ablations`` ``ablations.<name>.retrieval`` for the oracle,
filter-only and captioner-only pretrains. Any part may be missing or broken (a run still in
progress): its figures then read as a dash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from capfilt.config import CAPTION_METHODS

DASH = "—"

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
    ("r1_mean", "Mean R@1"),
    ("itc.r1_mean", "Mean R@1, ITC alone (no ITM re-rank)"),
)
"""Retrieval figures (recall in percent, keys as :func:`figure_of` reads them) and their labels."""


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


def dig(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...``, or None where a level is missing or not a dict."""
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def section(summary: Any, key: str) -> dict[str, Any]:
    """``summary[key]`` when it is a dict, else ``{}``."""
    value = dig(summary, key)
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class RetrievalRow:
    """One retrieval figure of baseline and CapFilt; ``change`` is CapFilt − baseline (or None)."""

    key: str
    label: str
    baseline: str
    capfilt: str
    delta: str
    change: float | None


def retrieval_rows(summary: dict[str, Any]) -> list[RetrievalRow]:
    """Baseline vs CapFilt retrieval recall (percent, one decimal) with the difference."""
    base = section(section(summary, "baseline"), "retrieval")
    cap = section(section(summary, "capfilt"), "retrieval")
    rows = []
    for key, label in RETRIEVAL_ROWS:
        b, c = figure_of(base, key), figure_of(cap, key)
        change = None if b is None or c is None else c - b
        delta = DASH if change is None else f"{change:+.1f}"
        rows.append(RetrievalRow(key, label, fmt(b, 1), fmt(c, 1), delta, change))
    return rows


@dataclass(frozen=True)
class Figure:
    """One labelled figure; ``derived`` when it comes from the fallback, not the summary."""

    key: str
    label: str
    text: str
    derived: bool = False


def _noise_rates(report: dict[str, Any]) -> dict[str, float | None]:
    by_noise = report.get("rejection_by_noise")
    if not isinstance(by_noise, dict):
        return {}
    return {str(k): number(dig(v, "rejected_fraction")) for k, v in by_noise.items()}


RULE_NAMES = {
    "itm": "itm: ITM match probability above its threshold (BLIP)",
    "itc": "itc: ITC cosine above its threshold",
    "both": "both: ITM probability and ITC cosine above their thresholds",
}
"""How each ``filter.rule`` decides, as the tables say it."""

RULE_KEYS = ("rule", "threshold", "itc_threshold", "keep_fraction")
"""The keys of the figures that describe the rule (taken from the report only, never derived)."""


def filter_rule(report: Any) -> dict[str, Any] | None:
    """The rule a ``filter_report`` judged by (``rule``: ``filter_metrics.keep_rule``); a report
    written before it recorded its rule was BLIP's, ITM above ``threshold``; None without either."""
    from capfilt.eval.filter_metrics import keep_rule

    rule, threshold = dig(report, "rule"), number(dig(report, "threshold"))
    if not isinstance(rule, dict) and threshold is None:
        return None
    return keep_rule(rule, threshold)


def uses_itm(rule: dict[str, Any] | None) -> bool:
    """Whether the rule decides on the ITM probability (so its threshold belongs on ITM charts)."""
    return rule is not None and rule["rule"] in ("itm", "both")


def rule_text(rule: dict[str, Any] | None) -> str:
    """The rule in one line, e.g. ``both: ITM > 0.33 and ITC cosine > 0.12 (keep_fraction 0.5)``."""
    if rule is None:
        return DASH
    parts = []
    if rule["rule"] in ("itm", "both"):
        parts.append(f"ITM > {fmt(rule['threshold'], 2)}")
    if rule["rule"] in ("itc", "both"):
        parts.append(f"ITC cosine > {fmt(rule['itc_threshold'], 3)}")
    fraction = number(rule.get("keep_fraction"))
    tail = f" (keep_fraction {fraction:g})" if fraction is not None else ""
    return f"{rule['rule']}: {' and '.join(parts)}{tail}"


def rule_figures(report: dict[str, Any]) -> list[Figure]:
    """The rule the filter decided with, and each threshold and kept fraction it applied."""
    rule = filter_rule(report)
    if rule is None:
        return [Figure("rule", "Keep rule", DASH)]
    figures = [Figure("rule", "Keep rule", RULE_NAMES[rule["rule"]])]
    if rule["rule"] in ("itm", "both"):
        label = "ITM threshold (keep if score > t)"
        figures.append(Figure("threshold", label, fmt(rule["threshold"], 2)))
    if rule["rule"] in ("itc", "both"):
        label = "ITC cosine threshold (keep if cosine > t)"
        figures.append(Figure("itc_threshold", label, fmt(rule["itc_threshold"], 3)))
    if number(rule.get("keep_fraction")) is not None:
        label = "Kept fraction asked for (filter.keep_fraction; sets the thresholds)"
        figures.append(Figure("keep_fraction", label, fmt_pct(rule["keep_fraction"])))
    return figures


def filter_figures(report: dict[str, Any], fallback: dict[str, Any] | None = None) -> list[Figure]:
    """The figures of a ``filter_report`` (the demo summary's ``filter``): the keep rule and its
    thresholds (:func:`rule_figures`), precision/recall/F1 of rejecting noisy web texts, ROC AUC, kept fractions, rejection rate per
    noise kind, and (where the world has terse web texts) the false rejection rate of terse and of
    full clean texts.

    ``fallback`` is another ``filter_report`` (e.g. computed from the per-text parquet) that fills
    the figures ``report`` lacks, except the rule's; those figures are marked ``derived``.
    """
    report = report if isinstance(report, dict) else {}
    spare = fallback or {}

    def pick(*path: str) -> tuple[float | None, bool]:
        value = number(dig(report, *path))
        if value is not None:
            return value, False
        value = number(dig(spare, *path))
        return value, value is not None

    figures = rule_figures(report)
    for key, label, path, as_pct in (
        ("precision", "Precision (rejected texts that are noisy)", ("precision",), False),
        ("recall", "Recall (noisy web texts rejected)", ("recall",), False),
        ("f1", "F1", ("f1",), False),
        ("roc_auc", "ROC AUC (score: clean vs noisy)", ("auc",), False),
        (
            "kept_fraction_web",
            "Kept fraction, web texts",
            ("origins", "web", "kept_fraction"),
            True,
        ),
        (
            "kept_fraction_synthetic",
            "Kept fraction, synthetic captions",
            ("origins", "synthetic", "kept_fraction"),
            True,
        ),
    ):
        value, derived = pick(*path)
        figures.append(Figure(key, label, fmt_pct(value) if as_pct else fmt(value), derived))
    rates, derived = _noise_rates(report), False
    if not rates:
        rates, derived = _noise_rates(spare), True
    for kind, rate in sorted(rates.items(), key=lambda kv: (kv[0] == "none", kv[0])):
        label = (
            "False rejection rate (clean web texts)"
            if kind == "none"
            else f"Rejection rate, noise “{kind}”"
        )
        figures.append(Figure(f"by_noise.{kind}", label, fmt_pct(rate), derived))
    labelled = any(number(dig(r, "n_truth")) is not None for r in (report, spare))
    if not rates and not labelled:  # a truth file's labels have no noise kinds: nothing missing
        figures.append(Figure("by_noise", "Rejection rate per noise kind", DASH))
    for name, label in (
        ("terse", "False rejection rate, terse clean web texts"),
        ("full", "False rejection rate, full clean web texts"),
    ):
        path = ("clean_rejection_by_detail", name, "rejected_fraction")
        value, derived = pick(*path)
        if value is not None:
            figures.append(Figure(f"clean_detail.{name}", label, fmt_pct(value), derived))
    return figures


def truth_figure(captions: dict[str, Any]) -> Figure:
    """The share of synthetic captions true of their scene (the demo summary's ``captions``)."""
    captions = captions if isinstance(captions, dict) else {}
    n = number(captions.get("n"))
    n_text = f" (n = {int(n)})" if n is not None else ""
    return Figure(
        "truth_rate", f"Synthetic caption truth rate{n_text}", fmt_pct(captions.get("truth_rate"))
    )


def method_figures(captioner: dict[str, Any]) -> list[Figure]:
    """Per decoding method of the captioner on the test images (``captioner.by_method``): the
    share of captions true of their scene where the truth is known, else CIDEr."""
    by_method = section(captioner, "by_method")
    used = captioner.get("method") if isinstance(captioner, dict) else None
    known = {m: i for i, m in enumerate(CAPTION_METHODS)}
    order = sorted(by_method, key=lambda m: (m != used, known.get(m, len(known)), m))
    figures = []
    for method in order:  # the one that wrote the data first
        result = by_method[method]
        truth = number(dig(result, "truth_rate"))
        if truth is not None:
            figures.append(
                Figure(f"test_truth.{method}", f"Test captions true, {method}", fmt_pct(truth))
            )
        else:
            cider = number(dig(result, "cider"))
            figures.append(
                Figure(
                    f"test_cider.{method}", f"Test captions CIDEr-D ×100, {method}", fmt(cider, 1)
                )
            )
    return figures


def demo_figures(summary: dict[str, Any], fallback: dict[str, Any] | None = None) -> list[Figure]:
    """The demo summary's filter figures (see :func:`filter_figures`), the synthetic captions'
    truth rate and the captioner's test figures per decoding method (:func:`method_figures`)."""
    return [
        *filter_figures(section(summary, "filter"), fallback),
        truth_figure(section(summary, "captions")),
        *method_figures(section(summary, "captioner")),
    ]


RUNS = (
    ("baseline", "baseline", "human + all web"),
    ("oracle", "oracle", "human + truly clean web"),
    ("filter-only", "filter only", "human + kept web"),
    ("captioner-only", "captioner only", "human + all web + all synthetic"),
    ("capfilt", "CapFilt", "human + kept web + kept synthetic"),
)
"""Every pretrain a run folder may hold, in the order the tables show them: (name, label, data)."""

GAP_FIGURES = (("r1_mean", "mean R@1"), ("r_mean", "mean of all R@K"))
"""The figures gap closed is given on."""


def mean_r1(retrieval: Any) -> float | None:
    """Mean of text and image retrieval R@1 (percent), or None where either is missing."""
    tr, ir = number(dig(retrieval, "tr_r1")), number(dig(retrieval, "ir_r1"))
    return None if tr is None or ir is None else (tr + ir) / 2


def figure_of(retrieval: Any, key: str) -> float | None:
    """``r1_mean`` (:func:`mean_r1`) or any figure ``evaluate_retrieval`` gives, e.g. ``r_mean``;
    ``itc.KEY`` is the same figure of the ITC ranking alone (``retrieval["itc"]``)."""
    if key.startswith("itc."):
        return figure_of(dig(retrieval, "itc"), key.removeprefix("itc."))
    return mean_r1(retrieval) if key == "r1_mean" else number(dig(retrieval, key))


def run_retrieval(summary: dict[str, Any], name: str) -> dict[str, Any]:
    """The retrieval figures of run ``name`` (one of :data:`RUNS`), ``{}`` when absent."""
    if name in ("baseline", "capfilt"):
        return section(section(summary, name), "retrieval")
    return section(section(section(summary, "ablations"), name), "retrieval")


def gap_ratio(baseline: float | None, capfilt: float | None, oracle: float | None) -> float | None:
    """(CapFilt − baseline) / (oracle − baseline): the share of the gain that training on only
    the clean web texts gives which CapFilt gets (above 1: CapFilt beats clean-only training).
    None where a figure is missing or the oracle is not above the baseline (no gain to close)."""
    if baseline is None or capfilt is None or oracle is None or oracle <= baseline:
        return None
    return (capfilt - baseline) / (oracle - baseline)


def gap_closed(summary: dict[str, Any]) -> dict[str, float | None]:
    """Gap closed on each of :data:`GAP_FIGURES` (None where it cannot be computed)."""
    base, cap, oracle = (run_retrieval(summary, n) for n in ("baseline", "capfilt", "oracle"))
    return {
        key: gap_ratio(figure_of(base, key), figure_of(cap, key), figure_of(oracle, key))
        for key, _ in GAP_FIGURES
    }


ABLATION_COLUMNS = (
    ("r1_mean", "mean R@1"),
    ("tr_r1", "TR@1"),
    ("ir_r1", "IR@1"),
    ("r_mean", "mean of all R@K"),
    ("itc.r1_mean", "mean R@1, ITC alone"),
)
"""The columns of the ablation table (recall in percent)."""


@dataclass(frozen=True)
class RunRow:
    """One pretrain's retrieval figures, formatted (one decimal), in :data:`ABLATION_COLUMNS` order."""

    name: str
    label: str
    data: str
    cells: tuple[str, ...]


def ablation_rows(summary: dict[str, Any]) -> list[RunRow]:
    """A row for every pretrain of :data:`RUNS` whose retrieval the summary holds."""
    rows = []
    for name, label, data in RUNS:
        retrieval = run_retrieval(summary, name)
        if retrieval:
            cells = tuple(fmt(figure_of(retrieval, key), 1) for key, _ in ABLATION_COLUMNS)
            rows.append(RunRow(name, label, data, cells))
    return rows


def has_ablations(summary: dict[str, Any]) -> bool:
    """Whether the summary holds the retrieval of any ablation pretrain."""
    return any(run_retrieval(summary, name) for name, _, _ in RUNS[1:4])


def gap_figures(summary: dict[str, Any]) -> list[Figure]:
    """Gap closed on mean R@1 and on the mean of all R@K, two decimals (a dash without an oracle
    above the baseline)."""
    gaps = gap_closed(summary)
    base, oracle = run_retrieval(summary, "baseline"), run_retrieval(summary, "oracle")
    figures = []
    for key, label in GAP_FIGURES:
        text = fmt(gaps[key], 2)
        b, o = figure_of(base, key), figure_of(oracle, key)
        if gaps[key] is None and b is not None and o is not None and o <= b:
            text += " (oracle not above baseline)"
        figures.append(Figure(f"gap_closed.{key}", f"Gap closed, {label}", text))
    return figures
