"""Turn real image–caption data into capfilt shards (``capfilt data import``).

Sources: a COCO caption json + image folder, a CSV/TSV of ``image,caption``, an image folder
with sidecar ``.txt`` captions, and a Hugging Face ``datasets`` dataset saved with
``save_to_disk`` or parquet files with an image column. Images are stored as their original
bytes (no re-encoding), so they read back exactly; an image that does not decode or a sample
without caption is dropped, recorded in the shard's parquet and counted in its stats.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from capfilt.config import config_hash
from capfilt.data.reader import SampleError, decode_image
from capfilt.data.sample import build_sample, caption_entry, make_key
from capfilt.data.stage import StageResult, run_shard_stage
from capfilt.data.writer import ShardWriter

IMAGE_SUFFIXES = {
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".png": "png",
    ".webp": "webp",
    ".gif": "gif",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
}
PIL_FORMAT_EXT = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tiff",
}
MISSING_IMAGE_HINT = (
    "Image paths of `data import csv` are resolved against --image-root (default: the table's "
    "folder), those of `data import coco` against the image folder"
)


class ImportSourceError(ValueError):
    """The import source is unusable as a whole (missing file, missing column, ...)."""


@dataclass
class ImportRecord:
    """One image and its captions, loaded lazily so memory stays flat."""

    uid: str
    load: Callable[[], bytes]
    captions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    """The image file, when there is one: its size and mtime join the import's done-markers."""


def _read_file(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _sniff_ext(data: bytes) -> str:
    """Image container → shard extension; raises ``SampleError`` for data the shard reader would
    reject (undecodable, too large, a format it does not take)."""
    decode_image(data)
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format
    if fmt not in PIL_FORMAT_EXT:
        raise SampleError("undecodable_image", f"unsupported image format {fmt}")
    return PIL_FORMAT_EXT[fmt]


def coco_records(annotations: str | Path, images: str | Path) -> list[ImportRecord]:
    """COCO caption format: ``images[].file_name/id`` and ``annotations[].image_id/caption``."""
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise ImportSourceError(f"COCO annotation file not found: {annotations}")
    if not images.is_dir():
        raise ImportSourceError(f"image folder not found: {images}")
    data = json.loads(annotations.read_text())
    if "images" not in data or "annotations" not in data:
        raise ImportSourceError(
            f"{annotations} is not a COCO caption file (needs 'images' and 'annotations')"
        )
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    records = []
    for img in sorted(data["images"], key=lambda im: im["id"]):
        path = images / img["file_name"]
        meta = {"coco_id": img["id"], "file_name": img["file_name"]}
        records.append(
            ImportRecord(
                make_key("coco", img["id"]),
                _read_file(path),
                captions.get(img["id"], []),
                meta,
                path,
            )
        )
    return records


def table_records(
    path: str | Path,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    sep: str | None = None,
) -> list[ImportRecord]:
    """CSV/TSV rows of ``image,caption``; rows naming the same image become one sample."""
    path = Path(path)
    if not path.is_file():
        raise ImportSourceError(f"table not found: {path}")
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    # TSV has no quoting: a caption that starts with '"' keeps its quotes
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=quoting)
    for column in (image_column, caption_column):
        if column not in table.columns:
            raise ImportSourceError(
                f"{path} has no column '{column}' (columns: {', '.join(table.columns)})"
            )
    root = Path(image_root) if image_root else path.parent
    grouped: dict[str, list[str]] = {}
    for image, caption in zip(table[image_column], table[caption_column]):
        grouped.setdefault(image, [])
        if caption.strip():
            grouped[image].append(caption)
    return [
        ImportRecord(
            make_key("row", i, Path(image).stem),
            _read_file(root / image),
            caps,
            {"image_path": image},
            root / image,
        )
        for i, (image, caps) in enumerate(grouped.items())
    ]


def folder_records(folder: str | Path) -> list[ImportRecord]:
    """Every image in ``folder`` (recursively) with the text of ``<stem>.txt`` beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportSourceError(f"image folder not found: {folder}")
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = path.with_suffix(".txt")
        captions = []
        if sidecar.is_file():
            try:
                captions = [
                    line.strip()
                    for line in sidecar.read_text(encoding="utf-8").splitlines()
                    if line.strip()
                ]
            except UnicodeDecodeError:
                captions = []
        rel = path.relative_to(folder)
        records.append(
            ImportRecord(
                make_key("file", *rel.with_suffix("").parts),
                _read_file(path),
                captions,
                {"file": str(rel)},
                path,
            )
        )
    return records


def _image_bytes(value: Any, base: Path | None) -> bytes:
    """An HF/parquet image cell: {'bytes', 'path'} dict, raw bytes, a path, or a PIL image."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            path = Path(value["path"])
            return (path if path.is_absolute() or base is None else base / path).read_bytes()
        raise ValueError("image cell has neither bytes nor path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        path = Path(value)
        return (path if path.is_absolute() or base is None else base / path).read_bytes()
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"unsupported image cell of type {type(value).__name__}")


def _caption_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, Sequence) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        return [str(v) for v in items if isinstance(v, str) and v.strip()]
    return []


