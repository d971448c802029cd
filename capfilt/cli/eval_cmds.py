"""``capfilt eval ...``: evaluation commands (the work lives in :mod:`capfilt.eval`).

    capfilt eval retrieval demo --model runs/pretrain --shards data/test --k 32 --out results.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    DryRunOption,
    RecipeArgument,
    SetOption,
    fail,
    out,
    resolve,
)

app = typer.Typer(help="Evaluate a model: image-text retrieval.", no_args_is_help=True)


@app.callback()
def _group() -> None:  # a callback keeps `eval` a group (`capfilt eval retrieval`) while it has one command
    """Evaluate a model: image-text retrieval (SPEC §4)."""


def _print_retrieval(result: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"retrieval: {result['n_images']} images, {result['n_texts']} texts, k = {result['k']}",
        caption=f"mean recall {result['r_mean']:.2f}; {result['seconds']:.1f} s",
    )
    table.add_column("")
    for name in ("R@1", "R@5", "R@10", "mean"):
        table.add_column(name, justify="right")
    for prefix, label in (("tr", "text retrieval (image→text)"), ("ir", "image retrieval (text→image)")):
        table.add_row(label, *(f"{result[f'{prefix}_{key}']:.2f}" for key in ("r1", "r5", "r10", "mean")))
    out.print(table)


@app.command("retrieval")
def retrieval(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model folder, or a run folder (its model/ or latest checkpoint).")],
    shards: Annotated[list[str], typer.Option("--shards", help="Test shards: folder, brace pattern or .tar (repeatable).")],
    k: Annotated[int | None, typer.Option("--k", help="Candidates re-ranked by ITM per query; 0 = ITC only (default: the recipe's eval.k).")] = None,
    out_path: Annotated[Path | None, typer.Option("--out", "-o", help="Write the metrics to this JSON file.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="torch device (default: cuda when available, else cpu).")] = None,
    recipe: RecipeArgument = "demo",
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Image-text retrieval, BLIP scheme: ITC top-k then ITM + cosine re-rank; TR/IR R@1/5/10.

    Every caption of a test image is a query and a candidate; an image counts as retrieved when any of its captions is ranked within K.

    Under torchrun the re-rank is split over the ranks.
    """
    from capfilt.config import ConfigError
    from capfilt.data.shards import ShardSpecError, expand_shards
    from capfilt.eval.retrieval import evaluate_retrieval
    from capfilt.utils.dist import current_dist_info

    overrides = list(set_ or [])
    if k is not None:
        overrides.append(f"eval.k={k}")
    cfg = resolve(recipe, overrides, dry_run)
    if cfg.eval.k < 0:
        raise fail(f"--k: must be >= 0, got {cfg.eval.k}", EXIT_USAGE)
    try:
        urls = expand_shards(shards)  # fail fast on a bad --shards, before loading the model
        result = evaluate_retrieval(
            model, urls, k=cfg.eval.k, batch_size=cfg.eval.batch_size, max_words=cfg.data.max_words,
            device=device, show_progress=True,
        )  # fmt: skip
    except (ShardSpecError, ConfigError) as err:
        raise fail(str(err), EXIT_USAGE) from None
    except ValueError as err:
        raise fail(str(err), EXIT_FAILURE) from None

    if not current_dist_info().is_main:
        return
    _print_retrieval(result)
    if out_path is not None:
        from capfilt.pipeline.common import write_json

        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(out_path, {**result, "model": str(model), "shards": urls})
        out.print(f"wrote {out_path}")
