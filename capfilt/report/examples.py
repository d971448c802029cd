"""Example images for the report: thumbnails from ``data/web_captioned`` with every text's score,
decision and (in the built-in benchmark) truth.

Examples are picked round-robin over outcome categories (noise caught, clean kept, noise missed,
clean rejected, synthetic caption rejected), so the page shows the filter's successes and its
mistakes, not just the first images of the first shard.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from capfilt.report.load import folder_label
from capfilt.utils.logging import get_logger

log = get_logger("report")

THUMB_SIZE = 128
"""Thumbnail side in px; the built-in world's 64 px images are upscaled 2× with nearest-neighbour."""

MAX_SCAN = 2000
"""Samples read at most while looking for examples of every category (keeps the report fast)."""

CATEGORIES = (
    "noise rejected",
    "clean kept",
    "noise kept",
    "clean rejected",
    "synthetic rejected",
    "noisy web text",
    "clean web text",
    "other",
)
"""Outcome categories, in the order the round-robin picks from them."""


@dataclass
class TextEntry:
    text: str
    origin: str
    score: float | None = None
    kept: bool | None = None
    truth: str | None = None
    """``clean``/``noise: <kind>`` for web texts, ``true caption``/``false caption`` for synthetic ones, else None."""
    ok: bool | None = None
    """Whether the truth says the text matches the image (None when unknown)."""


@dataclass
class Example:
    key: str
    image_uri: str
    entries: list[TextEntry] = field(default_factory=list)
    category: str = "other"


def thumbnail_uri(image: Image.Image, size: int = THUMB_SIZE) -> str:
    """A ``data:image/png;base64,...`` URI: small images upscaled by an integer factor with
    nearest-neighbour (crisp pixels), large ones shrunk to ``size``."""
    image = image.convert("RGB")
    w, h = image.size
    scale = max(1, math.floor(size / max(w, h)))
    if scale > 1:
        image = image.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    elif max(w, h) > size:
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _score_index(
    texts: pd.DataFrame | None,
) -> dict[tuple[str, str], tuple[float | None, bool, Any, Any]]:
    """(uid, text) → (itm_score, kept, clean, noise) from the filter's per-text table."""
    if texts is None or texts.empty:
        return {}
    clean = texts["clean"] if "clean" in texts.columns else pd.Series([None] * len(texts))
    noise = texts["noise"] if "noise" in texts.columns else pd.Series([None] * len(texts))
    index = {}
    for uid, text, score, kept, c, n in zip(
        texts["uid"], texts["text"], texts["itm_score"], texts["kept"], clean, noise, strict=True
    ):
        score = None if pd.isna(score) else float(score)
        index.setdefault(
            (uid, text),
            (score, bool(kept), None if pd.isna(c) else bool(c), None if pd.isna(n) else str(n)),
        )
    return index


def _synthetic_truth(text: str, scene: Any) -> bool | None:
    """Whether a synthetic caption is true of the benchmark scene (None outside the benchmark)."""
    if not isinstance(scene, dict):
        return None
    try:
        from capfilt.data.synth.truth import caption_is_true

        return bool(caption_is_true(text, scene))
    except Exception:  # not a scene of the built-in world, or a caption it cannot judge
        return None


def _web_truth(clean: Any, noise: Any) -> tuple[str | None, bool | None]:
    if clean is None and noise in (None, ""):
        return None, None
    if clean is None:
        clean = noise == "none"
    if clean:
        return "clean", True
    return f"noise: {noise}" if noise not in (None, "", "none") else "noisy", False


def build_entries(
    key: str, captions: list[dict[str, Any]], truth: Any, scores: dict
) -> list[TextEntry]:
    truth = truth if isinstance(truth, dict) else {}
    entries = []
    for cap in captions:
        text, origin = str(cap.get("text", "")), str(cap.get("origin", "web"))
        score, kept, clean, noise = scores.get((key, text), (None, None, None, None))
        if score is None and isinstance(cap.get("itm_score"), int | float):
            score = float(cap["itm_score"])
        entry = TextEntry(text=text, origin=origin, score=score, kept=kept)
        if origin == "web":
            entry.truth, entry.ok = _web_truth(
                clean if clean is not None else truth.get("clean"),
                noise if noise is not None else truth.get("noise"),
            )
        entries.append(entry)
    return entries


