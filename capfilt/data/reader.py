"""Streaming shard reader that skips bad samples and counts them by reason.

Bad input never kills a job: a truncated tar ends its shard early, an
undecodable image, a missing or non-UTF-8 caption or broken json drops that sample, and each is
counted in a ``SkipCounter`` and logged at a bounded rate. Memory does not grow with the number
of shards: tars are read as streams, one at a time.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from capfilt.data.sample import IMAGE_EXTS
from capfilt.utils.logging import RateLimitedLog, get_logger

log = get_logger("reader")

_TAR_ERRORS = (
    tarfile.TarError,
    OSError,
    EOFError,
)  # bound here: generators closed at interpreter exit can't look up modules

Image.MAX_IMAGE_PIXELS = (
    20_000 * 20_000
)  # web images can be big; decompression bombs beyond this still fail


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the stats key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SkipCounter:
    """Counts skipped samples by reason; warns at a bounded rate."""

    def __init__(self, name: str = "reader"):
        self.counts: Counter[str] = Counter()
        self._log = RateLimitedLog(get_logger(name))

    def skip(self, reason: str, where: str = "", detail: str = "") -> None:
        self.counts[reason] += 1
        self._log.warning(
            "skipping %s%s%s",
            reason,
            f" at {where}" if where else "",
            f" ({detail})" if detail else "",
        )

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Sample:
    """A decoded sample; ``image_bytes``/``image_ext`` keep the original encoding for pass-through."""

    key: str
    url: str
    image: Image.Image
    text: str
    captions: list[dict[str, Any]]
    meta: dict[str, Any]
    image_bytes: bytes = b""
    image_ext: str = "jpg"
    extra: dict[str, bytes] = field(default_factory=dict)


def _open_stream(url: str):
    if url.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def iter_tar_samples(url: str, counter: SkipCounter | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, ext → bytes) of one tar, grouped by key.

    A tar that ends early or is corrupt yields what came before the damage and is counted once
    as ``truncated_tar``; a sample cut by the damage is left to the decoder to reject.
    """
    counter = counter or SkipCounter()
    current: dict[str, Any] | None = None
    try:
        with _open_stream(url) as fh, tarfile.open(fileobj=fh, mode="r|*") as stream:
            for info in stream:
                if not info.isreg():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                if "." not in name or name.startswith("."):
                    continue
                key, ext = name.split(".", 1)
                key = info.name[: len(info.name) - len(ext) - 1]
                data = stream.extractfile(info).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = data
    except _TAR_ERRORS as err:
        counter.skip("truncated_tar", url, str(err))
    if current is not None:
        yield current


def _meta_of(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's json object ({} when it has none)."""
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise SampleError("bad_json", str(err)) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "json is not an object")
    return meta


def _text_of(raw: dict[str, Any]) -> str:
    """The sample's txt ("" when missing or blank)."""
    if "txt" not in raw:
        return ""
    try:
        text = raw["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise SampleError("non_utf8_text") from None
    return text if text.strip() else ""


def _captions_of(meta: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """The json's caption entries when well formed, else the txt as one web caption."""
    captions = meta.get("captions")
    if not isinstance(captions, list) or not all(
        isinstance(c, dict) and c.get("text") for c in captions
    ):
        return [{"text": text, "origin": "web"}] if text else []
    return captions


def decode_sample(raw: dict[str, Any], require_caption: bool = True) -> Sample:
    """Decode a raw sample; raises ``SampleError`` with the reason it is unusable."""
    key = raw["__key__"]
    meta = _meta_of(raw)
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SampleError("missing_image")
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        image.load()
        image = image.convert("RGB")
    except Exception as err:  # PIL raises many types for broken files
        raise SampleError("undecodable_image", f"{type(err).__name__}: {err}") from None
    text = _text_of(raw)
    captions = _captions_of(meta, text)
    if not text and captions:
        text = captions[0]["text"]
    if require_caption and not text:
        raise SampleError("missing_caption")
    extra = {
        k: v for k, v in raw.items() if not k.startswith("__") and k not in (ext, "txt", "json")
    }
    return Sample(
        key=key,
        url=raw.get("__url__", ""),
        image=image,
        text=text,
        captions=captions,
        meta=meta,
        image_bytes=raw[ext],
        image_ext=ext,
        extra=extra,
    )


def read_samples(
    urls: Iterable[str], counter: SkipCounter | None = None, require_caption: bool = True
) -> Iterator[Sample]:
    """Decoded samples of ``urls`` in order, bad ones skipped and counted."""
    counter = counter if counter is not None else SkipCounter()
    for url in urls:
        for raw in iter_tar_samples(url, counter):
            try:
                yield decode_sample(raw, require_caption=require_caption)
            except SampleError as err:
                counter.skip(err.reason, f"{url}:{raw.get('__key__')}", str(err))


def read_caption_texts(urls: Iterable[str], counter: SkipCounter | None = None) -> Iterator[str]:
    """The caption texts of the samples :func:`read_samples` would yield, without decoding images:
    for tokenizer training, which needs only the words. Samples with bad json or text are skipped
    and counted as there; an undecodable image does not matter here."""
    counter = counter if counter is not None else SkipCounter()
    for url in urls:
        for raw in iter_tar_samples(url, counter):
            try:
                meta, text = _meta_of(raw), _text_of(raw)
            except SampleError as err:
                counter.skip(err.reason, f"{url}:{raw.get('__key__')}", str(err))
                continue
            captions = _captions_of(meta, text)
            yield from (c["text"] for c in captions) if captions else ([text] if text else [])
