"""Streaming shard reader that skips bad samples and records them by reason.

Bad input never kills a job, and never hides: an undecodable or oversized image, a missing or
non-UTF-8 caption, broken json, an unsafe member path or a key seen earlier in the shard drops
that sample only. Each drop is counted in a ``SkipCounter`` by reason and kept as a record (key,
reason, detail) that a stage writes to its parquet (:meth:`ShardWriter.add_skipped`). Damage to
a tar itself is a *shard* event, not a sample: a tar cut or corrupted partway ends early as
``truncated_tar`` (what came before is kept), one that yields nothing is ``unreadable_shard``;
both are logged naming the file. Memory does not grow with the number of shards: tars are read
as streams, one at a time, and an image is measured from its header before it is decoded.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from capfilt.data.sample import IMAGE_EXTS
from capfilt.data.shards import HTTP_PREFIXES, REMOTE_PREFIXES
from capfilt.utils.logging import RateLimitedLog, get_logger

log = get_logger("reader")

TAR_ERRORS = (
    tarfile.TarError,
    OSError,
    EOFError,
)  # bound here: generators closed at interpreter exit can't look up modules

MAX_IMAGE_PIXELS = 89_478_485
"""Images with more pixels are rejected as ``image_too_large`` before decoding. This is Pillow's
own decompression-bomb threshold (its ``Image.MAX_IMAGE_PIXELS``): about 9500 × 9500, far above
any model input (BLIP: 384 px), while a decoded RGB image of that size already takes 270 MB — a
few-KB PNG can declare 20000 × 20000 (1.2 GB once decoded)."""

SHARD_EVENTS = ("truncated_tar", "unreadable_shard", "fetch_failed")
"""Reasons that describe a whole tar, counted per shard and never as samples: damage to the tar,
or (training, which goes on without it) a remote shard whose transfer failed."""


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the stats key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Skipped:
    """One rejected input sample: its key (as far as known), why, and the details."""

    key: str
    reason: str
    detail: str = ""
    url: str = ""


class SkipCounter:
    """Counts skipped samples by reason, keeps a record of each, and warns at a bounded rate.

    ``shard_events`` counts damage to whole tars (:data:`SHARD_EVENTS`) separately: those are
    not samples, so they never enter a stage's sample counts.
    """

    def __init__(self, name: str = "reader", keep_records: bool = True, quiet: bool = False):
        self.quiet = quiet
        """Count without logging (a rank reading what rank 0 reads and reports too)."""
        self.counts: Counter[str] = Counter()
        self.shard_events: Counter[str] = Counter()
        self.records: list[Skipped] = []
        self.shard_records: list[tuple[str, str]] = []
        """(reason, detail) of each shard event, kept as ``records`` are (a loader worker hands
        them to the main process, which says them)."""
        self.keep_records = keep_records
        self._logger = get_logger(name)
        self._log = RateLimitedLog(self._logger)

    def skip(self, reason: str, where: str = "", detail: str = "", *, key: str = "") -> None:
        self.counts[reason] += 1
        if self.keep_records:
            self.records.append(Skipped(key, reason, detail, where))
        if self.quiet:
            return
        self._log.warning(
            "skipping %s%s%s",
            reason,
            f" at {where}" if where else "",
            f" ({detail})" if detail else "",
        )

    def shard_event(self, reason: str, url: str, detail: str = "") -> None:
        """A tar that is damaged as a whole; always logged, naming the file."""
        self.shard_events[reason] += 1
        if self.keep_records:
            self.shard_records.append((reason, detail))
        if self.quiet:
            return
        self._logger.warning("%s: %s%s", reason, url, f" ({detail})" if detail else "")

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def take(self) -> dict[str, int]:
        """The counts (samples and shard events) since the last ``take``, then reset."""
        out = dict(self.counts + self.shard_events)
        self.counts.clear()
        self.shard_events.clear()
        self.records.clear()
        self.shard_records.clear()
        return out

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


class ShardFetchError(RuntimeError):
    """A remote shard's transfer failed (its ``pipe:`` command or the HTTP fetch exited with an
    error, a 404, a dropped connection): unlike damage in a tar, a later run may get it whole, so
    the stage fails the shard (no output, a re-run retries it) instead of keeping what came."""


class _WatchedStream:
    """A remote stream that remembers its transfer's error, so that a reader can tell a broken
    fetch from a damaged tar. Closing keeps the error instead of raising it: a reader that stops
    early (it has what it needs) makes curl exit 23 and a pipe 141, which is no failure."""

    def __init__(self, stream):
        self.stream, self.error = stream, None

    def read(self, *args):
        try:
            return self.stream.read(*args)
        except Exception as err:
            self.error = self.error or err
            raise

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception as err:  # noqa: BLE001 - judged by the reader: see iter_tar_samples
            self.error = self.error or err

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str):
    """A binary file object of a local tar or a stream: an http(s) URL read through curl with a
    stall limit (:mod:`capfilt.data.remote`), the others (``pipe:``, gs://, hf://) as webdataset
    opens them."""
    if url.startswith(HTTP_PREFIXES):
        from capfilt.data.remote import open_http

        return open_http(url)
    if url.startswith(REMOTE_PREFIXES):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Remembers on the tar object why its header stream ended. tarfile ends an archive quietly
    at a header cut short, missing or garbled after the first member; only an all-zero block
    (``EOFHeaderError``) is a proper end of archive."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar._capfilt_end = err
            raise


def member_key(name: str) -> tuple[str, str, str | None]:
    """(key, extension, reason it is unusable or None) of a tar member name, as webdataset groups
    members: the key is the path up to the first dot of the file name. Folders become part of the
    key joined by ``_`` (``images/x.jpg`` → ``images_x``) and dots in them become ``-``, so a key
    never holds ``/`` or ``.``; a path that climbs (``..``) or is absolute is ``unsafe_path``."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    base = parts[-1] if parts else ""
    stem, _, ext = base.partition(".")
    raw_key = "/".join([*parts[:-1], stem])
    if name.startswith(("/", "\\")) or ".." in parts:
        return raw_key, ext, "unsafe_path"
    key = "_".join(p.replace(".", "-") for p in [*parts[:-1], stem])
    return key, ext, None


def is_sample_member(info: tarfile.TarInfo) -> bool:
    """Whether a tar member is part of a sample: a regular file whose name has an extension and
    does not start with a dot (folders, links and ``.hidden`` files are not)."""
    base = info.name.replace("\\", "/").rsplit("/", 1)[-1]
    return info.isreg() and "." in base and not base.startswith(".")


def _members_by_key(stream: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], str]:
    """Every member header of a seekable tar, each sample's members brought together in the
    order their keys first appear (``tar cf s.tar images/`` writes a folder's files in directory
    order, a sample's image and caption apart); and the damage that stopped the header scan
    ("" when none). A member whose key already has a member of its extension starts another
    sample of that key, counted as ``duplicate_key`` where it stood."""
    infos: list[tarfile.TarInfo] = []
    damage = ""
    try:
        for info in stream:
            infos.append(info)
    except TAR_ERRORS as err:
        damage = str(err) or type(err).__name__
    slots: dict[tuple, list[tarfile.TarInfo]] = {}
    extensions: dict[str, list[set[str]]] = {}
    for index, info in enumerate(infos):
        if not is_sample_member(info):
            slots[("", index)] = [info]  # kept where it was
            continue
        key, ext, _ = member_key(info.name)
        groups = extensions.setdefault(key, [])
        ext = ext.lower()
        n = next((i for i, exts in enumerate(groups) if ext not in exts), len(groups))
        if n == len(groups):
            groups.append(set())
        groups[n].add(ext)
        slots.setdefault((key, n), []).append(info)
    return [info for group in slots.values() for info in group], damage