def add_synthetic_truth(entries: list[TextEntry], truth: Any) -> None:
    """Judge each synthetic caption against the benchmark scene (done only for shown examples:
    parsing captions is the slow part of scanning)."""
    scene = truth.get("scene") if isinstance(truth, dict) else None
    for entry in entries:
        if entry.origin == "synthetic":
            entry.ok = _synthetic_truth(entry.text, scene)
            if entry.ok is not None:
                entry.truth = "true caption" if entry.ok else "false caption"


def categorize(entries: list[TextEntry]) -> str:
    web = next((e for e in entries if e.origin == "web"), None)
    if web is not None and web.ok is not None and web.kept is not None:
        return {
            (False, False): "noise rejected",
            (True, True): "clean kept",
            (False, True): "noise kept",
            (True, False): "clean rejected",
        }[(web.ok, web.kept)]
    if any(e.origin == "synthetic" and e.kept is False for e in entries):
        return "synthetic rejected"
    if web is not None and web.ok is not None:  # no decision yet: only the truth is known
        return "clean web text" if web.ok else "noisy web text"
    return "other"


def _iter_samples(folder: Path, missing: list[str], label: str) -> Iterator[Any]:
    from capfilt.data.reader import SkipCounter, read_samples
    from capfilt.data.shards import ShardSpecError, expand_shards

    try:
        urls = expand_shards(str(folder))
    except ShardSpecError as err:
        missing.append(f"{label}: {err}: no example images")
        return
    counter = SkipCounter("report")
    yield from read_samples(urls, counter)
    if counter.total:
        missing.append(
            f"{label}: {counter.total} unreadable sample(s) skipped ({', '.join(counter.as_dict())})"
        )


def pick_examples(
    run_dir: Path,
    texts: pd.DataFrame | None,
    missing: list[str],
    n: int = 12,
    folder: Path | None = None,
) -> list[Example]:
    """Up to ``n`` examples from ``run_dir/data/web_captioned`` (or the shards of ``folder``),
    mixed over outcome categories."""
    folder = run_dir / "data" / "web_captioned" if folder is None else folder
    label = folder_label(folder, run_dir)
    if not folder.is_dir():
        missing.append(f"{label}/ not found: no example images")
        return []
    scores = _score_index(texts)
    notes_before = len(missing)
    pools: dict[str, list[Any]] = {c: [] for c in CATEGORIES}
    try:
        for i, sample in enumerate(_iter_samples(folder, missing, label)):
            if i >= MAX_SCAN or all(len(p) >= n for p in pools.values()):
                break
            captions = sample.captions or [{"text": sample.text, "origin": "web"}]
            entries = build_entries(sample.key, captions, sample.meta.get("truth"), scores)
            category = categorize(entries)
            if len(pools[category]) < n:
                pools[category].append((sample, entries))
    except Exception as err:
        # a report must render even when a shard is damaged in an unexpected way
        log.warning("reading example shards failed: %s", err)
        missing.append(f"{label}: reading stopped early ({type(err).__name__}: {err})")
    chosen: list[Example] = []
    depth = 0
    while len(chosen) < n and any(depth < len(p) for p in pools.values()):
        for category in CATEGORIES:
            if depth < len(pools[category]) and len(chosen) < n:
                sample, entries = pools[category][depth]
                add_synthetic_truth(entries, sample.meta.get("truth"))
                chosen.append(
                    Example(
                        key=sample.key,
                        image_uri=thumbnail_uri(sample.image),
                        entries=entries,
                        category=category,
                    )
                )
        depth += 1
    if not chosen and len(missing) == notes_before:
        missing.append(f"{label}/ holds no readable samples: no example images")
    return chosen
