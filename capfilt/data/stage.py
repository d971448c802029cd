"""Resumable, rank-split shard stages: the loop every shard-producing command runs.

A stage produces output shards ``0..n_shards-1``; rank r of W takes ``range(r, n, W)`` so the
output does not depend on the world size. A shard whose done-marker carries the stage's config
hash is skipped, so a killed run re-run with the same command continues where it stopped.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capfilt.data.writer import ShardWriter, collect_stats, is_shard_done, shard_name, write_sizes
from capfilt.utils.dist import DistInfo, barrier, current_dist_info
from capfilt.utils.lock import locks_out_dir
from capfilt.utils.logging import get_logger
from capfilt.utils.progress import ProgressReporter

log = get_logger("stage")

STOP_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
"""Errors of the output folder itself (full, read-only): every later shard would fail the same
way after doing its work, so the stage stops at the first one instead of trying each."""


class StageError(RuntimeError):
    """A stage could not produce usable output (e.g. every input sample was bad)."""


@dataclass
class StageResult:
    out_dir: Path
    done: list[int] = field(default_factory=list)
    skipped_existing: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return bool(self.failed)


ProduceFn = Callable[[int, ShardWriter], dict[str, Any] | None]
"""Fills one shard: ``produce(index, writer)`` writes samples/rows; returns extra stats or None."""


@locks_out_dir  # one job per output folder: a second one would delete this one's temporaries
def run_shard_stage(
    out_dir: str | Path,
    n_shards: int,
    produce: ProduceFn,
    *,
    stage: str,
    config_hash: str,
    samples_per_shard: list[int] | None = None,
    prefix: str = "",
    dist: DistInfo | None = None,
    desc: str | None = None,
) -> StageResult:
    """Run ``produce`` for every shard of this rank not yet done; write ``sizes.json`` at the end."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = dist or current_dist_info()
    result = StageResult(out_dir)
    mine = list(range(dist.rank, n_shards, dist.world_size))
    for (
        index
    ) in mine:  # temporaries of a killed run (only this rank's: others may be writing theirs)
        for tmp in out_dir.glob(f".{shard_name(index, prefix)}[._]*.tmp*"):
            tmp.unlink(missing_ok=True)
    todo = [i for i in mine if not is_shard_done(out_dir, i, config_hash, prefix)]
    result.skipped_existing = [i for i in mine if i not in todo]
    if result.skipped_existing:
        log.info(
            "%s: %d of %d shards already done, resuming",
            stage,
            len(result.skipped_existing),
            len(mine),
        )
    total = sum(samples_per_shard[i] for i in todo) if samples_per_shard else None
    with ProgressReporter(desc or stage, total=total, enabled=dist.is_main) as progress:
        for index in todo:
            try:
                with ShardWriter(
                    out_dir, index, stage=stage, config_hash=config_hash, prefix=prefix
                ) as writer:
                    extra = produce(index, writer)
                    stats = writer.commit(extra)
            except KeyboardInterrupt:
                raise
            except (
                Exception
            ) as err:  # one bad shard must not lose the others; exit code 3 says retry
                if isinstance(err, OSError) and err.errno in STOP_ERRNOS:
                    raise
                log.error("%s: shard %s failed: %s", stage, shard_name(index, prefix), err)
                log.debug("traceback of shard %s", shard_name(index, prefix), exc_info=True)
                result.failed[index] = f"{type(err).__name__}: {err}"
                continue
            result.done.append(index)
            progress.advance(stats["input_count"])
    barrier()
    names = [shard_name(i, prefix) for i in range(n_shards)]
    if dist.is_main:
        write_sizes(out_dir, prefix=prefix, names=names)
    result.stats = collect_stats(out_dir, names=names)
    n_bad = sum(result.stats["skipped"].values())
    if (
        result.stats["input_count"] > 0
        and n_bad == result.stats["input_count"]
        and not result.failed
    ):
        reasons = (
            ", ".join(f"{k}: {v}" for k, v in result.stats["skipped"].items()) or "none recorded"
        )
        raise StageError(
            f"{stage}: every input sample was rejected ({reasons}); check the input data"
        )
    return result
