"""``capfilt caption`` and ``capfilt filter``: the CapFilt shard stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.common import (
    EXIT_USAGE,
    DryRunOption,
    RecipeArgument,
    SetOption,
    fail,
    print_warning,
    report_origins,
    report_stage,
    resolve,
    warn_of_another_recipe,
)
from capfilt.data.workers import start_worker_server
from capfilt.utils.threads import use_threads

ShardsOption = Annotated[
    list[str],
    typer.Option(
        "--shards",
        help="Input shards: folder, brace pattern, .tar, URL or pipe: command, or a list file (urls.txt, @file) of those (repeatable).",
    ),
]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder for the shards.")]
ModelOption = Annotated[
    Path,
    typer.Option(
        "--model",
        "-m",
        help="A capfilt model folder or run folder (its model/ or latest checkpoint), or a "
        "transformers BLIP folder or hub id (converted as the stage starts; "
        "docs/blip-checkpoints.md).",
    ),
]


def caption(
    model: ModelOption,
    shards: ShardsOption,
    out_dir: OutOption,
    recipe: RecipeArgument = "demo",
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Write synthetic captions for every image (nucleus sampling by default; caption.* settings).

    Output shards keep every input field and add the captions to the json with origin
    'synthetic'. Resumable; under torchrun the shards are split over the ranks.
    """
    cfg = resolve(recipe, set_, dry_run, reads=("caption",))
    start_worker_server(cfg.caption.num_workers)  # its imports run beside the ones below
    from capfilt.pipeline.caption import caption_shards

    warn_of_another_recipe(model, cfg, "caption", "caption")
    with use_threads(cfg.runtime.threads, cfg.caption.num_workers):
        result = caption_shards(model, shards, out_dir, cfg.caption)
    report_stage(result, "caption")


def filter_(
    shards: ShardsOption,
    out_dir: OutOption,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="The filter: a capfilt model folder or run folder, or a transformers BLIP "
            "retrieval folder or hub id.",
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Keep a text when softmax(itm)[1] > threshold (default: the recipe's filter.threshold)."
        ),
    ] = None,
    scores_from: Annotated[
        Path | None,
        typer.Option(
            "--scores-from",
            help="Re-decide an earlier filter output's scores with this recipe's filter.* rule "
            "(threshold, itc_threshold, rule, keep_fraction), without the model.",
        ),
    ] = None,
    recipe: RecipeArgument = "demo",
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Keep the web and synthetic texts the filter accepts (filter.rule: ITM probability, ITC
    cosine or both; fixed thresholds or filter.keep_fraction of the whole run); write kept
    shards, per-text scores and a summary."""
    cfg = resolve(
        recipe, set_, dry_run, shortcuts={"filter.threshold": threshold}, reads=("filter", "data")
    )
    if threshold is not None and (cfg.filter.keep_fraction is not None or cfg.filter.rule == "itc"):
        decides = (
            "filter.keep_fraction sets the thresholds"
            if cfg.filter.keep_fraction is not None
            else "rule itc decides on the cosine (filter.itc_threshold)"
        )
        print_warning(f"--threshold (the ITM threshold) is not used: {decides}")
    if scores_from is not None and model is not None:
        print_warning("--model is not used: --scores-from re-decides the stored scores")
    if scores_from is None and model is not None:
        start_worker_server(cfg.filter.num_workers)  # its imports run beside the ones below
    from capfilt.pipeline.filter import filter_shards, rethreshold_shards

    if scores_from is not None:
        result = rethreshold_shards(scores_from, shards, out_dir, cfg.filter)
    elif model is None:
        raise fail("give --model (to score) or --scores-from (to re-apply a threshold)", EXIT_USAGE)
    else:
        warn_of_another_recipe(model, cfg, "filter", "filter")
        with use_threads(cfg.runtime.threads, cfg.filter.num_workers):
            result = filter_shards(model, shards, out_dir, cfg.filter, cfg.data.max_words)
    report_stage(result, "filter")
    report_origins(out_dir / "summary.json")
