"""``capfilt report``: a self-contained HTML summary of a bootstrap or demo folder, or of one stage's output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.common import EXIT_USAGE, fail
from capfilt.cli.common import out as stdout


def report(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A `capfilt bootstrap` or `capfilt demo` folder, or one stage's output "
            "(a filter folder gives its histograms and examples)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="HTML file to write (default: RUN_DIR/report.html)."),
    ] = None,
    examples: Annotated[
        int, typer.Option("--examples", min=0, help="Example images to show.")
    ] = 12,
) -> None:
    """Write one HTML page (no external files) with the retrieval and filter tables, loss curves,
    ITM score histograms and example images; parts the run lacks are listed, not fatal."""
    from capfilt.report import write_report

    if not run_dir.is_dir():
        raise fail(f"run folder not found: {run_dir}", EXIT_USAGE)
    path = write_report(run_dir, out, n_examples=examples)
    stdout.print(f"report written to {path}")
