"""The training sample stream: weighted shard sources, deterministic and resumable mid-epoch.

Each rank reads an endless stream per source (shards reshuffled every pass, split across ranks
and DataLoader workers, a seeded shuffle buffer), mixes the sources by weight, and forms
fixed-size batches. Everything random is derived from (seed, epoch, split, position), so:

- every rank takes the same number of steps per epoch (the stream never runs dry);
- batch ``j`` of an epoch is the same whatever step the run was resumed at: worker ``w`` of a
  loader resumed at batch ``b`` plays the part of worker ``(w + b) % num_workers`` and skips
  its earlier batches without decoding them.

Bad samples are counted and replaced by another sample of the same batch, so batch shapes stay
equal across ranks (all-gathers need that); each batch carries the skip counts met while making
it (``"skips"``), so the trainer can save them even when workers decode. A source whose every
sample is bad fails before training (:func:`check_sources`), and the stream gives up on a source
that yields nothing usable for two whole passes instead of looping for ever. A source with fewer
samples than there are readers (ranks × loader workers) gives each reader without one of its
own a repeat of one of them; a reader whose own shards are empty takes its positions across the
source's other shards.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from capfilt.data.reader import SampleError, SkipCounter, decode_sample, iter_tar_samples
from capfilt.data.sample_counts import sample_count
from capfilt.data.shards import count_samples, expand_shards
from capfilt.data.stage import StageError
from capfilt.data.text import clean_caption
from capfilt.data.transforms import TrainTransform
from capfilt.utils.logging import get_logger

log = get_logger("train")


@dataclass
class Source:
    """One shard source with its sampling weight."""

    name: str
    urls: list[str]
    weight: float
    samples: int | None = None
    """Its sample count (:func:`capfilt.data.sample_counts.sample_count`), None when unknown or
    not counted (weights given)."""


def image_id(key: str) -> int:
    """Stable 56-bit id of a sample key (same image ↔ same id, across ranks and runs)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "little")


def build_sources(specs: list[str], weights: list[float] | None = None) -> list[Source]:
    """One source per ``--shards`` spec; weights default to the sources' sample counts."""
    if not specs:
        raise ValueError("no training shards given (use --shards, repeatable)")
    sources = []
    for spec in specs:
        urls = expand_shards(spec)
        sources.append(Source(spec, urls, 0.0))
    if weights:
        if len(weights) != len(sources):
            raise ValueError(f"got {len(weights)} weights for {len(sources)} shard sources")
        for source, weight in zip(sources, weights):
            if weight < 0:
                raise ValueError("source weights must be >= 0")
            source.weight = float(weight)
    else:
        _weigh_by_size(sources)
    if sum(s.weight for s in sources) <= 0:
        raise ValueError("source weights must not all be zero")
    return sources


def _weigh_by_size(sources: list[Source]) -> None:
    """Weights from the sources' sample counts. When one of several is of unknown size (a remote
    shard without a ``sizes.json``), every source is weighed by its shard count instead, never
    samples against shards (a 3-shard source would then count as 3 samples), and the log says so."""
    for source in sources:
        count = sample_count(source.urls)
        source.samples = count.samples
        source.weight = float(count.samples or 0)
        if count.how:
            log.info("%s: %s samples (%s)", source.name, count.samples or "?", count.how)
    unknown = [s.name for s in sources if s.samples is None]
    if not unknown:
        return
    for source in sources:
        source.weight = float(len(source.urls))
    if len(sources) > 1:
        log.warning(
            "the size of %s is unknown (no sizes.json beside its shards): the %d sources are mixed "
            "by shard count, not by samples (%s); put a sizes.json beside those shards or set "
            "data.weights",
            ", ".join(unknown), len(sources),
            ", ".join(f"{s.name}: {len(s.urls)}" for s in sources),
        )  # fmt: skip


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no samples"


def _source_files(source: Source, limit: int = 3) -> str:
    shown = ", ".join(source.urls[:limit])
    return shown + (f" and {len(source.urls) - limit} more" if len(source.urls) > limit else "")


