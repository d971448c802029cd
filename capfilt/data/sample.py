"""The one sample layout every stage reads and writes (docs/architecture.md, "One sample").

A sample is ``__key__`` (stable uid, no dots), one image field (``jpg``/``png``/``webp``/``gif``/``bmp``/``tiff``; a GIF's first frame is used), ``txt``
(the caption used for training) and ``json``: ``uid``, ``source``, ``captions`` (a list of
``{"text", "origin"}`` with origin ``web|synthetic|human``, plus scores where a stage adds them)
and any ground-truth fields (``truth`` in the built-in benchmark; no training stage reads it).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
ORIGINS = ("web", "synthetic", "human")

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: Any) -> str:
    """A tar-safe sample key from parts: no dots or slashes (webdataset splits keys at dots)."""
    key = "_".join(_KEY_BAD.sub("-", str(p)).strip("-") for p in parts if str(p) != "")
    if not key:
        raise ValueError(f"cannot make a sample key from {parts!r}")
    return key


def caption_entry(text: str, origin: str, **fields: Any) -> dict[str, Any]:
    if origin not in ORIGINS:
        raise ValueError(f"caption origin must be one of {ORIGINS}, got {origin!r}")
    return {"text": text, "origin": origin, **fields}


def reference_texts(captions: list[dict[str, Any]]) -> list[str]:
    """The texts an evaluation scores against: every caption but the synthetic ones (on shards a
    caption stage wrote, its captioner's own output would count as a reference)."""
    return [c["text"] for c in captions if c.get("origin") != "synthetic"]


def build_sample(
    key: str,
    image: bytes,
    captions: list[dict[str, Any]],
    /,
    *,
    image_ext: str = "jpg",
    source: str = "",
    **meta: Any,
) -> dict[str, Any]:
    """Assemble a shard sample; ``txt`` is the first caption's text."""
    if image_ext not in IMAGE_EXTS:
        raise ValueError(f"image extension must be one of {IMAGE_EXTS}, got {image_ext!r}")
    if not captions:
        raise ValueError(f"sample {key!r} has no caption")
    info = {"uid": key, "source": source, "captions": captions, **meta}
    return {"__key__": key, image_ext: image, "txt": captions[0]["text"], "json": info}


class InputSample(Protocol):
    """What a stage's output sample takes from its input (:class:`capfilt.data.reader.Sample`)."""

    key: str
    meta: dict[str, Any]
    image_bytes: bytes
    image_ext: str
    extra: dict[str, bytes]


def output_sample(
    sample: InputSample, captions: list[dict[str, Any]], txt: str, **meta: Any
) -> dict[str, Any]:
    """A stage's output sample from an input ``sample``: image and extra members passed through,
    the json kept with ``captions`` replaced, ``meta`` added (and ``uid`` set when absent), ``txt``
    set to ``txt``."""
    info = {**sample.meta, "captions": captions, **meta}
    info.setdefault("uid", sample.key)
    return {
        "__key__": sample.key,
        sample.image_ext: sample.image_bytes,
        "json": info,
        **sample.extra,
        "txt": txt,
    }
