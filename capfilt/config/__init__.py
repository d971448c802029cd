"""Recipes: typed configs loaded from YAML with dotted command-line overrides."""

from __future__ import annotations

from pathlib import Path

from capfilt.config.core import (
    ConfigError,
    apply_overrides,
    changed_keys,
    config_hash,
    dump_yaml,
    explain,
    field_docs,
    from_dict,
    load_yaml,
    to_dict,
    unknown_key_error,
)
from capfilt.config.schema import (
    CAPTION_METHODS,
    RERANK_SCORES,
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
    recipe_identity,
)

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
"""Shipped recipes: ``capfilt/recipes/``, package data, so a wheel (``pip install .`` or from git,
as on a cluster) has them as well as a source checkout."""


def shipped_recipe_names() -> list[str]:
    """Names of the shipped recipes (``tiny``, ``demo``, ...), sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe is a YAML path or the name of a shipped recipe (:func:`shipped_recipe_names`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{recipe}.yaml"
    if shipped.is_file():
        return shipped
    names = shipped_recipe_names()
    raise ConfigError(
        f"recipe not found: '{recipe}' (a YAML path, or one of: {', '.join(names) or 'none shipped'})"
    )


EXTENDS_KEY = "extends"
"""Top-level recipe key naming the recipe this one starts from (a shipped name or a path)."""


def _merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` laid on top, section by section (lists and values replace)."""
    out = dict(base)
    for key, value in over.items():
        if value is None and isinstance(out.get(key), dict):  # a section left empty (`train:`)
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe_data(recipe: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The recipe's mapping with its ``extends`` chain resolved (a base's fields, overridden by
    the recipe's own). A relative base path is taken from the extending recipe's folder."""
    path = resolve_recipe_path(recipe).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"recipes extend each other in a loop ({chain})")
    data = load_yaml(path)
    if isinstance(data.get("recipe"), dict) and "stage" in data:
        data = dict(data["recipe"])  # a training run folder's config.yaml: the recipe it ran
    base = data.pop(EXTENDS_KEY, None)
    unknown = unknown_key_error(Recipe, data)
    if unknown is not None:  # named here, where the file that holds the typo is known
        raise ConfigError(f"{path.name}: {unknown}")
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path.name}: extends: expected a recipe name or path, got {base!r}")
    relative = next(
        (p for p in (path.parent / base, path.parent / f"{base}.yaml") if p.is_file()), None
    )  # `extends: mine` finds mine.yaml beside this recipe before a shipped recipe of that name
    base_ref = relative if relative is not None else base
    try:
        base_data = load_recipe_data(base_ref, (*_seen, path))
    except ConfigError as err:
        raise ConfigError(f"{path.name}: extends: {err}") from None
    return _merge(base_data, data)


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when None), following ``extends``, and apply
    ``section.key=value`` overrides."""
    data = load_recipe_data(recipe) if recipe is not None else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)


__all__ = [
    "CAPTION_METHODS",
    "RERANK_SCORES",
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
    "changed_keys",
    "config_hash",
    "dump_yaml",
    "explain",
    "field_docs",
    "from_dict",
    "load_recipe",
    "load_recipe_data",
    "load_yaml",
    "recipe_identity",
    "resolve_recipe_path",
    "shipped_recipe_names",
    "to_dict",
]
