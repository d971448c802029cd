"""How many samples shards hold, for training's source weights and epoch size.

capfilt's own shards have a ``sizes.json`` beside them. Shards another tool wrote (img2dataset,
a hand-made ``tar cf``) have none: their samples are counted from the tar headers (distinct
sample keys, no member read), in up to :data:`SCAN_SHARDS` of them spread over the list, the
others estimated from their mean. An http(s) shard's size comes from the ``sizes.json`` in its
remote folder, as a local one's; a remote shard without a size (a ``pipe:`` command, a server
folder without ``sizes.json``) leaves the count unknown, as reading it would mean downloading it.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

from capfilt.data.reader import TAR_ERRORS, is_sample_member, member_key, open_shard
from capfilt.data.shards import REMOTE_PREFIXES, shard_sizes

SCAN_SHARDS = 16
"""Tars without a size read at most per source (their headers only) before the rest are estimated."""


@dataclass
class SampleCount:
    samples: int | None
    """The count (None: unknown, a remote shard has no size)."""
    how: str = ""
    """"" when every shard's size was recorded; else how the count was made, for the log."""


def tar_sample_count(url: str) -> int:
    """Distinct sample keys among a local tar's members (headers only; a damaged tar counts
    what comes before the damage)."""
    keys: set[str] = set()
    try:
        with open_shard(url) as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
            for info in tar:
                if is_sample_member(info):
                    keys.add(member_key(info.name)[0])
    except TAR_ERRORS:
        pass
    return len(keys)


def sample_count(urls: list[str]) -> SampleCount:
    """The samples in ``urls``: recorded sizes, counted tars and estimates (see the module)."""
    sizes = shard_sizes(urls)
    unknown = [url for url, size in zip(urls, sizes, strict=True) if size is None]
    known = sum(size for size in sizes if size is not None)
    if not unknown:
        return SampleCount(int(known))
    if any(url.startswith(REMOTE_PREFIXES) for url in unknown):
        return SampleCount(None, "a remote shard has no sizes.json")
    step = max(1, len(unknown) / SCAN_SHARDS)
    scanned = [unknown[int(i * step)] for i in range(min(SCAN_SHARDS, len(unknown)))]
    counts = [tar_sample_count(url) for url in scanned]
    estimate = round(sum(counts) / len(counts) * len(unknown))
    if len(scanned) == len(unknown):
        how = f"counted in {len(unknown)} tar(s) without a sizes.json"
    else:
        how = (
            f"{len(unknown)} tars without a sizes.json estimated from {len(scanned)} of them "
            f"({sum(counts) / len(counts):.0f} samples each)"
        )
    return SampleCount(int(known + estimate), how)
