"""``capfilt config``: show a resolved recipe, explain every field."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from capfilt.cli.common import EXIT_USAGE, RecipeArgument, SetOption, fail, out, resolve
from capfilt.config import EXTENDS_KEY, Recipe, explain

app = typer.Typer(help="Inspect recipes and the config schema.", no_args_is_help=True)


@app.command("show")
def show(recipe: RecipeArgument = "demo", set_: SetOption = None) -> None:
    """Print a recipe resolved with its overrides (what a stage would run with)."""
    resolve(recipe, set_, dry_run=True)


@app.command("explain")
def explain_cmd(
    section: Annotated[
        str | None, typer.Argument(help="Only keys starting with this, e.g. 'train'.")
    ] = None,
) -> None:
    """List every recipe key with its type and meaning."""
    rows = [
        (
            EXTENDS_KEY,
            "str",
            "A recipe file only: the recipe it starts from (a shipped name, or a YAML path; "
            "`mine` finds mine.yaml beside the file). Its sections merge key by key.",
        ),
        *explain(Recipe),
    ]
    shown = [row for row in rows if section is None or row[0].startswith(section)]
    if not shown:
        sections = sorted({key.split(".")[0] for key, _, _ in rows})
        raise fail(
            f"no recipe key starts with '{section}'; sections: {', '.join(sections)}", EXIT_USAGE
        )
    table = Table("key", "type", "meaning", show_lines=False)
    for key, type_name, doc in shown:
        table.add_row(key, type_name, doc)
    out.print(table)
