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
            help="A `capfilt bootstrap` or `capfilt demo` folder; or one stage's --out (a "
            "filter's gives its decisions, histograms and examples; a caption stage's or an "
            "import's, its examples); or a training run folder (its loss curves). A folder "
            "holding several of these is refused with their list."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="HTML file to write, or a folder to write report.html into (default: "
            "RUN_DIR/report.html).",
        ),
    ] = None,
    examples: Annotated[
        int, typer.Option("--examples", min=0, help="Example images to show.")
    ] = 12,
) -> None:
    """Write one HTML page (no external files) with the retrieval and filter tables, loss curves,
    ITM score histograms and example images; parts the run lacks are listed, not fatal."""
    from capfilt.report import write_report
    from capfilt.report.load import KIND_NAMES, capfilt_folders_inside, folder_kind

    if run_dir.is_file():
        raise fail(f"{run_dir} is a file: give the folder a run or stage wrote", EXIT_USAGE)
    if not run_dir.is_dir():
        raise fail(f"run folder not found: {run_dir}", EXIT_USAGE)
    if out is not None and out.is_dir():  # a folder to write the page into
        out = out / "report.html"
    if folder_kind(run_dir) == "unknown":
        _refuse_a_model_folder(run_dir)
        inside = capfilt_folders_inside(run_dir)
        if not inside:
            raise fail(
                f"{run_dir} holds no capfilt run, stage output or training run (nor do the "
                "folders in it): give a `capfilt bootstrap`/`demo` folder or one stage's --out",
                EXIT_USAGE,
            )
        listed = "\n".join(f"  {path}  ({KIND_NAMES[kind]})" for path, kind in inside[:20])
        more = f"\n  … and {len(inside) - 20} more" if len(inside) > 20 else ""
        example = next((path for path, kind in inside if kind == "run"), inside[0][0])
        raise fail(
            f"{run_dir} is not itself a capfilt folder; it holds {len(inside)}:\n{listed}{more}\n"
            f"report one of them, e.g. `capfilt report {example}`",
            EXIT_USAGE,
        )
    path = write_report(run_dir, out, n_examples=examples)
    stdout.print(f"report written to {path}")


def _refuse_a_model_folder(folder: Path) -> None:
    """A model folder holds weights, not a run's figures: say so, naming the training run it
    came from when it sits in one (``runs/captioner/model``)."""
    from capfilt.model.folder import CONFIG
    from capfilt.report.load import folder_kind
    from capfilt.runs.resolve import is_transformers_blip_folder

    if (folder / CONFIG).is_file():
        what = "a capfilt model folder"
    elif is_transformers_blip_folder(folder):
        what = "a transformers BLIP model folder"
    else:
        return
    run = next(
        (p for p in (folder.parent, folder.parent.parent) if folder_kind(p) != "unknown"), None
    )
    where = (
        f"report the training run that made it: `capfilt report {run}`"
        if run is not None
        else "report the training run that made it, or the --out of a stage that used it"
    )
    raise fail(f"{folder} is {what}: it holds weights, not a run's figures; {where}", EXIT_USAGE)
