"""Shared CLI pieces: recipe loading with overrides, exit codes, error reporting."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.syntax import Syntax

from capfilt.config import ConfigError, Recipe, dump_yaml, load_recipe

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3

console = Console(stderr=True)
out = Console()

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe field, e.g. --set train.lr=1e-4 (repeatable; `capfilt config explain` lists the keys).",
        metavar="KEY=VALUE",
    ),
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")
]
RecipeArgument = Annotated[
    str,
    typer.Argument(
        help="Recipe: a YAML path or a shipped name (tiny, demo, blip-base).", show_default=True
    ),
]


def fail(message: str, code: int = EXIT_FAILURE) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def resolve(
    recipe: str, overrides: list[str] | None, dry_run: bool = False, shortcuts: dict | None = None
) -> Recipe:
    """Load the recipe with overrides; config errors exit 2; ``--dry-run`` prints it and exits 0.

    ``shortcuts`` maps recipe keys to the values of dedicated options (``--threshold`` for
    ``filter.threshold``); those given (not None) apply after the ``--set`` overrides.
    """
    overrides = list(overrides or []) + [
        f"{key}={value}" for key, value in (shortcuts or {}).items() if value is not None
    ]
    try:
        cfg = load_recipe(recipe, overrides)
    except ConfigError as err:
        raise fail(str(err), EXIT_USAGE) from None
    if dry_run:
        if out.is_terminal:
            out.print(Syntax(dump_yaml(cfg), "yaml"))
        else:  # plain YAML that scripts can parse (rich would wrap long lines)
            typer.echo(dump_yaml(cfg), nl=False)
        raise typer.Exit(EXIT_OK)
    return cfg


def report_stage(result, what: str) -> None:
    """Print a shard stage's counts; exit 3 (partial) when some shards failed."""
    stats = result.stats
    out.print(
        f"{what}: {stats['count']} samples written of {stats['input_count']} read, in {result.out_dir}"
    )
    for reason, count in stats["skipped"].items():
        out.print(f"  skipped {count} bad input sample(s): {reason}")
    if result.partial:
        out.print(
            f"[yellow]{len(result.failed)} shard(s) failed; re-run the same command to retry[/]"
        )
        raise typer.Exit(EXIT_PARTIAL)


def print_stage_event(event) -> None:
    """One line per bootstrap/demo stage event, saying where its output is."""
    where = f"→ {event.output}"
    if event.status == "start":
        out.print(f"[bold]{event.key}[/]: running {where}")
    elif event.status == "done":
        out.print(f"[bold]{event.key}[/]: done in {event.seconds:.1f} s {where}")
    elif event.status == "done-earlier":
        out.print(f"{event.key}: done earlier {where}")
    elif event.status == "skipped":
        out.print(f"{event.key}: skipped (--skip/--only)")
    else:
        out.print(f"[yellow]{event.key}: some shards failed {where}; re-run to retry[/]")