def check_sources(sources: list[Source]) -> None:
    """Fail before training when a source has no usable sample: read each source until its first
    sample that decodes (one sample for good data); a source that has none is named with what
    was wrong (empty tars, unreadable tars, the reasons its samples were rejected)."""
    for source in sources:
        counter = SkipCounter("train-data", keep_records=False)
        if any(
            _usable(raw, counter)
            for url in source.urls
            for raw in iter_tar_samples(url, counter, fetch_errors_fail=False)
        ):
            continue
        found = {**counter.counts, **counter.shard_events}
        raise StageError(
            f"shard source {source.name} has no usable sample ({_counts(found)}) in "
            f"{_source_files(source)}; check the shards"
        )


def _usable(raw: dict, counter: SkipCounter) -> bool:
    try:
        sample = decode_sample(raw)
    except SampleError as err:
        counter.skip(err.reason, raw.get("__url__", ""), err.detail)
        return False
    return bool(clean_caption(sample.text))


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class TrainStream(IterableDataset):
    """Endless batches of (images, captions, image ids, keys) for one epoch of one rank; images as
    uint8 pixels [B, 3, S, S], for ``transform.normalize`` where the model is (a quarter of the
    bytes of the float input through the loader's shared memory and the copy to a GPU)."""

    def __init__(
        self,
        sources: list[Source],
        transform: TrainTransform,
        *,
        batch_size: int,
        seed: int,
        epoch: int,
        skip_batches: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        max_words: int = 30,
    ):
        self.sources = sources
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.skip_batches = skip_batches
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.max_words = max_words
        self.skips = SkipCounter("train-data", keep_records=False)
        self._pass_sizes: dict[int, int] = {}  # per source: raw samples in one pass of this split
        self._buffer_sizes: dict[int, int] = {}

    def _split_samples(
        self, urls: list[str], split: int, n_splits: int, pass_rng: random.Random
    ) -> Iterator[dict]:
        """One pass over this split's share of ``urls`` (already in this epoch's order)."""
        got = 0
        if len(urls) >= n_splits:
            mine = urls[
                split::n_splits
            ]  # fixed for the epoch: ranks never read each other's shards
            pass_rng.shuffle(mine)
            for url in mine:
                for sample in iter_tar_samples(url, self.skips, fetch_errors_fail=False):
                    got += 1
                    yield sample
        if not got:
            # fewer shards than readers, or this reader's own shards are empty (a filter's shard
            # that kept nothing): it walks them all, keeping its own sample positions
            total = yield from self._at_positions(urls, lambda p: p % n_splits == split)
            if 0 < total <= split:
                # a source of fewer samples than readers: this reader repeats one of them rather
                # than leaving the run without it
                yield from self._at_positions(urls, lambda p: p == split % total)

    def _at_positions(
        self, urls: list[str], keep: Callable[[int], bool]
    ) -> Generator[dict, None, int]:
        """The samples of ``urls`` at the positions (counted across them) that ``keep`` picks, the
        others seeked over, not read, in a local tar; returns how many positions there are."""
        index = 0
        for url in urls:
            first = index
            for sample in iter_tar_samples(
                url, self.skips, read=lambda p, f=first: keep(f + p), fetch_errors_fail=False
            ):
                if keep(index):
                    yield sample
                index += 1
        return index

    def _raw_stream(self, si: int, split: int, n_splits: int) -> Iterator[dict]:
        """Endless raw samples of source ``si`` for one split, reshuffled each pass."""
        source = self.sources[si]
        known = count_samples(source.urls)
        # A buffer larger than the split's share would hold back the first samples for many passes.
        size = (
            self.shuffle_buffer
            if known is None
            else max(1, min(self.shuffle_buffer, known // n_splits))
        )
        self._buffer_sizes[si] = size
        rng = random.Random(_seed(self.seed, self.epoch, si, split, "buffer"))
        order = list(source.urls)
        random.Random(_seed(self.seed, self.epoch, si, "shards")).shuffle(order)
        buffer: list[dict] = []
        for pass_index in itertools.count():
            pass_rng = random.Random(_seed(self.seed, self.epoch, si, split, pass_index, "pass"))
            got = 0
            for sample in self._split_samples(order, split, n_splits, pass_rng):
                got += 1
                if len(buffer) < size:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                yield sample
            if got == 0:
                found = _counts(self.skips.take())
                raise StageError(
                    f"shard source {source.name} gives no samples to reader {split} of {n_splits} "
                    f"({found}) in {_source_files(source)}"
                )
            self._pass_sizes[si] = got

    def _decode(self, raw: dict, rng: random.Random) -> tuple[torch.Tensor, str, int, str] | None:
        try:
            sample = decode_sample(raw)
        except SampleError as err:
            self.skips.skip(err.reason, raw.get("__key__", ""), str(err))
            return None
        texts = [c["text"] for c in sample.captions] or [sample.text]
        text = clean_caption(rng.choice(texts), self.max_words)
        if not text:
            self.skips.skip("empty_caption", sample.key)
            return None
        return self.transform.pixels(sample.image, rng), text, image_id(sample.key), sample.key

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        virtual = (worker + self.skip_batches) % n_workers  # see the module docstring
        split, n_splits = self.rank * n_workers + virtual, self.world_size * n_workers
        streams = [self._raw_stream(i, split, n_splits) for i in range(len(self.sources))]
        weights = [s.weight for s in self.sources]
        mix = random.Random(_seed(self.seed, self.epoch, split, "mix"))
        b = self.skip_batches
        to_skip = (b - virtual + n_workers - 1) // n_workers if b > virtual else 0
        bad_run = [0] * len(streams)  # consecutive unusable samples per source
        for local_batch in itertools.count():
            picks = [mix.choices(range(len(streams)), weights)[0] for _ in range(self.batch_size)]
            raws = [next(streams[si]) for si in picks]
            if local_batch < to_skip:
                continue
            decoded = []
            for position, (si, raw) in enumerate(zip(picks, raws)):
                rng = random.Random(_seed(self.seed, self.epoch, split, local_batch, position))
                item = self._decode(raw, rng)
                if item is not None:
                    decoded.append(item)
                    bad_run[si] = 0
                    continue
                bad_run[si] += 1
                self._give_up_if_hopeless(si, bad_run[si], split, n_splits)
            if not decoded:
                continue  # a batch of only bad samples: counted, and the stream moves on
            while len(decoded) < self.batch_size:  # keep shapes equal across ranks
                decoded.append(decoded[len(decoded) % max(1, len(decoded))])
            images, texts, ids, keys = zip(*decoded)
            yield {
                "images": torch.stack(images),
                "texts": list(texts),
                "image_ids": torch.tensor(ids, dtype=torch.long),
                "keys": list(keys),
                "skips": self.skips.take(),
            }

    def _give_up_if_hopeless(self, si: int, bad_run: int, split: int, n_splits: int) -> None:
        """Raise once source ``si`` has given two whole passes (plus its shuffle buffer) of
        unusable samples in a row: such a window holds every sample of a pass, so none is good."""
        pass_size = self._pass_sizes.get(si)
        if pass_size is None or bad_run <= 2 * pass_size + self._buffer_sizes.get(si, 0):
            return
        source = self.sources[si]
        raise StageError(
            f"shard source {source.name}: reader {split} of {n_splits} found no usable sample "
            f"in its shards ({_counts(dict(self.skips.counts))}) in {_source_files(source)}"
        )


def make_loader(
    stream: TrainStream, num_workers: int, seed: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over ``stream`` that draws its worker seeds from its own generator;
    ``pin_memory`` (with a GPU): batches in pinned memory, copied to it without blocking.

    The default would draw them from torch's global RNG, so creating a loader at a resume point
    would shift the RNG stream of the training step (ITM negatives) against an uninterrupted run.
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
