"""Decoded, transformed image batches of one shard for the inference stages (caption, filter),
read in DataLoader worker processes (docs/architecture.md §3, data flow).

Worker w of W decodes and transforms the samples at positions w, w + W, ... of the shard; the
DataLoader returns worker outputs round-robin, so the main process sees every sample in shard
order and builds exactly the batches a single process would (same samples, same order, same
skip counts): the stage's output does not depend on the worker count.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.context
import sys
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capfilt.data.reader import Sample, SampleError, SkipCounter, decode_sample, iter_tar_samples


class _ShardItems(IterableDataset):
    """One item per raw sample of this worker's share: ("ok", sample without PIL image, tensor),
    ("skip", reason, where, detail, key), and at the end ("tar", what the tar reader itself
    rejected: its skip records and its shard events)."""

    def __init__(self, url: str, transform: Callable, require_caption: bool, min_side: int | None):
        self.url, self.transform, self.require_caption = url, transform, require_caption
        self.min_side = min_side

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter("reader")
        for position, raw in enumerate(iter_tar_samples(self.url, counter)):
            if position % workers != worker:
                continue
            try:
                sample = decode_sample(
                    raw, require_caption=self.require_caption, min_side=self.min_side
                )
            except SampleError as err:
                key = raw.get("__key__", "")
                yield ("skip", err.reason, f"{self.url}:{key}", err.detail, key)
                continue
            image = self.transform(sample.image)
            yield ("ok", dataclasses.replace(sample, image=None), image)
        if worker == 0:  # every worker reads the whole tar: report its own rejections once
            yield ("tar", list(counter.records), dict(counter.shard_events))


def _worker_context(transform: Callable) -> multiprocessing.context.BaseContext:
    """Where loader workers come from. A stage opens one loader per shard, so a worker's start
    is paid per shard: spawned, each imports torch, the transform's module and the main module
    again (seconds; on a busy 2-core machine 159 photos in two shards took 34 s with 2 workers,
    1.7 s without). A fork server that has imported them once forks each worker in a fraction of
    that, and like spawn it never forks a process that has started CUDA. Spawn where there is no
    fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Read when the server starts (once per process); a module that fails to import is skipped.
    # "__main__" covers a script run by path; `python -m pkg` needs its module's name as well.
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    preload = ["__main__", __name__, type(transform).__module__]
    context.set_forkserver_preload(preload + ([main_spec.name] if main_spec else []))
    return context


def image_batches(
    url: str,
    transform: Callable,
    batch_size: int,
    counter: SkipCounter,
    num_workers: int = 0,
    device: torch.device | None = None,
    require_caption: bool = True,
    min_side: int | None = None,
) -> Iterator[tuple[list[Sample], torch.Tensor]]:
    """(samples, images [B, 3, H, W] on ``device``) of shard ``url`` in batches of ``batch_size``.
    Bad samples are recorded in ``counter``; ``min_side`` as in :func:`read_samples`.

    Samples come without their decoded PIL image (``image_bytes`` keeps the original for the
    output shard). With a GPU, batches are pinned and copied without blocking.
    """
    device = device or torch.device("cpu")
    pin = device.type == "cuda"
    items = _ShardItems(url, transform, require_caption, min_side)
    if num_workers > 0:
        stream = DataLoader(
            items,
            batch_size=None,
            num_workers=num_workers,
            multiprocessing_context=_worker_context(transform),
            persistent_workers=False,
        )
    else:
        stream = items
    samples: list[Sample] = []
    images: list[torch.Tensor] = []

    def flush() -> tuple[list[Sample], torch.Tensor]:
        batch = torch.stack(images)
        if pin:
            batch = batch.pin_memory()
        out = (list(samples), batch.to(device, non_blocking=pin))
        samples.clear()
        images.clear()
        return out

    for item in stream:
        if item[0] == "ok":
            samples.append(item[1])
            images.append(item[2])
            if len(samples) == batch_size:
                yield flush()
        elif item[0] == "skip":
            _, reason, where, detail, key = item
            counter.skip(reason, where, detail, key=key)
        else:
            _, records, shard_events = item
            for record in records:
                counter.skip(record.reason, record.url, record.detail, key=record.key)
            for reason, n in shard_events.items():
                for _ in range(n):
                    counter.shard_event(reason, url)
    if samples:
        yield flush()
