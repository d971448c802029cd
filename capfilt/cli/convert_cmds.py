"""``capfilt convert``: BLIP's released checkpoints <-> capfilt model folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from capfilt.cli.common import out
from capfilt.config import ConfigError


def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="transformers BLIP folder or hub id, BLIP's original .pth, or a capfilt model/run folder."
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write.")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="capfilt | transformers | auto (auto: transformers for a capfilt folder, capfilt otherwise).",
        ),
    ] = "auto",
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help="captioner | filter (| pretrain for a full BLIP .pth). Default: from the checkpoint or the model's stage.",
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            "--tokenizer",
            help="Tokenizer folder or hub id: for a .pth (default bert-base-uncased, BLIP's; [DEC]/[ENC] are added), "
            "or to replace a transformers folder's.",
        ),
    ] = None,
    model_config: Annotated[
        Path | None,
        typer.Option(
            "--model-config",
            help='JSON of ModelConfig fields for a .pth (e.g. {"vision_heads": 16}); by default the dimensions are '
            "read off the tensors and head counts are width/64.",
        ),
    ] = None,
    momentum: Annotated[
        bool,
        typer.Option(
            "--momentum/--no-momentum", help="Keep a .pth's momentum encoders and queues."
        ),
    ] = True,
) -> None:
    """Convert BLIP's released checkpoints to capfilt model folders, and capfilt captioner/filter
    folders to transformers' BLIP format (BlipForConditionalGeneration / BlipForImageTextRetrieval).

    capfilt caption/filter/eval also take a transformers BLIP folder or hub id as --model directly;
    convert once to skip the conversion at every start.
    """
    from capfilt.runs.convert import convert as run_convert

    overrides = None
    if model_config is not None:
        try:
            overrides = json.loads(model_config.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--model-config {model_config}: {exc}") from exc
        if isinstance(overrides, dict) and overrides.get("model_type") == "blip":
            raise ConfigError(
                "--model-config takes capfilt ModelConfig fields, not a transformers config.json"
            )
    try:
        path, fmt, what = run_convert(
            source,
            out_dir,
            to=to,
            kind=kind,
            tokenizer=tokenizer,
            model_config=overrides,
            momentum=momentum,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    out.print(f"wrote a {fmt} {what} model to {path}")
