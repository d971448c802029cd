"""Assemble the self-contained HTML report of a demo run folder.

One page, inline CSS and inline SVG, images as data URIs: it opens from a file, an e-mail or a
CI artifact with no network. Every piece of text from the run goes through ``html.escape``.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from capfilt import __version__
from capfilt.eval.filter_metrics import HIST_BINS, histogram_edges, score_histogram
from capfilt.pipeline.summary import (
    dig,
    filter_rule,
    fmt,
    fmt_pct,
    number,
    rule_text,
    section,
    uses_itm,
)
from capfilt.report.charts import PALETTE, Series, empty_chart, histogram_chart, line_chart
from capfilt.report.examples import Example, pick_examples
from capfilt.report.load import KIND_NAMES, RunData, load_run
from capfilt.report.tables import (
    ablation_table,
    filter_table,
    filter_threshold,
    overview_tables,
    retrieval_table,
    sweep_rows,
)

CHART_BINS = 2 * HIST_BINS
"""Bins of the page's score histograms: twice the summary's, since the page has the per-text scores."""
KEPT_COLOR, REJECTED_COLOR = "#2e9d5b", "#d9534f"
CLEAN_COLOR, NOISY_COLOR = "#1f6fb4", "#e8801a"
LOSS_COLORS = {
    "loss": "#222222",
    "loss_itc": PALETTE[0],
    "loss_itm": PALETTE[1],
    "loss_lm": PALETTE[2],
}

CSS = """
:root { --fg:#1d2330; --muted:#5d6678; --line:#dde1e8; --bg:#f6f7f9; --card:#fff; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Helvetica, Arial, sans-serif;
       color:var(--fg); background:var(--bg); }
