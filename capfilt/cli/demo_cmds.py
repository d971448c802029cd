"""``capfilt demo``: every stage on the built-in benchmark, then baseline vs CapFilt side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from capfilt.cli.common import (
    EXIT_USAGE,
    DryRunOption,
    RecipeArgument,
    SetOption,
    fail,
    out,
    resolve,
)

RETRIEVAL_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean")


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if percent else f"{value:.2f}"
    return str(value)


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """Rich tables of a demo summary: retrieval baseline vs CapFilt, filter and caption figures."""
    retrieval = Table("retrieval on test/ (%)", "baseline (human + noisy web)", "CapFilt (human + filtered)", "Δ", title="Baseline vs CapFilt")
    base = summary.get("baseline", {}).get("retrieval", {})
    cap = summary.get("capfilt", {}).get("retrieval", {})
    for key in RETRIEVAL_KEYS:
        a, b = base.get(key), cap.get(key)
        delta = f"{b - a:+.1f}" if a is not None and b is not None else "—"
        retrieval.add_row(key.upper().replace("_", " "), _fmt(a), _fmt(b), delta)
    filt = summary.get("filter", {})
    captions = summary.get("captions", {})
    origins = filt.get("origins", {})
    other = Table("figure", "value", title="Filter and captioner")
    other.add_row("filter precision on web noise", _fmt(filt.get("precision"), True))
    other.add_row("filter recall on web noise", _fmt(filt.get("recall"), True))
    other.add_row("filter F1 on web noise", _fmt(filt.get("f1"), True))
    other.add_row("filter ROC AUC (clean vs noisy web)", _fmt(filt.get("auc")))
    other.add_row("kept fraction: web texts", _fmt(origins.get("web", {}).get("kept_frac"), True))
    other.add_row("kept fraction: synthetic captions", _fmt(origins.get("synthetic", {}).get("kept_frac"), True))
    other.add_row("synthetic captions true of their scene", _fmt(captions.get("truth_rate"), True))
    other.add_row("total time (s)", _fmt(summary.get("total_seconds")))
    return [retrieval, other]


def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Demo folder: data, runs, eval, summary.json, report.html.")] = Path("demo-out"),
    recipe: RecipeArgument = "demo",
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Stage to leave out (repeatable).")] = None,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Run CapFilt end to end on the built-in benchmark and compare it with the noisy baseline.

    synth data → pretrain on human + noisy web (baseline) → fine-tune captioner and filter →
    caption web → filter web + synthetic → re-pretrain from scratch on human + cleaned →
    evaluate both. Re-running the same command resumes where it stopped.
    """
    from capfilt.pipeline.demo import STAGES, run_demo

    unknown = sorted(set(skip or []) - set(STAGES))
    if unknown:
        raise fail(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}", EXIT_USAGE)
    cfg = resolve(recipe, set_, dry_run)
    try:
        summary = run_demo(cfg, out_dir, tuple(skip or ()))
    except ValueError as err:
        raise fail(str(err), EXIT_USAGE) from None
    for table in summary_tables(summary):
        out.print(table)
    out.print(f"summary: {out_dir / 'summary.json'}")
    if (out_dir / "report.html").is_file():
        out.print(f"report:  {out_dir / 'report.html'}")
