"""``capfilt pretrain`` and ``capfilt finetune captioner|filter``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.common import (
    DryRunOption,
    RecipeArgument,
    SetOption,
    out,
    print_warning,
    resolve,
)
from capfilt.config.core import parse_override

ShardsOption = Annotated[
    list[str],
    typer.Option(
        "--shards",
        help="Training shards: a folder, brace pattern, .tar, URL or pipe: command, or a list file (urls.txt, @file) of those (repeat for several sources; weights in data.weights).",
    ),
]
OutOption = Annotated[
    Path, typer.Option("--out", "-o", help="Run folder (config, metrics, checkpoints, model/).")
]


class Resume(str, Enum):
    """--resume's choices (an Enum: the help lists them, a typo exits 2 naming them)."""

    auto = "auto"
    never = "never"


ResumeOption = Annotated[
    Resume,
    typer.Option(
        "--resume",
        help="'auto': continue the run in --out from its latest checkpoint; 'never': refuse an existing run.",
    ),
]

finetune_app = typer.Typer(
    help="Fine-tune a pretrained model into the captioner (LM) or the filter (ITC + ITM).",
    no_args_is_help=True,
)


def _train(
    stage: str,
    recipe: str,
    shards: list[str],
    out_dir: Path,
    init: Path | None,
    resume: str,
    set_,
    dry_run: bool,
) -> None:
    from capfilt.train.trainer import TrainJob, train

    resume = Resume(resume).value
    cfg = resolve(recipe, set_, dry_run)
    if stage != "pretrain":  # train.* is pretraining's: a fine-tune has a section of its own
        keys = [parse_override(item)[0] for item in set_ or []]
        unused = [".".join(path) for path in keys if len(path) > 1 and path[0] == "train"]
        if unused:
            mine = ", ".join(f"finetune.{stage}.{key.removeprefix('train.')}" for key in unused)
            print_warning(
                f"{', '.join(unused)}: pretraining's settings, not used by finetune {stage} "
                f"(its own: {mine})"
            )
    model_dir = train(
        TrainJob(stage=stage, recipe=cfg, shards=shards, out=out_dir, init=init, resume=resume)
    )
    out.print(f"{stage}: model written to {model_dir}")


def pretrain(
    shards: ShardsOption,
    out_dir: OutOption,
    recipe: RecipeArgument = "demo",
    resume: ResumeOption = Resume.never,
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Pretrain a MED model from scratch with ITC + ITM + LM (BLIP's three losses).

    Several --shards sources are mixed by data.weights (default: by size). Under torchrun the
    same command runs data-parallel. Writes the run folder and OUT/model.
    """
    _train("pretrain", recipe, shards, out_dir, None, resume, set_, dry_run)


FINETUNE_HELP = {
    "captioner": "Fine-tune the captioner: LM only, with the caption prompt masked out (finetune.captioner).",
    "filter": "Fine-tune the filter: ITC + ITM, captions of one image are positives of each other (finetune.filter).",
}
"""The fine-tuning stages (``capfilt finetune STAGE``) and their help."""


def _finetune_command(stage: str):
    def finetune(
        init: Annotated[
            Path,
            typer.Option("--init", help="Pretrained run folder or model folder to start from."),
        ],
        shards: ShardsOption,
        out_dir: OutOption,
        recipe: RecipeArgument = "demo",
        resume: ResumeOption = Resume.never,
        set_: SetOption = None,
        dry_run: DryRunOption = False,
    ) -> None:
        _train(stage, recipe, shards, out_dir, init, resume, set_, dry_run)

    finetune.__name__ = f"finetune_{stage}"
    finetune.__doc__ = FINETUNE_HELP[stage]
    return finetune


for _stage in FINETUNE_HELP:
    finetune_app.command(_stage)(_finetune_command(_stage))
