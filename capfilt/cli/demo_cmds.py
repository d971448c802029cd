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
    print_stage_event,
    resolve,
)


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """Rich tables of a demo summary: retrieval baseline vs CapFilt, filter and caption figures."""
    from capfilt.pipeline.summary import demo_figures, fmt_seconds, retrieval_rows

    retrieval = Table(
        "retrieval on test/ (%)",
        "baseline (human + noisy web)",
        "CapFilt (human + filtered)",
        "Δ",
        title="Baseline vs CapFilt",
    )
    for row in retrieval_rows(summary):
        retrieval.add_row(row.label, row.baseline, row.capfilt, row.delta)
    other = Table("figure", "value", title="Filter and captioner")
    for figure in demo_figures(summary):
        other.add_row(figure.label, figure.text)
    other.add_row("Total time", fmt_seconds(summary.get("total_seconds")))
    evaluated = any(summary.get(side, {}).get("retrieval") for side in ("baseline", "capfilt"))
    return [retrieval, other] if evaluated else [other]  # no test shards: no retrieval to show


def demo(
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Demo folder: data, runs, eval, summary.json, report.html."
        ),
    ] = Path("demo-out"),
    recipe: RecipeArgument = "demo",
    skip: Annotated[
        list[str] | None, typer.Option("--skip", help="Stage to leave out (repeatable).")
    ] = None,
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
        raise fail(
            f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}", EXIT_USAGE
        )
    cfg = resolve(recipe, set_, dry_run)
    try:
        summary = run_demo(cfg, out_dir, tuple(skip or ()), on_stage=print_stage_event)
    except ValueError as err:
        raise fail(str(err), EXIT_USAGE) from None
    from capfilt.report import write_report

    report = write_report(out_dir)
    for table in summary_tables(summary):
        out.print(table)
    out.print(f"summary: {out_dir / 'summary.json'}")
    out.print(f"report:  {report}")