main { max-width:1200px; margin:0 auto; padding:24px 28px 48px; }
header h1 { font-size:26px; margin:0 0 4px; }
header .sub { color:var(--muted); margin:0; }
h2 { font-size:19px; margin:34px 0 10px; padding-bottom:4px; border-bottom:2px solid var(--line); }
h3 { font-size:15px; margin:0 0 6px; }
section > p.lead { color:var(--muted); margin:0 0 12px; max-width:900px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
.row { display:flex; flex-wrap:wrap; gap:16px; align-items:flex-start; }
.missing { background:#fff8e6; border:1px solid #f0d58c; border-radius:8px; padding:10px 16px; margin:16px 0 0; }
.missing h3 { margin:0 0 4px; color:#8a6100; }
.missing ul { margin:0; padding-left:20px; }
.note { color:#8a6100; font-size:13px; margin:6px 0 0; }
table { border-collapse:collapse; background:var(--card); }
table.metrics { min-width:440px; border:1px solid var(--line); }
table.metrics th, table.metrics td { padding:5px 12px; border-bottom:1px solid var(--line); text-align:right; }
table.metrics th:first-child { text-align:left; font-weight:500; }
table.metrics thead th { background:#eef1f5; font-weight:600; }
table.metrics tr.mean th, table.metrics tr.mean td { font-weight:600; background:#fafbfc; }
table.metrics td.data { text-align:left; color:var(--muted); font-size:13px; }
#gap-table { margin-top:10px; }
td.diff.up { color:#1c7a3e; font-weight:600; } td.diff.down { color:#b52b27; font-weight:600; }
.star { color:#8a6100; margin-left:2px; }
table.kv th, table.kv td { padding:3px 10px; border-bottom:1px solid var(--line); text-align:left; font-size:13px; }
table.kv th { font-weight:500; color:var(--muted); }
table.kv td { text-align:right; font-variant-numeric:tabular-nums; }
td, th { font-variant-numeric:tabular-nums; }
svg.chart { display:block; background:var(--card); }
svg.chart .grid { stroke:#eceef2; stroke-width:1; }
svg.chart .axis { stroke:#8a93a3; stroke-width:1; }
svg.chart .tick { font-size:11px; fill:#5d6678; }
svg.chart .label { font-size:12px; fill:#3b4252; }
svg.chart .legend { font-size:12px; fill:#1d2330; }
svg.chart .marker { stroke:#333; stroke-width:1.3; stroke-dasharray:4 3; }
svg.chart .marker-label { font-size:11px; fill:#333; }
svg.chart rect.empty { fill:#fafafa; stroke:#ccc; stroke-dasharray:4 3; }
.chart-card { padding:10px 12px 6px; }
.examples { display:grid; grid-template-columns:repeat(auto-fill, minmax(540px, 1fr)); gap:14px; }
.example { display:flex; gap:14px; }
.example img { width:128px; height:128px; object-fit:contain; background:#f3f4f6; image-rendering:pixelated; border-radius:4px; border:1px solid var(--line); flex:none; }
.example .texts { flex:1; min-width:0; }
.example .key { font:11px ui-monospace, "DejaVu Sans Mono", monospace; color:var(--muted); }
.example .cat { float:right; font-size:11px; color:var(--muted); }
.text { padding:4px 0; border-top:1px dashed var(--line); }
.text:first-of-type { border-top:none; }
.text .t { display:block; margin:1px 0 2px; overflow-wrap:anywhere; }
.badge { display:inline-block; font-size:11px; padding:0 6px; border-radius:9px; margin-right:4px; line-height:17px; }
.b-web { background:#e6eefb; color:#234f8e; } .b-synthetic { background:#efe8f8; color:#5b3a8c; } .b-human { background:#eee; color:#444; }
.b-kept { background:#dff3e6; color:#1c7a3e; } .b-rejected { background:#fbe3e2; color:#b52b27; } .b-unknown { background:#eee; color:#666; }
.b-true { background:#e7f1ff; color:#1d4f91; } .b-false { background:#fff0dd; color:#9a5300; }
.score { font:12px ui-monospace, "DejaVu Sans Mono", monospace; color:#333; margin-right:6px; }
footer { margin-top:40px; color:var(--muted); font-size:12px; }
"""


def _rounds(data: RunData) -> str:
    """One row per CapFilt round of a bootstrap run (only when it ran more than one)."""
    rounds = [r for r in data.summary.get("rounds") or [] if isinstance(r, dict)]
    if len(rounds) < 2:
        return ""
    head = "".join(
        f"<th>{escape(h)}</th>"
        for h in (
            "round",
            "CapFilt retrieval mean (%)",
            "captioner CIDEr-D ×100",
            "web texts kept",
            "synthetic kept",
        )
    )
    body = []
    for row in rounds:
        cells = (
            str(row.get("round", "")),
            fmt(dig(row, "capfilt", "retrieval", "r_mean"), 1),
            fmt(dig(row, "captioner", "cider"), 1),
            fmt_pct(dig(row, "filter", "origins", "web", "kept_fraction")),
            fmt_pct(dig(row, "filter", "origins", "synthetic", "kept_fraction")),
        )
        body.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return (
        '<section id="rounds"><h2>Rounds</h2><p class="lead">Round r+1 fine-tunes the captioner '
        "and the filter from round r's re-pretrained model and bootstraps the original web shards "
        "again; the tables below show the last round.</p>"
        f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        "</table></section>"
    )


def _notes(notes: list[str]) -> str:
    return "".join(f'<p class="note">{escape(n)}</p>' for n in notes)


SECTIONS = {
    "run": ("retrieval", "filter", "losses", "scores", "examples"),
    "filter": ("filter", "scores", "examples"),
    "caption": ("examples",),
    "shards": ("examples",),
    "training": ("losses",),
}
"""The numbered sections each kind of folder (:func:`capfilt.report.load.folder_kind`) can fill;
a folder of unknown kind gets a bootstrap folder's, each saying what it lacks."""

STAGE_LEADS = {
    "filter": "One filter stage's output: the ITM score and decision of every text, the images "
    "it kept with their texts, and the texts' match with the truth where the shards carry it.",
    "caption": "One caption stage's output: web images with their texts and the synthetic "
    "captions the captioner wrote for them.",
    "shards": "Shards of images and texts that no caption or filter stage wrote (an import's, "
    "the built-in benchmark's): example images with their texts.",
    "training": "One training run: its loss curves.",
}


def _header(data: RunData) -> str:
    s = data.summary
    folder = "run folder" if data.kind in ("run", "unknown") else "folder"
    bits = [f"{folder} <code>{escape(str(data.run_dir))}</code>"]
    for key in ("recipe", "seed"):
        if key in s and not isinstance(s[key], dict | list):
            bits.append(f"{key} <b>{escape(str(s[key]))}</b>")
    timings, counts = overview_tables(s)
    missing = ""
    if data.missing:
        items = "".join(f"<li>{escape(m)}</li>" for m in data.missing)
        missing = f'<div class="missing" id="missing"><h3>Missing or incomplete parts</h3><ul>{items}</ul></div>'
    if data.kind in ("run", "unknown"):
        title = "CapFilt run report"
        if not data.released:
            lead = (
                "BLIP's CapFilt: a captioner writes synthetic captions for web images, an ITM "
                "filter drops texts that do not match their image, and a fresh model is "
                "pretrained on the cleaned data. The baseline is pretrained on the same data "
                "without CapFilt."
            )
        else:
            pretrained = "pretrain_capfilt" in data.metrics or dig(data.summary, "capfilt")
            lead = (
                "BLIP's CapFilt with released models: their captioner writes synthetic captions "
                "for the web images, their ITM filter drops texts that do not match their image"
                + (
                    ", and a fresh model is pretrained on the cleaned data."
                    if pretrained
                    else "; no model is pretrained or fine-tuned here."
                )
            )
        overview = (
            '<section id="overview"><h2>Run overview</h2>'
            f'<p class="lead">{escape(lead)}</p>'
            f'<div class="row"><div class="card"><h3>Stage timings</h3>{timings}</div>'
            f'<div class="card"><h3>Data</h3>{counts}</div></div></section>'
        )
    else:
        title = f"CapFilt report: {KIND_NAMES[data.kind]}"
        contents = (
            f'<div class="row"><div class="card"><h3>Contents</h3>{counts}</div></div>'
            if isinstance(s.get("data"), dict)
            else ""
        )
        overview = (
            f'<section id="overview"><p class="lead">{escape(STAGE_LEADS[data.kind])}</p>'
            f"{contents}</section>"
        )
    return (
        f"<header><h1>{escape(title)}</h1>"
        f'<p class="sub">{" · ".join(bits)}</p></header>{missing}{overview}'
    )


def _retrieval(data: RunData) -> str:
    table, notes = retrieval_table(data.summary, data.released)
    ablations = ablation_table(data.summary)
    if ablations:
        ablations = (
            '<h3 id="ablations">Ablations</h3><p class="lead">The same pretrain on other data: the '
            "oracle sees only the truly clean web texts, filter only drops the synthetic captions "
            "from CapFilt's kept set, captioner only keeps every text. Gap closed = (CapFilt − "
            "baseline) / (oracle − baseline): 1 means CapFilt does as well as clean-only "
            "training; above 1, better.</p>"
            f"{ablations}"
        )
    return (
        '<section id="retrieval"><h2>Retrieval: baseline vs CapFilt</h2>'
        '<p class="lead">Recall@K (%) on the held-out test set; text retrieval = image→text, image retrieval = '
        "text→image (ITC top-k reranked by ITM, as in BLIP). Δ &gt; 0 means CapFilt helped.</p>"
        f"{table}{_notes(notes)}{ablations}</section>"
    )


def _sweep_chart(data: RunData, threshold: float | None) -> str:
    rows = sweep_rows(data.summary)
    if len(rows) < 2:
        return ""
    xs = [r["threshold"] for r in rows]
    series = [
        Series(
            name,
            xs,
            [r[key] if r[key] is not None else float("nan") for r in rows],
            color,
            dashed=dashed,
        )
        for key, name, color, dashed in (
            ("precision", "precision", PALETTE[0], False),
            ("recall", "recall", PALETTE[1], False),
            ("f1", "F1", "#222222", False),
            ("kept_web", "kept web", KEPT_COLOR, True),
            ("kept_synthetic", "kept synthetic", PALETTE[4], True),
        )
    ]
    vlines = [(threshold, f"t = {threshold:g}")] if threshold is not None else []
    chart = line_chart(
        series,
        title="Threshold sweep",
        x_label="ITM threshold",
        y_label="fraction",
        y_range=(0.0, 1.0),
        vlines=vlines,
        width=520,
        height=280,
    )
    return f'<div class="card chart-card"><h3>Threshold sweep</h3>{chart}</div>'


def _rule_lead(summary: dict[str, Any]) -> str:
    """What the filter's rule kept, in a sentence (the rule as the summary records it)."""
    rule = filter_rule(section(summary, "filter"))
    if rule is None:
        return "The filter's rule is not recorded here (by default BLIP's: ITM match probability above 0.5)."
    when = rule_text({**rule, "keep_fraction": None}).split(": ", 1)[1]
    fraction = number(rule.get("keep_fraction"))
    share = f", keep_fraction {fraction:g} set the thresholds" if fraction is not None else ""
    return (
        f"The filter kept a text when {when} (rule {rule['rule']}{share}); human texts always stay."
    )


def _filter(data: RunData) -> str:
    table, notes = filter_table(data.summary, data.texts, data.filtered_label)
    threshold = filter_threshold(data.summary)
    rule = filter_rule(section(data.summary, "filter"))
    if rule is not None and rule["rule"] != "itm" and sweep_rows(data.summary):
        notes.append(
            f"the sweep re-decides by the ITM probability alone, not by rule {rule['rule']}"
        )
    return (
        '<section id="filter"><h2>Filter on web noise, and caption truth</h2>'
        f'<p class="lead">{escape(_rule_lead(data.summary))} '
        "Precision/recall/F1 treat rejecting a noisy web text as a hit. The truth rate is the share of "
        "synthetic captions that are true of their image. Both need the truth, which the built-in "
        "benchmark stores with its images; on other data those rows stay empty.</p>"
        f'<div class="row"><div>{table}{_notes(notes)}</div>{_sweep_chart(data, threshold)}</div></section>'
    )


def _loss_chart(name: str, rows: list[dict[str, Any]]) -> str:
    keys = []
    for row in rows:
        for k, v in row.items():
            if (k == "loss" or k.startswith("loss_")) and number(v) is not None and k not in keys:
                keys.append(k)
    # a part that is zero throughout was not trained in this stage (e.g. ITC/ITM of the captioner)
    keys = [k for k in keys if k == "loss" or any(number(r.get(k)) for r in rows)]
    keys.sort(key=lambda k: (k != "loss", k))
    series = [
        Series(
            "total" if k == "loss" else k.removeprefix("loss_"),
            [r["step"] for r in rows if number(r.get(k)) is not None],
            [r[k] for r in rows if number(r.get(k)) is not None],
            LOSS_COLORS.get(k, PALETTE[(3 + i) % len(PALETTE)]),
            width=2.4 if k == "loss" else 1.5,
        )
        for i, k in enumerate(keys)
    ]
    title = f"{name}: training loss"
    chart = (
        line_chart(
            series,
            title=title,
            x_label="step",
            y_label="loss",
            width=530,
            height=260,
            x_integer=True,
        )
        if series
        else empty_chart(f"{name}: no loss values")
    )
    return f'<div class="card chart-card"><h3>{escape(name)}</h3>{chart}</div>'


def _losses(data: RunData) -> str:
    if not data.metrics:
        body = '<p class="note">No runs/*/metrics.jsonl found: no loss curves.</p>'
    else:
        body = (
            '<div class="row">'
            + "".join(_loss_chart(n, rows) for n, rows in data.metrics.items())
            + "</div>"
        )
    every = "" if data.kind == "training" else " for every training run"
    return (
        '<section id="losses"><h2>Training loss</h2>'
        f'<p class="lead">Total loss and its parts (ITC, ITM, LM) per logged step{every}.</p>'
        f"{body}</section>"
    )


def _histograms(data: RunData) -> str:
    threshold = filter_threshold(data.summary)
    charts, notes = [], []
    t = data.texts
    if t is not None and not t.empty:
        edges = histogram_edges(CHART_BINS)
        for origin, label in (("web", "Web texts"), ("synthetic", "Synthetic captions")):
            rows = t[t["origin"] == origin]
            if rows.empty:
                notes.append(f"no {origin} texts in {data.filtered_label}")
                continue
            stacks = [
                (
                    "kept",
                    score_histogram(rows.loc[rows["kept"], "itm_score"], CHART_BINS),
                    KEPT_COLOR,
                ),
                (
                    "rejected",
                    score_histogram(rows.loc[~rows["kept"], "itm_score"], CHART_BINS),
                    REJECTED_COLOR,
                ),
            ]
            title = f"{label} (n = {len(rows)})"
            charts.append((title, histogram_chart(edges, stacks, title=title, threshold=threshold)))
        if "clean" in t.columns:
            web = t[(t["origin"] == "web") & t["clean"].notna()]
            if not web.empty:
                clean = web["clean"].astype(bool)
                stacks = [
                    (
                        "clean",
                        score_histogram(web.loc[clean, "itm_score"], CHART_BINS),
                        CLEAN_COLOR,
                    ),
                    (
                        "noisy",
                        score_histogram(web.loc[~clean, "itm_score"], CHART_BINS),
                        NOISY_COLOR,
                    ),
                ]
                title = f"Web texts by ground truth (n = {len(web)})"
                charts.append(
                    (title, histogram_chart(edges, stacks, title=title, threshold=threshold))
                )
    else:
        hist = data.section("filter").get("histograms")
        edges_list = hist.get("bin_edges") if isinstance(hist, dict) else None
        if isinstance(edges_list, list) and len(edges_list) > 1:
            notes.append(f"from summary.json (coarser bins): {data.filtered_label} is missing")
            for origin, label in (("web", "Web texts"), ("synthetic", "Synthetic captions")):
                h = hist.get(origin)
                if isinstance(h, dict):
                    stacks = [
                        ("kept", h.get("kept") or [], KEPT_COLOR),
                        ("rejected", h.get("rejected") or [], REJECTED_COLOR),
                    ]
                    title = label
                    charts.append(
                        (
                            title,
                            histogram_chart(edges_list, stacks, title=title, threshold=threshold),
                        )
                    )
        else:
            notes.append(
                f"no per-text scores ({data.filtered_label}/*.parquet): histograms left out"
            )
    body = "".join(
        f'<div class="card chart-card"><h3>{escape(title)}</h3>{svg}</div>' for title, svg in charts
    )
    return (
        '<section id="scores"><h2>ITM score distributions</h2>'
        f'<p class="lead">Filter match probability of every text ({CHART_BINS} bins on [0, 1]); '
        f"{_line_meaning(data.summary)}</p>"
        f'<div class="row">{body}</div>{_notes(notes)}</section>'
    )


def _line_meaning(summary: dict[str, Any]) -> str:
    """What the histograms' dashed line is, or why there is none (a rule without ITM)."""
    rule = filter_rule(section(summary, "filter"))
    if uses_itm(rule):
        return "the dashed line is the ITM threshold" + (
            f" (rule {escape(rule_text(rule))})." if rule["rule"] != "itm" else "."
        )
    if rule is None:
        return "the filter's threshold is not recorded, so no line is drawn."
    return (
        f"the filter decided by rule {escape(rule_text(rule))}, not by this score, "
        "so no threshold line is drawn."
    )


def _badge(kind: str, text: str) -> str:
    return f'<span class="badge b-{kind}">{escape(text)}</span>'


def _example(ex: Example, scored: bool = True) -> str:
    lines = []
    for e in ex.entries:
        decision = score = ""
        if scored:
            decision = (
                _badge("unknown", "no score")
                if e.kept is None
                else _badge("kept" if e.kept else "rejected", "kept" if e.kept else "rejected")
            )
            score = f'<span class="score">ITM {fmt(e.score, 2)}</span>'
        truth = ""
        if e.truth is not None:
            truth = _badge("true" if e.ok else "false", e.truth)
        lines.append(
            f'<div class="text">{_badge(e.origin if e.origin in ("web", "synthetic", "human") else "human", e.origin)}'
            f'{score}{decision}{truth}<span class="t">{escape(e.text)}</span></div>'
        )
    # "other": neither a decision nor the truth is known, so there is no outcome to name
    category = "" if ex.category == "other" else f'<span class="cat">{escape(ex.category)}</span>'
    return (
        f'<div class="card example"><img src="{ex.image_uri}" alt="{escape(ex.key)}" width="128" height="128">'
        f'<div class="texts">{category}<div class="key">{escape(ex.key)}</div>{"".join(lines)}</div></div>'
    )


def _examples(
    examples: list[Example],
    source: str = "data/web_captioned",
    scored: bool = True,
    n_asked: int = 12,
) -> str:
    """The example images; ``scored`` is False for a folder no filter has scored (a caption
    stage's or an import's), whose texts carry no score or decision to show."""
    if examples:
        body = '<div class="examples">' + "".join(_example(e, scored) for e in examples) + "</div>"
    elif n_asked:
        body = f'<p class="note">No example images ({escape(source)} missing or empty).</p>'
    else:
        body = '<p class="note">No example images: --examples 0.</p>'
    lead = (
        "Web images with their web text and synthetic captions, each with its ITM score, the "
        "filter's decision and, where it is known, the truth: for web texts clean or the kind of "
        "noise, for synthetic captions whether the caption is true of the image. Picked to show "
        "successes and mistakes."
        if scored
        else "Images with their texts and, where the shards carry it, the truth: for web texts "
        "clean or the kind of noise, for synthetic captions whether the caption is true of the "
        "image. No filter has scored these texts."
    )
    return f'<section id="examples"><h2>Examples</h2><p class="lead">{lead}</p>{body}</section>'


def render_report(run_dir: str | Path, n_examples: int = 12) -> str:
    """The report of ``run_dir`` as one HTML string (never raises for missing or broken parts)."""
    data = load_run(run_dir)
    if data.captioned_dir is not None:
        examples = pick_examples(
            data.run_dir, data.texts, data.missing, n_examples, folder=data.captioned_dir
        )
    else:
        examples = []
    title = f"CapFilt report: {data.run_dir.resolve().name}"
    build = {
        "retrieval": lambda: _retrieval(data),
        "filter": lambda: _filter(data),
        "losses": lambda: _losses(data),
        "scores": lambda: _histograms(data),
        "examples": lambda: _examples(
            examples,
            data.captioned_label,
            scored=data.kind not in ("caption", "shards"),
            n_asked=n_examples,
        ),
    }
    names = SECTIONS.get(data.kind, SECTIONS["run"])
    if data.released and not dig(data.summary, "capfilt", "retrieval"):
        names = tuple(n for n in names if n != "retrieval")  # no model was pretrained to test
    if data.released and not data.metrics:
        names = tuple(n for n in names if n != "losses")
    numbered = [build[name]().replace("<h2>", f"<h2>{i}. ", 1) for i, name in enumerate(names, 1)]
    sections = [_rounds(data), *numbered]
    header = _header(data)  # after the sections: they may add to data.missing
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{header}{''.join(sections)}"
        f"<footer>Generated by capfilt {escape(__version__)} (<code>capfilt report</code>). "
        "Self-contained: no scripts, no external resources.</footer></main></body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, n_examples: int = 12) -> Path:
    """Write the report to ``out`` (default ``run_dir/report.html``) atomically; returns the path."""
    from capfilt.utils.files import atomic_write_bytes

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, render_report(run_dir, n_examples).encode("utf-8"))
    return out
