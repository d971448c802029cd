"""``capfilt bootstrap``: the CapFilt loop on your own shards, in one resumable command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.common import (
    EXIT_PARTIAL,
    EXIT_USAGE,
    DryRunOption,
    RecipeArgument,
    SetOption,
    fail,
    out,
    print_stage_event,
    print_warning,
    resolve,
    stage_names,
)
from capfilt.cli.demo_cmds import summary_tables


def bootstrap(
    recipe: RecipeArgument = "real-cpu",
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Run folder: manifest, runs/, data/, eval/, summary.json."
        ),
    ] = Path("bootstrap-out"),
    human: Annotated[
        list[str] | None,
        typer.Option("--human", help="Human-annotated shards (repeatable)."),
    ] = None,
    web: Annotated[
        list[str] | None,
        typer.Option("--web", help="Noisy web shards to bootstrap (repeatable)."),
    ] = None,
    test: Annotated[
        list[str] | None,
        typer.Option("--test", help="Held-out test shards: retrieval and caption metrics."),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option("--rounds", help="CapFilt rounds (each starts from the last re-pretrain)."),
    ] = 1,
    captioner: Annotated[
        str | None,
        typer.Option(
            "--captioner", help="Released captioner (capfilt or transformers BLIP folder)."
        ),
    ] = None,
    filter_model: Annotated[
        str | None,
        typer.Option("--filter", help="Released filter (capfilt or transformers BLIP folder)."),
    ] = None,
    pretrain_after: Annotated[
        bool,
        typer.Option(
            "--pretrain-after", help="With released models: re-pretrain on human + kept too."
        ),
    ] = False,
    skip: Annotated[
        list[str] | None,
        typer.Option("--skip", help="Stage to leave out (repeatable, or comma-separated)."),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only this stage (repeatable, or comma-separated)."),
    ] = None,
    restart_from: Annotated[
        str | None,
        typer.Option(
            "--restart-from",
            help="Redo this stage and every later one (needed after a recipe or input "
            "change: the refusal names the earliest stage the change affects; a later one is "
            "refused too).",
        ),
    ] = None,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Pretrain on human + web → fine-tune captioner and filter → caption web → filter web and
    synthetic texts → re-pretrain on human + kept; all in --out, with a manifest.

    Re-running the same command resumes; a changed recipe or input is refused unless
    --restart-from names the stage to redo. With --captioner/--filter (released models) only
    caption + filter run (and the re-pretrain with --pretrain-after).
    """
    from capfilt.config import ConfigError
    from capfilt.pipeline.bootstrap import BootstrapInputs, run_bootstrap

    cfg = resolve(recipe, set_, dry_run)
    inputs = BootstrapInputs(
        human=list(human or []),
        web=list(web or []),
        test=list(test or []),
        captioner=captioner,
        filter=filter_model,
        pretrain_after=pretrain_after,
        rounds=rounds,
    )
    warnings: list[str] = []

    def warn(message: str) -> None:  # said before the first stage and again after the tables
        warnings.append(message)
        print_warning(message)

    try:
        summary = run_bootstrap(
            cfg,
            inputs,
            out_dir,
            skip=stage_names(skip),
            only=stage_names(only),
            restart_from=restart_from,
            on_stage=print_stage_event,
            on_warning=warn,
        )
    except ConfigError as err:
        raise fail(str(err), EXIT_USAGE) from None
    for table in summary_tables(summary):
        out.print(table)
    if not inputs.test:
        out.print("retrieval not evaluated: pass --test with held-out shards to compare the models")
    out.print(f"manifest: {out_dir / 'manifest.json'}")
    out.print(f"summary:  {out_dir / 'summary.json'}")
    out.print(f"report:   capfilt report {out_dir}")
    for message in warnings:
        print_warning(message)
    if summary.get("partial"):
        raise typer.Exit(EXIT_PARTIAL)
