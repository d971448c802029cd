"""Decoded, transformed image batches of shards for the inference stages (caption, filter, eval),
read in DataLoader worker processes (docs/architecture.md §3, data flow).

One set of workers reads every shard a stage has left to do, in order, so a GPU never waits for
workers to start at a shard's beginning or for the last batch of a shard to drain. Worker w of W
decodes and transforms the samples at positions w, w + W, ... of each shard; every item carries
its shard and position, and the main process puts them back in shard order: a stage builds exactly
the batches a single process would (same samples, same order, same skip counts), so its output
does not depend on the worker count. Several workers share a remote shard through one local copy
(:mod:`capfilt.data.shard_copies`), not one stream each.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.context
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capfilt.data.reader import Sample, SampleError, SkipCounter, decode_sample, iter_tar_samples
from capfilt.data.shard_copies import ShardCopies
from capfilt.data.shards import REMOTE_PREFIXES
from capfilt.data.transforms import EvalTransform


class ShardReadError(RuntimeError):
    """A loader worker failed while reading a shard (the message names the shard and the error)."""


class _ShardItems(IterableDataset):
    """This worker's items of the shards ``urls[i]`` for i in ``indices``, in that order:
    ("ok", shard, position, sample without PIL image, tensor), ("skip", shard, position, reason,
    where, detail, key), ("error", shard, message) if reading broke off, and last for each shard
    ("end", shard, what the tar reader itself rejected: skip records and shard events — worker 0
    alone reports them, as every worker walks the whole tar, reading only its own samples).
    With several workers, remote shards are read from local copies in ``copies_dir``."""

    def __init__(
        self,
        urls: Sequence[str],
        indices: Sequence[int],
        transform: EvalTransform,
        require_caption: bool,
        min_side: int | None,
        copies_dir: str | None = None,
    ):
        self.urls, self.indices, self.transform = list(urls), list(indices), transform
        self.require_caption, self.min_side = require_caption, min_side
        self.copies_dir = copies_dir

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        copies = ShardCopies(self.copies_dir) if self.copies_dir and workers > 1 else None
        for n, index in enumerate(self.indices):
            url = self.urls[index]
            counter = SkipCounter("reader")
            try:
                source, source_damage = None, None
                if copies is not None and url.startswith(REMOTE_PREFIXES):
                    source, source_damage = copies.local(index, url)
                    later = self.indices[n + 1 :]
                    if later and self.urls[later[0]].startswith(REMOTE_PREFIXES):
                        copies.prefetch(later[0], self.urls[later[0]])
                mine = (lambda p: p % workers == worker) if workers > 1 else None
                samples = iter_tar_samples(
                    url, counter, read=mine, source=source, source_damage=source_damage
                )
                for position, raw in enumerate(samples):
                    if position % workers != worker:
                        continue
                    try:
                        sample = decode_sample(
                            raw, require_caption=self.require_caption, min_side=self.min_side
                        )
                    except SampleError as err:
                        key = raw.get("__key__", "")
                        yield ("skip", index, position, err.reason, f"{url}:{key}", err.detail, key)
                        continue
                    pixels = self.transform.pixels(sample.image)
                    yield ("ok", index, position, dataclasses.replace(sample, image=None), pixels)
            except Exception as err:  # noqa: BLE001 - reported in the main process, for this shard
                yield ("error", index, f"{url}: {type(err).__name__}: {err}")
            if worker == 0:
                yield ("end", index, list(counter.records), dict(counter.shard_events))
            else:
                yield ("end", index, [], {})


def _worker_context(transform: Callable) -> multiprocessing.context.BaseContext:
    """Where loader workers come from: spawned, each imports torch, the transform's module and the
    main module again (seconds). A fork server that has imported them once forks each worker in a
    fraction of that, and like spawn it never forks a process that has started CUDA. Spawn where
    there is no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Read when the server starts (once per process); a module that fails to import is skipped.
    # "__main__" covers a script run by path; `python -m pkg` needs its module's name as well.
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    preload = ["__main__", __name__, type(transform).__module__]
    context.set_forkserver_preload(preload + ([main_spec.name] if main_spec else []))
    return context


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
                _ShardItems(self.urls, [index], self.transform, self.require_caption, self.min_side)
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
                self._copies_dir,
            )
            self._stream = iter(
                DataLoader(
                    items,
                    batch_size=None,
                    num_workers=self.num_workers,
                    multiprocessing_context=_worker_context(self.transform),
                    # each worker keeps its share of about two batches ready while the model runs
                    prefetch_factor=max(2, math.ceil(2 * self.batch_size / self.num_workers)),
                )
            )
        return self._stream

    def _in_order(self, index: int) -> Iterator[tuple]:
        """Shard ``index``'s items in position order, then its "end" item. Workers reach a shard's
        end at different times, so items of the shards after it may come first: they wait."""
        waiting: dict[int, tuple] = {}
        next_position, ends, end = 0, 0, None
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
            while next_position in waiting:
                yield waiting.pop(next_position)
                next_position += 1
        if self._copies_dir is not None:  # every worker is past this shard
            ShardCopies(self._copies_dir).remove(index)
        yield from (waiting[p] for p in sorted(waiting))
        yield end or ("end", index, [], {})

    def _batch(self, items: Iterator[tuple], counter: SkipCounter):
        samples: list[Sample] = []
        images: list[torch.Tensor] = []
        pin = self.device.type == "cuda"

        def flush() -> tuple[list[Sample], torch.Tensor]:
            first = images[0]
            batch = torch.empty((len(images), *first.shape), dtype=first.dtype, pin_memory=pin)
            torch.stack(images, out=batch)
            pixels = batch.to(self.device, non_blocking=pin)
            out = (list(samples), self.transform.normalize(pixels))
            samples.clear()
            images.clear()
            return out

        for item in items:
            kind = item[0]
            if kind == "ok":
                samples.append(item[3])
                images.append(item[4])
                if len(samples) == self.batch_size:
                    yield flush()
            elif kind == "skip":
                _, _, _, reason, where, detail, key = item
                counter.skip(reason, where, detail, key=key)
            elif kind == "error":
                raise ShardReadError(item[2])
            else:
                _, shard, records, shard_events = item
                for record in records:
                    counter.skip(record.reason, record.url, record.detail, key=record.key)
                for reason, n in shard_events.items():
                    for _ in range(n):
                        counter.shard_event(reason, self.urls[shard])
        if samples:
            yield flush()