def iter_tar_samples(
    url: str,
    counter: SkipCounter | None = None,
    read: Callable[[int], bool] | None = None,
    source: str | None = None,
    fetch_errors_fail: bool = True,
) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__``, ext → bytes) of one tar, grouped by key.

    ``read(position)``: whether to read the members of the sample at that position (0, 1, ...);
    the others come as ``__key__``/``__url__`` alone, their bytes skipped, not read, in a local
    tar (loader workers that share a shard each read their own samples only: W workers reading
    a whole shard each cost W times its bytes, the bottleneck on a network or sandboxed disk).
    A stream (``pipe:``, a URL) cannot seek: loader workers read a local copy of it instead,
    ``source`` (:mod:`capfilt.data.shard_copies`), ``url`` still naming the samples and records.

    A stream whose transfer fails (the ``pipe:`` command or curl exits with an error) raises
    :class:`ShardFetchError` after the samples that came before, since a re-run may get the
    shard whole; ``fetch_errors_fail=False`` (training, which goes on with its other shards)
    counts it as ``fetch_failed`` instead, naming the transfer's error.

    Files without an extension or starting with a dot are not sample members. A sample the
    reader must reject carries ``__skip__`` (reason) for :func:`decode_sample`: an unsafe member
    path, or a key met before in this tar (``duplicate_key``: the first one is kept). A tar that
    ends early or is corrupt yields what came before the damage and is counted once as
    ``truncated_tar`` (``unreadable_shard`` if nothing came before); a sample cut by the damage
    is left to the decoder to reject.
    """
    counter = counter if counter is not None else SkipCounter()
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    n_members = 0
    position = -1
    damage = scan_damage = ""
    warned_ungrouped = False
    exts: set[str] = set()  # the extensions of the sample being gathered
    # a local tar is opened seekable ("r:*"): its members are grouped by key whatever their
    # order, and skipped members are seeked over; a stream ("r|*": pipes, URLs) reads through
    path = source or url
    seekable = not path.startswith(REMOTE_PREFIXES)
    watched = None
    try:
        with (
            open_shard(path) if seekable else (watched := _WatchedStream(open_shard(path))) as fh,
            tarfile.open(
                fileobj=fh, mode="r:*" if seekable else "r|*", tarinfo=_EndTrackingTarInfo
            ) as stream,
        ):
            members: Iterable[tarfile.TarInfo] = stream
            if seekable:
                members, scan_damage = _members_by_key(stream)
            for info in members:
                n_members += 1
                if not is_sample_member(info):
                    continue
                key, ext, problem = member_key(info.name)
                # a member whose key and extension the sample already has (``a/b.jpg`` then
                # ``a_b.jpg``: one key once folders are joined) starts another sample of that
                # key, a duplicate, rather than replacing the first one's file
                starts = current is None or current["__key__"] != key or ext.lower() in exts
                if starts:
                    exts = set()
                exts.add(ext.lower())
                wanted = read is None or read(position + 1 if starts else position)
                # read before the sample before is handed out: damage here keeps it the last one
                data = stream.extractfile(info).read() if wanted else None
                if current is not None and starts:
                    yield current
                    current = None
                if current is None:
                    position += 1
                    current = {"__key__": key, "__url__": url}
                    if problem:
                        current["__skip__"] = problem
                    elif key in seen:
                        current["__skip__"] = "duplicate_key"
                        if not seekable and not warned_ungrouped:
                            warned_ungrouped = True
                            log.warning(
                                "%s: sample %s met again further on: a tar read as a stream "
                                "must hold each sample's members together (tar --sort=name)",
                                url,
                                key,
                            )
                    seen.add(key)
                if data is not None:
                    current[ext.lower()] = data
            end = getattr(stream, "_capfilt_end", None)
            if not isinstance(end, tarfile.EOFHeaderError):
                damage = f"archive ends without an end-of-archive block ({end or 'no header'})"
    except TAR_ERRORS as err:
        damage = str(err) or type(err).__name__
    if watched is not None and watched.error is not None and damage:
        # the tar ended early because its transfer failed: not the tar's damage (a transfer
        # error after a whole tar, e.g. a reader that stopped at its end-of-archive, is none)
        if fetch_errors_fail:
            raise ShardFetchError(f"{url}: its transfer failed: {watched.error}") from None
        counter.shard_event("fetch_failed", url, str(watched.error) or type(watched.error).__name__)
        damage = ""
    damage = scan_damage or damage  # where the header scan broke, not where reading then stopped
    if damage:
        reason = "truncated_tar" if n_members else "unreadable_shard"
        counter.shard_event(reason, url, damage)
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


JSON_TEXT_KEYS = ("caption", "text")
"""json fields read as the web text of a sample that has no ``txt`` (img2dataset writes its
caption to both; other tools to the json alone)."""


def _json_text(meta: dict[str, Any]) -> str:
    """The first non-blank string among the json's :data:`JSON_TEXT_KEYS` ("" when none)."""
    for key in JSON_TEXT_KEYS:
        value = meta.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return ""