def hf_records(
    path: str | Path, image_column: str = "image", caption_column: str = "caption"
) -> list[ImportRecord]:
    """A ``datasets`` dataset saved with ``save_to_disk``, or parquet file(s) with an image column."""
    path = Path(path)
    if path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
    ):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else sorted(ds)[0]
            ds = ds[split]
        for column in (image_column, caption_column):
            if column not in ds.column_names:
                raise ImportSourceError(
                    f"{path} has no column '{column}' (columns: {', '.join(ds.column_names)})"
                )
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        captions = ds[caption_column]
        return [
            ImportRecord(
                make_key("hf", i),
                (lambda i=i: _image_bytes(ds[i][image_column], path)),
                _caption_list(c),
                {"row": i},
            )
            for i, c in enumerate(captions)
        ]
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ImportSourceError(
            f"no dataset saved with save_to_disk and no parquet files at {path}"
        )
    records = []
    for file_index, file in enumerate(files):
        import pyarrow.parquet as pq

        schema = pq.read_schema(file)
        for column in (image_column, caption_column):
            if column not in schema.names:
                raise ImportSourceError(
                    f"{file} has no column '{column}' (columns: {', '.join(schema.names)})"
                )
        captions = pq.read_table(file, columns=[caption_column]).column(caption_column).to_pylist()
        for row, value in enumerate(captions):

            def load(file=file, row=row):
                return _image_bytes(_parquet_images(file, image_column)[row].as_py(), file.parent)

            records.append(
                ImportRecord(
                    make_key("pq", file_index, row),
                    load,
                    _caption_list(value),
                    {"file": file.name, "row": row},
                )
            )
    return records


@lru_cache(maxsize=1)
def _parquet_images(file: Path, column: str):
    """The image column of one parquet file, kept while its rows are written (files are read in order)."""
    import pyarrow.parquet as pq

    return pq.read_table(file, columns=[column]).column(column)


def select_records(records: list[ImportRecord], subset: str) -> list[ImportRecord]:
    """The records ``START:END`` (a Python slice of non-negative ints, either end optional) of
    ``records``, in the source's order (COCO by image id, folders by name, tables by row)."""
    match = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", subset)
    if match is None:
        raise ImportSourceError(
            f"--subset {subset!r}: expected START:END, e.g. :50 (the first 50 images) or 50: "
            "(the rest)"
        )
    start = int(match.group(1)) if match.group(1) else None
    end = int(match.group(2)) if match.group(2) else None
    chosen = records[start:end]
    if not chosen:
        raise ImportSourceError(
            f"--subset {subset} selects none of the source's {len(records)} images"
        )
    return chosen


def import_records(
    records: list[ImportRecord],
    out_dir: str | Path,
    *,
    source: str,
    origin: str = "human",
    shard_size: int = 1000,
    settings: dict[str, Any] | None = None,
    subset: str | None = None,
) -> StageResult:
    """Write ``records`` (or the ``subset`` START:END of them: :func:`select_records`) as shards
    of ``shard_size`` samples; resumable like every stage."""
    if not records:
        raise ImportSourceError(f"{source}: the source has no images")
    if subset is not None:
        records = select_records(records, subset)
        settings = {**(settings or {}), "subset": subset}
    if shard_size < 1:
        raise ImportSourceError("shard size must be >= 1")
    caption_entry("", origin)  # validates origin early
    n_shards = (len(records) + shard_size - 1) // shard_size
    chash = config_hash(
        {
            "stage": "import",
            "source": source,
            "origin": origin,
            "shard_size": shard_size,
            "n": len(records),
            **(settings or {}),
        }
    )

    def produce(index: int, writer: ShardWriter) -> dict:
        for record in records[index * shard_size : (index + 1) * shard_size]:
            row = {"uid": record.uid, "n_captions": len(record.captions)}
            if not record.captions:
                writer.skip("missing_caption", row)
                continue
            try:
                data = record.load()
            except OSError as err:
                writer.skip("missing_image", {**row, "detail": str(err)})
                continue
            except ValueError as err:
                writer.skip("bad_image_cell", {**row, "detail": str(err)})
                continue
            try:
                ext = _sniff_ext(data)
            except SampleError as err:
                writer.skip(err.reason, {**row, "detail": err.detail})
                continue
            captions = [caption_entry(c, origin) for c in record.captions]
            writer.write(
                build_sample(
                    record.uid, data, captions, image_ext=ext, source=source, **record.meta
                )
            )
            writer.record({**row, "status": "kept", "reason": ""})
        return {"source": source}

    sizes = [len(records[i * shard_size : (i + 1) * shard_size]) for i in range(n_shards)]
    return run_shard_stage(
        out_dir,
        n_shards,
        produce,
        stage="import",
        config_hash=chash,
        samples_per_shard=sizes,
        desc=f"import {source}",
        inputs=[
            [str(r.path) for r in records[i * shard_size : (i + 1) * shard_size] if r.path]
            for i in range(n_shards)
        ],
        hints={"missing_image": MISSING_IMAGE_HINT},
    )
