"""Recipes: typed configs loaded from YAML with dotted command-line overrides."""

from __future__ import annotations

from pathlib import Path

from capfilt.config.core import (
    ConfigError,
    apply_overrides,
    config_hash,
    dump_yaml,
    explain,
    field_docs,
    from_dict,
    load_yaml,
    to_dict,
)
from capfilt.config.schema import (
    CaptionConfig,
    DataConfig,
    EvalConfig,
    FilterConfig,
    FinetuneConfig,
    ModelConfig,
    Recipe,
    RuntimeConfig,
    SynthConfig,
    TrainConfig,
)

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
"""Shipped recipes (the repository's ``recipes/``; present in a source checkout / editable install)."""


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe is a YAML path or the name of a shipped recipe (``tiny``, ``demo``, ``blip-base``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{recipe}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    raise ConfigError(
        f"recipe not found: '{recipe}' (a YAML path, or one of: {', '.join(names) or 'none shipped'})"
    )


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when None) and apply ``section.key=value`` overrides."""
    data = load_yaml(resolve_recipe_path(recipe)) if recipe is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)


__all__ = [
    "CaptionConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FilterConfig",
    "FinetuneConfig",
    "ModelConfig",
    "RECIPES_DIR",
    "Recipe",
    "RuntimeConfig",
    "SynthConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "dump_yaml",
    "explain",
    "field_docs",
    "from_dict",
    "load_recipe",
    "load_yaml",
    "resolve_recipe_path",
    "to_dict",
]
