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
    stage_names,
)


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    """Rich tables of a demo summary: retrieval baseline vs CapFilt, the ablations with the gap
    CapFilt closes (where they ran), filter and caption figures."""
    from capfilt.pipeline.summary import (
        ABLATION_COLUMNS,
        DASH,
        ablation_rows,
        demo_figures,
        fmt_seconds,
        gap_figures,
        has_ablations,
        retrieval_rows,
    )

    rounds = len(summary.get("rounds") or [])
    # the summary's top figures are the last round's: said where there were more
    last = f" (round {rounds} of {rounds})" if rounds > 1 else ""
    retrieval = Table(
        "retrieval on test/ (%)",
        "baseline (human + noisy web)",
        "CapFilt (human + filtered)",
        "Δ",
        title=f"Baseline vs CapFilt{last}",
    )
    for row in retrieval_rows(summary):
        retrieval.add_row(row.label, row.baseline, row.capfilt, row.delta)
    other = Table("figure", "value", title=f"Filter and captioner{last}")
    for figure in demo_figures(summary):
        if (
            figure.text != DASH
        ):  # what the run did not measure (no truth, stage not run) is left out
            other.add_row(figure.label, figure.text)
    other.add_row("Total time", fmt_seconds(summary.get("total_seconds")))
    evaluated = any(summary.get(side, {}).get("retrieval") for side in ("baseline", "capfilt"))
    if not evaluated:
        return [other]  # no test shards: no retrieval to show
    if not has_ablations(summary):
        return [retrieval, other]
    ablations = Table(
        "pretrain", "data", *(f"{label} (%)" for _, label in ABLATION_COLUMNS), title="Ablations"
    )
    for row in ablation_rows(summary):
        ablations.add_row(row.label, row.data, *row.cells)
    gaps = Table("figure", "value", title="Gap closed = (CapFilt − baseline) / (oracle − baseline)")
    for figure in gap_figures(summary):
        gaps.add_row(figure.label, figure.text)
    return [retrieval, ablations, gaps, other]


def demo(
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Demo folder: data, runs, eval, summary.json, report.html."
        ),
    ] = Path("demo-out"),
    recipe: RecipeArgument = "demo",
    skip: Annotated[
        list[str] | None,
        typer.Option("--skip", help="Stage to leave out (repeatable, or comma-separated)."),
    ] = None,
    ablations: Annotated[
        bool,
        typer.Option(
            "--ablations",
            help="Also pretrain the oracle (human + truly clean web), filter only and captioner "
            "only, and report the gap CapFilt closes (three more pretrains).",
        ),
    ] = False,
    restart_from: Annotated[
        str | None,
        typer.Option(
            "--restart-from",
            help="Redo this stage and every later one (needed after a recipe change; e.g. "
            "evaluate after changing only eval.* settings).",
        ),
    ] = None,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Run CapFilt end to end on the built-in benchmark and compare it with the noisy baseline.

    synth data → pretrain on human + noisy web (baseline) → fine-tune captioner and filter →
    caption web → filter web + synthetic → re-pretrain from scratch on human + cleaned →
    evaluate both. Re-running the same command resumes where it stopped; ``--ablations`` on a
    finished demo folder runs only the ablation stages and the evaluation. A changed recipe is
    refused unless --restart-from names the stage to redo.
    """
    from capfilt.pipeline.demo import STAGES, run_demo

    skip = list(stage_names(skip))
    unknown = sorted(set(skip) - set(STAGES))
    if unknown:
        raise fail(
            f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}", EXIT_USAGE
        )
    cfg = resolve(recipe, set_, dry_run)
    try:
        summary = run_demo(
            cfg, out_dir, tuple(skip or ()), on_stage=print_stage_event, ablations=ablations,
            restart_from=restart_from,
        )  # fmt: skip
    except ValueError as err:
        raise fail(str(err), EXIT_USAGE) from None
    from capfilt.report import write_report

    report = write_report(out_dir)
    for table in summary_tables(summary):
        out.print(table)
    out.print(f"summary: {out_dir / 'summary.json'}")
    out.print(f"report:  {report}")
