"""Decoded, transformed image batches of shards for the inference stages (caption, filter, eval),
read in DataLoader worker processes (docs/architecture.md §3, data flow).

One set of workers reads every shard a stage has left to do, in order, so a GPU never waits for
workers to start at a shard's beginning or for the last batch of a shard to drain. A shard's
sample positions are cut into chunks of ``ceil(batch_size / W)``; worker w of W decodes and
transforms chunks w, w + W, ... and hands each over as one stacked tensor (one shared-memory
transfer per chunk, not per image: per image, the main process's unpickling and mapping of the
tensors capped a stage near a few hundred images/s whatever the GPU). The main process puts the
chunks back in shard order and cuts them into batches: a stage builds exactly the batches a
single process would (same samples, same order, same skip counts), so its output does not
depend on the worker count. Several workers share a remote shard through one local copy
(:mod:`capfilt.data.shard_copies`), not one stream each.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capfilt.data.reader import Sample, SampleError, SkipCounter, decode_sample, iter_tar_samples
from capfilt.data.shard_copies import ShardCopies
from capfilt.data.shards import REMOTE_PREFIXES
from capfilt.data.transforms import EvalTransform
from capfilt.data.workers import worker_context
from capfilt.utils.threads import available_cores


class ShardReadError(RuntimeError):
    """A loader worker failed while reading a shard (the message names the shard and the error)."""


class _ShardItems(IterableDataset):
    """This worker's items of the shards ``urls[i]`` for i in ``indices``, in that order:
    ("chunk", shard, chunk number, samples without PIL image, their pixels stacked [n, 3, H, W]
    (None if n = 0), the chunk's rejected samples as (reason, where, detail, key)) for each of
    its chunks of ``chunk_size`` positions, ("error", shard, message) if reading broke off, and
    last for each shard ("end", shard, what the tar reader itself rejected: skip records and
    shard events as (reason, detail) — worker 0 alone reports them, as every worker walks the
    whole tar, reading only its own samples). With several workers, remote shards are read from
    local copies in ``copies_dir``."""

    def __init__(
        self,
        urls: Sequence[str],
        indices: Sequence[int],
        transform: EvalTransform,
        require_caption: bool,
        min_side: int | None,
        chunk_size: int,
        copies_dir: str | None = None,
    ):
        self.urls, self.indices, self.transform = list(urls), list(indices), transform
        self.require_caption, self.min_side = require_caption, min_side
        self.chunk_size, self.copies_dir = chunk_size, copies_dir

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        copies = ShardCopies(self.copies_dir) if self.copies_dir and workers > 1 else None
        size = self.chunk_size
        for n, index in enumerate(self.indices):
            url = self.urls[index]
            counter = SkipCounter(
                "reader", quiet=True
            )  # re-recorded, and said, by the main process
            try:
                source = None
                if copies is not None and url.startswith(REMOTE_PREFIXES):
                    source = copies.local(index, url)
                    later = self.indices[n + 1 :]
                    if later and self.urls[later[0]].startswith(REMOTE_PREFIXES):
                        copies.prefetch(later[0], self.urls[later[0]])
                mine = (lambda p: (p // size) % workers == worker) if workers > 1 else None
                samples = iter_tar_samples(url, counter, read=mine, source=source)
                chunk: _Chunk | None = None
                for position, raw in enumerate(samples):
                    number = position // size
                    if number % workers != worker:
                        continue
                    if chunk is not None and chunk.number != number:
                        yield chunk.item(pack_bytes=info is not None)
                        chunk = None
                    chunk = chunk or _Chunk(index, number)
                    try:
                        sample = decode_sample(
                            raw, require_caption=self.require_caption, min_side=self.min_side
                        )
                    except SampleError as err:
                        key = raw.get("__key__", "")
                        chunk.skips.append((err.reason, f"{url}:{key}", err.detail, key))
                        continue
                    chunk.samples.append(dataclasses.replace(sample, image=None))
                    chunk.pixels.append(self.transform.pixels(sample.image))
                if chunk is not None:
                    yield chunk.item(pack_bytes=info is not None)
            except Exception as err:  # noqa: BLE001 - reported in the main process, for this shard
                said = str(err)  # a reader's own error names the shard already
                named = said if said.startswith(url) else f"{url}: {type(err).__name__}: {said}"
                yield ("error", index, named)
            if worker == 0:
                yield ("end", index, list(counter.records), list(counter.shard_records))
            else:
                yield ("end", index, [], [])


@dataclasses.dataclass
class _Chunk:
    """A worker's chunk of a shard's sample positions, built up before it is handed over."""

    shard: int
    number: int
    samples: list[Sample] = dataclasses.field(default_factory=list)
    pixels: list[torch.Tensor] = dataclasses.field(default_factory=list)
    skips: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)

    def item(self, pack_bytes: bool) -> tuple:
        """The chunk as a loader item; ``pack_bytes``: the samples' original image bytes go in
        one uint8 tensor (shared memory), not pickled through the workers' pipe (the larger part
        of the main process's receiving cost for photos of a few hundred kB)."""
        stacked = torch.stack(self.pixels) if self.pixels else None
        samples: list[Sample] | _PackedSamples = self.samples
        if pack_bytes and samples:
            samples = _PackedSamples.pack(self.samples)
        return ("chunk", self.shard, self.number, samples, stacked, self.skips)


@dataclasses.dataclass
class _PackedSamples:
    """Samples without their image bytes, and those bytes concatenated in one tensor (a class,
    not a tuple: the DataLoader turns tuples into lists)."""

    samples: list[Sample]
    packed: torch.Tensor
    lengths: list[int]

    @classmethod
    def pack(cls, samples: list[Sample]) -> _PackedSamples:
        blobs = [s.image_bytes for s in samples]
        return cls(
            [dataclasses.replace(s, image_bytes=b"") for s in samples],
            torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
            if any(blobs)
            else torch.empty(0, dtype=torch.uint8),
            [len(b) for b in blobs],
        )

    def unpack(self) -> list[Sample]:
        data = self.packed.numpy()
        out, start = [], 0
        for sample, length in zip(self.samples, self.lengths, strict=True):
            image = bytes(data[start : start + length])
            out.append(dataclasses.replace(sample, image_bytes=image))
            start += length
        return out


def loader_hint(section: str, num_workers: int) -> str:
    """What to change when a stage's main process mostly waited for images (``section``: the
    recipe section whose ``num_workers`` sets the stage's loader processes)."""
    cores = available_cores()
    if num_workers == 0:
        return (
            f"{section}.num_workers is 0, so the main process decodes every image itself: "
            f"--set {section}.num_workers=N decodes them in N processes while the model runs "
            f"(this machine has {cores} CPU cores)"
        )
    processes = f"{num_workers} loader process{'es' if num_workers > 1 else ''}"
    if num_workers + 1 < cores:
        more = min(cores - 1, 2 * num_workers)
        return f"{processes} on {cores} CPU cores: try --set {section}.num_workers={more}"
    fill = "fill" if num_workers > 1 else "fills"
    return (
        f"{processes} already {fill} this machine's {cores} CPU cores: faster storage, or "
        "images stored nearer the model's input size, would feed it faster"
    )


class ShardImages:
    """(samples, images [B, 3, H, W] on ``device``) batches of each of ``urls``' shards.

    ``plan(indices)`` names the shards that will be asked for, in order (default: all of them);
    ``batches(i, counter)`` gives shard ``i``'s batches, its bad samples recorded in ``counter``.
    With ``num_workers`` > 0 one DataLoader reads the planned shards from start to end, decoding
    about two batches ahead of the model; a shard asked for after a later one, or not planned, is
    an error. A shard whose batches were not all taken (its stage failed on it) is skipped over.
    Samples come without their decoded PIL image (``image_bytes`` keeps the original for the
    output shard). Workers resize (``transform.pixels``: uint8), the batch is normalised where the
    model is (``transform.normalize``); with a GPU, batches are pinned and copied without blocking.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: EvalTransform,
        batch_size: int,
        num_workers: int = 0,
        device: torch.device | None = None,
        require_caption: bool = True,
        min_side: int | None = None,
    ):
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.num_workers, self.device = num_workers, device or torch.device("cpu")
        self.require_caption, self.min_side = require_caption, min_side
        # a batch is one chunk from each worker (docs: module)
        self.chunk_size = max(1, math.ceil(batch_size / max(1, num_workers)))
        self._plan: list[int] = list(range(len(self.urls)))
        self._next = 0  # position in the plan of the next shard to hand out
        self._stream: Iterator | None = None
        self._early: dict[int, list[tuple]] = {}  # items of shards not asked for yet
        self._copies_dir: str | None = None  # the workers' local copies of remote shards

    def plan(self, indices: Sequence[int]) -> None:
        if self._stream is not None or self._next:
            raise RuntimeError("ShardImages.plan must come before the first batches() call")
        self._plan = list(indices)

    def close(self) -> None:
        """Stop the workers (also when a stage ends early) and delete their shard copies."""
        self._stream = None
        self._early.clear()
        if self._copies_dir is not None:
            shutil.rmtree(self._copies_dir, ignore_errors=True)
            self._copies_dir = None

    def __enter__(self) -> ShardImages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def batches(
        self, index: int, counter: SkipCounter
    ) -> Iterator[tuple[list[Sample], torch.Tensor]]:
        if index not in self._plan[self._next :]:
            raise RuntimeError(f"shard {index} was not planned, or was asked for out of order")
        while self._plan[self._next] != index:  # shards left unfinished: their items are dropped
            self._early.pop(self._plan[self._next], None)
            self._next += 1
        self._next += 1
        if self.num_workers == 0:
            items = iter(
                _ShardItems(
                    self.urls,
                    [index],
                    self.transform,
                    self.require_caption,
                    self.min_side,
                    self.chunk_size,
                )
            )
        else:
            items = self._in_order(index)
        yield from self._batch(items, counter)

    def _loader(self) -> Iterator:
        if self._stream is None:
            planned = self._plan[self._next - 1 :]
            if self.num_workers > 1 and any(
                self.urls[i].startswith(REMOTE_PREFIXES) for i in planned
            ):
                # under $TMPDIR: about two shards at a time (see capfilt/data/shard_copies.py)
                self._copies_dir = tempfile.mkdtemp(prefix="capfilt-shard-copies-")
            items = _ShardItems(
                self.urls,
                planned,
                self.transform,
                self.require_caption,
                self.min_side,
                self.chunk_size,
                self._copies_dir,
            )
            self._stream = iter(
                DataLoader(
                    items,
                    batch_size=None,
                    num_workers=self.num_workers,
                    multiprocessing_context=worker_context([type(self.transform).__module__]),
                    # two chunks per worker: about two batches ready while the model runs
                    prefetch_factor=2,
                )
            )
        return self._stream

    def _in_order(self, index: int) -> Iterator[tuple]:
        """Shard ``index``'s chunks in order, then its "end" item. Workers reach a shard's end at
        different times, so items of the shards after it may come first: they wait."""
        waiting: dict[int, tuple] = {}
        next_chunk, ends, end = 0, 0, None
        pending = iter(self._early.pop(index, []))
        stream = self._loader()
        while ends < self.num_workers:
            item = next(pending, None)
            if item is None:
                item = next(stream, None)
                if item is None:
                    raise ShardReadError(f"the loader ended before shard {self.urls[index]} did")
            shard = item[1]
            if shard != index:
                if shard in self._plan[self._next :]:
                    self._early.setdefault(shard, []).append(item)
                continue  # an abandoned shard's
            kind = item[0]
            if kind == "error":
                raise ShardReadError(item[2])
            if kind == "end":
                ends += 1
                if item[2] or item[3]:
                    end = item
                continue
            waiting[item[2]] = item
            while next_chunk in waiting:
                yield waiting.pop(next_chunk)
                next_chunk += 1
        if self._copies_dir is not None:  # every worker is past this shard
            ShardCopies(self._copies_dir).remove(index)
        yield from (waiting[c] for c in sorted(waiting))
        yield end or ("end", index, [], {})

    @staticmethod
    def _join_buffer(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """Where a batch's chunks are joined: pinned memory for a GPU, whose blocks torch's
        host allocator caches and hands out again once their copies are done."""
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def _batch(self, items: Iterator[tuple], counter: SkipCounter):
        """Cut the chunks into batches of ``batch_size`` (the last one shorter)."""
        samples: list[Sample] = []
        pieces: list[torch.Tensor] = []  # pixels of ``samples``, chunk by chunk
        pin = self.device.type == "cuda"

        def flush(n: int) -> tuple[list[Sample], torch.Tensor]:
            taken, need = [], n
            while need:
                piece = pieces[0]
                if piece.shape[0] <= need:
                    taken.append(pieces.pop(0))
                    need -= piece.shape[0]
                else:
                    taken.append(piece[:need])
                    pieces[0] = piece[need:]
                    need = 0
            if pin or len(taken) > 1:
                first = taken[0]
                batch = self._join_buffer((n, *first.shape[1:]), first.dtype, pin)
                torch.cat(taken, out=batch)
            else:  # one chunk held the whole batch: no copy
                batch = taken[0]
            pixels = batch.to(self.device, non_blocking=pin)
            out = (samples[:n], self.transform.normalize(pixels))
            del samples[:n]
            return out

        for item in items:
            kind = item[0]
            if kind == "chunk":
                _, _, _, chunk_samples, pixels, skips = item
                for reason, where, detail, key in skips:
                    counter.skip(reason, where, detail, key=key)
                if isinstance(chunk_samples, _PackedSamples):
                    chunk_samples = chunk_samples.unpack()
                if chunk_samples:
                    samples.extend(chunk_samples)
                    pieces.append(pixels)
                while len(samples) >= self.batch_size:
                    yield flush(self.batch_size)
            elif kind == "error":
                raise ShardReadError(item[2])
            else:
                _, shard, records, shard_events = item
                for record in records:
                    counter.skip(record.reason, record.url, record.detail, key=record.key)
                for reason, detail in shard_events:
                    counter.shard_event(reason, self.urls[shard], detail)
        if samples:
            yield flush(len(samples))
