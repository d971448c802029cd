"""``capfilt data``: the built-in benchmark and importers for real data."""

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
    report_stage,
    resolve,
)

app = typer.Typer(
    help="Make shards: the built-in benchmark, or imports of real data.", no_args_is_help=True
)
import_app = typer.Typer(help="Import real image-caption data as shards.", no_args_is_help=True)
app.add_typer(import_app, name="import")

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder for the shards.")]
OriginOption = Annotated[
    str,
    typer.Option(help="Caption origin recorded in the json: human (curated) or web (alt-text)."),
]
ShardSizeOption = Annotated[int, typer.Option(help="Samples per shard.")]
SubsetOption = Annotated[
    str | None,
    typer.Option(
        "--subset",
        help="Import only the source's images START:END, in its order (COCO by image id, folders "
        "by file name, tables by row): --subset :60 and --subset 60: split one source in two "
        "(e.g. web and test).",
        metavar="START:END",
    ),
]


@app.command("synth")
def synth(
    out_dir: OutOption,
    recipe: RecipeArgument = "demo",
    set_: SetOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Write the built-in benchmark: human/, web/ (noisy, with stored truth) and test/ shards.

    Deterministic by `synth.seed`; an interrupted run re-run with the same command resumes and
    gives byte-identical shards.
    """
    from capfilt.data.synth import write_synth

    cfg = resolve(recipe, set_, dry_run, reads=("synth",))
    summary = write_synth(out_dir, cfg.synth)
    for split, info in summary["splits"].items():
        out.print(f"{split:>6}: {info['count']} images in {out_dir / split}")
    if summary.get("partial"):
        raise typer.Exit(EXIT_PARTIAL)


def _run_import(
    records_fn,
    *,
    source: str,
    out_dir: Path,
    origin: str,
    shard_size: int,
    settings: dict,
    subset: str | None,
) -> None:
    from capfilt.data.importers import ImportSourceError, import_records

    try:
        records = records_fn()
        result = import_records(
            records,
            out_dir,
            source=source,
            origin=origin,
            shard_size=shard_size,
            settings=settings,
            subset=subset,
        )
    except ImportSourceError as err:
        raise fail(str(err), EXIT_USAGE) from None
    report_stage(result, f"import {source}")


@import_app.command("coco")
def import_coco(
    annotations: Annotated[Path, typer.Argument(help="COCO caption json (captions_*.json).")],
    images: Annotated[Path, typer.Argument(help="Folder with the images named in the json.")],
    out_dir: OutOption,
    origin: OriginOption = "human",
    shard_size: ShardSizeOption = 1000,
    subset: SubsetOption = None,
) -> None:
    """Import a COCO-format caption file and its image folder (one sample per image, all captions)."""
    from capfilt.data.importers import coco_records

    _run_import(
        lambda: coco_records(annotations, images),
        source="coco",
        out_dir=out_dir,
        origin=origin,
        shard_size=shard_size,
        subset=subset,
        settings={"annotations": str(annotations.resolve()), "images": str(images.resolve())},
    )


@import_app.command("csv")
def import_csv(
    table: Annotated[Path, typer.Argument(help="CSV or TSV file (TSV by .tsv extension).")],
    out_dir: OutOption,
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder image paths are relative to (default: the table's folder)."),
    ] = None,
    image_column: Annotated[str, typer.Option(help="Column with the image path.")] = "image",
    caption_column: Annotated[str, typer.Option(help="Column with the caption.")] = "caption",
    origin: OriginOption = "web",
    shard_size: ShardSizeOption = 1000,
    subset: SubsetOption = None,
) -> None:
    """Import a table of image paths and captions (rows of the same image are merged)."""
    from capfilt.data.importers import table_records

    _run_import(
        lambda: table_records(table, image_root, image_column, caption_column),
        source="csv",
        out_dir=out_dir,
        origin=origin,
        shard_size=shard_size,
        subset=subset,
        settings={
            "table": str(table.resolve()),
            "image_root": str(image_root),
            "columns": [image_column, caption_column],
        },
    )


@import_app.command("folder")
def import_folder(
    folder: Annotated[
        Path, typer.Argument(help="Folder of images, each with a sidecar <name>.txt caption file.")
    ],
    out_dir: OutOption,
    origin: OriginOption = "web",
    shard_size: ShardSizeOption = 1000,
    subset: SubsetOption = None,
) -> None:
    """Import an image folder with sidecar .txt captions (one caption per line)."""
    from capfilt.data.importers import folder_records

    _run_import(
        lambda: folder_records(folder),
        source="folder",
        out_dir=out_dir,
        origin=origin,
        shard_size=shard_size,
        subset=subset,
        settings={"folder": str(folder.resolve())},
    )


@import_app.command("hf")
def import_hf(
    path: Annotated[
        Path,
        typer.Argument(
            help="A `datasets` dataset saved with save_to_disk, or a parquet file/folder."
        ),
    ],
    out_dir: OutOption,
    image_column: Annotated[
        str, typer.Option(help="Image column (datasets Image feature, bytes or path).")
    ] = "image",
    caption_column: Annotated[
        str, typer.Option(help="Caption column (a string or a list of strings).")
    ] = "caption",
    origin: OriginOption = "web",
    shard_size: ShardSizeOption = 1000,
    subset: SubsetOption = None,
) -> None:
    """Import a Hugging Face dataset saved on disk, or parquet files with an image column."""
    from capfilt.data.importers import hf_records

    _run_import(
        lambda: hf_records(path, image_column, caption_column),
        source="hf",
        out_dir=out_dir,
        origin=origin,
        shard_size=shard_size,
        subset=subset,
        settings={"path": str(path.resolve()), "columns": [image_column, caption_column]},
    )
