"""``capfilt config``: show a resolved recipe, explain every field."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from capfilt.cli.common import RecipeArgument, SetOption, out, resolve
from capfilt.config import Recipe, explain

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
    table = Table("key", "type", "meaning", show_lines=False)
    for key, type_name, doc in explain(Recipe):
        if section is None or key.startswith(section):
            table.add_row(key, type_name, doc)
    out.print(table)