def _captions_of(meta: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """The json's caption entries (blank ones dropped), else the txt as one web caption, stripped
    (a hand-made tar's ``echo ... > k.txt`` ends in a newline that would otherwise go into the
    caption, its scores' rows and every shard made from it).

    A ``captions`` field that is not a list of objects with a string ``text`` is ``bad_caption``
    (a number where the text should be would otherwise reach the tokenizer)."""
    captions = meta.get("captions")
    from_txt = [{"text": text.strip(), "origin": "web"}] if text else []
    if captions is None:
        return from_txt
    if isinstance(captions, list):  # plain strings (other tools' lists): web texts
        captions = [{"text": c, "origin": "web"} if isinstance(c, str) else c for c in captions]
    if not isinstance(captions, list) or not all(
        isinstance(c, dict) and isinstance(c.get("text"), str) for c in captions
    ):
        raise SampleError(
            "bad_caption", "json captions must be strings or objects with a string 'text'"
        )
    captions = [c for c in captions if c["text"].strip()]
    return captions or from_txt


_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of a decoded image. Pillow's ``convert`` clips 16- and 32-bit grey to 255 (a
    16-bit PNG turns white), so those are scaled to 8 bits first: 16-bit by 1/257, float and
    32-bit by their own range when it exceeds 8 bits."""
    if image.mode not in _WIDE_MODES:
        return image.convert("RGB")
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(values.max()) if values.size else 0.0
        top = 65535.0 if 255 < peak <= 65535 else max(peak, 255.0)
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L").convert("RGB")


REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK")
"""Pillow image modes ``Image.reduce`` takes (it refuses palette, 1-bit and 16-bit images)."""


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _decode_error(err: Exception) -> str:
    """Pillow's error without the in-memory file's address (``<_io.BytesIO object at 0x7f…>``),
    which differs at every run: the skip details in stats and parquet stay reproducible."""
    return f"{type(err).__name__}: {_OBJECT_REPR.sub('', str(err))}"


def decode_image(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode image bytes (first frame of an animation) to RGB; raises ``SampleError``.

    The size is read from the header first, so an image above :data:`MAX_IMAGE_PIXELS` is
    rejected without being decoded. With ``min_side``, an image whose sides are both at least
    twice ``min_side`` is shrunk by an integer factor while they stay so (JPEG decodes at that
    scale directly), so a stage never holds a photo at full size for a model that looks at it
    at ``min_side``: the later resize still scales down by 2 or more, as Pillow's own
    ``reducing_gap`` does.
    """
    try:
        with warnings.catch_warnings():  # oversized images are rejected below, with a reason
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise SampleError("image_too_large", str(err)) from None
    except Exception as err:  # PIL raises many types for broken files
        raise SampleError("undecodable_image", _decode_error(err)) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise SampleError(
            "image_too_large", f"{width}x{height} pixels (limit {MAX_IMAGE_PIXELS:,})"
        )
    factor = max(1, min(width, height) // (2 * min_side)) if min_side else 1
    try:
        if factor > 1 and image.format == "JPEG":
            image.draft("RGB", (width // factor, height // factor))
        image.load()
        if factor > 1:
            factor = max(1, min(image.size) // (2 * min_side))
            if factor > 1:
                if image.mode not in REDUCIBLE_MODES:  # palette, 1-bit, 16-bit: RGB first
                    image = _to_rgb(image)
                image = image.reduce(factor)
        return _to_rgb(image)
    except Exception as err:
        raise SampleError("undecodable_image", _decode_error(err)) from None


def decode_sample(
    raw: dict[str, Any], require_caption: bool = True, min_side: int | None = None
) -> Sample:
    """Decode a raw sample; raises ``SampleError`` with the reason it is unusable.
    ``min_side``: see :func:`decode_image`."""
    key = raw["__key__"]
    if "__skip__" in raw:
        raise SampleError(raw["__skip__"], f"member {key!r} of {raw.get('__url__', '')}")
    meta = _meta_of(raw)
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        found = sorted(k for k in raw if not k.startswith("__"))
        raise SampleError(
            "missing_image",
            f"members {', '.join(f'{key}.{e}' for e in found) or 'none'}; images are "
            f"{', '.join(IMAGE_EXTS)} (a key ends at the file name's first dot)",
        )
    image = decode_image(raw[ext], min_side)
    text = _text_of(raw) or _json_text(meta)
    captions = _captions_of(meta, text)
    if not text and captions:
        text = captions[0]["text"]
    if require_caption and not text:
        raise SampleError(
            "missing_caption",
            "no txt member, json 'captions', 'caption' or 'text' (json keys: "
            f"{', '.join(sorted(meta)) or 'no json'})",
        )
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
    urls: Iterable[str],
    counter: SkipCounter | None = None,
    require_caption: bool = True,
    min_side: int | None = None,
) -> Iterator[Sample]:
    """Decoded samples of ``urls`` in order, bad ones skipped and recorded in ``counter``.
    ``min_side``: the side the caller resizes to (see :func:`decode_image`)."""
    counter = counter if counter is not None else SkipCounter(keep_records=False)
    for url in urls:
        for raw in iter_tar_samples(url, counter):
            try:
                yield decode_sample(raw, require_caption=require_caption, min_side=min_side)
            except SampleError as err:
                key = raw.get("__key__", "")
                counter.skip(err.reason, f"{url}:{key}", err.detail, key=key)


def read_caption_texts(urls: Iterable[str], counter: SkipCounter | None = None) -> Iterator[str]:
    """The caption texts of the samples :func:`read_samples` would yield, without decoding images:
    for tokenizer training, which needs only the words. Samples with bad json or text are skipped
    and counted as there; an undecodable image does not matter here."""
    counter = counter if counter is not None else SkipCounter(keep_records=False)
    for url in urls:
        # for a training run's tokenizer: training goes on without a shard it cannot fetch
        for raw in iter_tar_samples(url, counter, fetch_errors_fail=False):
            key = raw.get("__key__", "")
            try:
                if "__skip__" in raw:
                    raise SampleError(raw["__skip__"])
                meta, text = _meta_of(raw), _text_of(raw)
                captions = _captions_of(meta, text)
            except SampleError as err:
                counter.skip(err.reason, f"{url}:{key}", err.detail, key=key)
                continue
            yield from (c["text"] for c in captions) if captions else ([text] if text else [])
