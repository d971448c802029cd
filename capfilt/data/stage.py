"""Resumable, rank-split shard stages: the loop every shard-producing command runs.

A stage produces output shards ``0..n_shards-1``; rank r of W takes ``range(r, n, W)`` so the
output does not depend on the world size. A shard whose done-marker carries the stage's config
hash, combined with the identity (path, size, modification time) of the files it was made
from, is skipped: a killed run re-run with the same command continues where it stopped, and an
input replaced at the same path makes its shard run again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from capfilt.config import ConfigError
from capfilt.data.shards import REMOTE_PREFIXES
from capfilt.data.writer import (
    ShardWriter,
    collect_stats,
    is_shard_done,
    read_done_marker,
    shard_name,
    write_sizes,
)
from capfilt.utils.dist import DistInfo, all_gather_objects, barrier, current_dist_info
from capfilt.utils.lock import locks_out_dir
from capfilt.utils.logging import get_logger
from capfilt.utils.progress import ProgressReporter
from capfilt.utils.timing import PhaseClock

log = get_logger("stage")

STOP_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
"""Errors of the output folder itself (full, read-only): every later shard would fail the same
way after doing its work, so the stage stops at the first one instead of trying each."""


class StageError(RuntimeError):
    """A stage could not produce usable output (e.g. every input sample was bad)."""


class OutputFolderError(ValueError):
    """``--out`` holds shards this stage must not mix its own with or overwrite."""


@dataclass
class StageResult:
    out_dir: Path
    done: list[int] = field(default_factory=list)
    skipped_existing: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    """Wall time of producing and publishing this run's shards (0 when all were done before)."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Of ``seconds``, the main process's time in each phase (the stage's ``clock``)."""

    @property
    def partial(self) -> bool:
        return bool(self.failed)


def input_identity(paths: str | Sequence[str]) -> list[list]:
    """What a shard's done-marker remembers of its input files: path, size and modification time
    (nanoseconds) of each local file, the bare URL of a remote one. Size and mtime change
    whenever a file is rewritten, as ``make`` and ``rsync`` assume, without reading it."""
    out: list[list] = []
    for path in [paths] if isinstance(paths, str | os.PathLike) else paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append([str(path)])
            continue
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def _shard_hash(config_hash: str, identity: list[list] | None) -> str:
    if identity is None:
        return config_hash
    blob = json.dumps([config_hash, identity], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _names(files: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(str(f) for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def _input_files(inputs: Sequence[str | Sequence[str]]) -> list[Path]:
    files = []
    for entry in inputs:
        for path in [entry] if isinstance(entry, str | os.PathLike) else entry:
            if not str(path).startswith(REMOTE_PREFIXES):
                files.append(Path(path))
    return files


def check_output_folder(
    out_dir: str | Path,
    stage: str,
    n_shards: int,
    inputs: Sequence[str | Sequence[str]] | None = None,
    prefix: str = "",
) -> None:
    """Refuse an output folder whose shards would end up mixed with, or overwritten by, this
    stage's ``n_shards``: a folder readers take whole (``--shards DIR`` reads every tar in it).

    Raises :class:`OutputFolderError` when the folder holds one of the stage's input files (it
    would overwrite its input while reading it), shards another stage wrote (e.g. an import's,
    where a caption stage was pointed), tars that capfilt did not write, or shards of this stage
    numbered past this run's last (an earlier run over more input: they would be read with the
    new ones). A folder holding this stage's own shards is fine: a re-run resumes, or redoes the
    shards whose settings or input changed.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return
    where = out.resolve()
    own_input = [f for f in _input_files(inputs or []) if f.resolve().parent == where]
    if own_input:
        raise OutputFolderError(
            f"{out} holds this {stage} stage's input ({_names([f.name for f in own_input])}): "
            "it would overwrite its input while reading it; write to another --out"
        )
    ours = re.compile(rf"{re.escape(prefix)}(\d{{8}})")
    foreign, stale, others = [], [], {}
    for tar in sorted(out.glob(f"{prefix}*.tar")):
        name = tar.name.removesuffix(".tar")
        match = ours.fullmatch(name)
        if match is None:
            foreign.append(tar.name)
            continue
        marker = read_done_marker(out, int(match.group(1)), prefix) or {}
        if marker.get("stage", stage) != stage:
            others.setdefault(marker["stage"], []).append(tar.name)
        elif int(match.group(1)) >= n_shards:
            stale.append(tar.name)
    if others:
        which = ", ".join(f"{len(names)} of stage '{s}'" for s, names in sorted(others.items()))
        raise OutputFolderError(
            f"{out} holds shards another stage wrote ({which}, e.g. "
            f"{next(iter(others.values()))[0]}): this {stage} stage would overwrite or mix with "
            "them; write to another --out"
        )
    if foreign:
        raise OutputFolderError(
            f"{out} holds tars capfilt did not write ({_names(foreign)}): a folder of shards is "
            f"read whole, so this {stage} stage's would be read with them; write to another --out"
        )
    if stale:
        raise OutputFolderError(
            f"{out} holds {len(stale)} shard(s) of an earlier {stage} run past the {n_shards} this "
            f"run writes ({_names(stale)}): they would be read with the new ones; remove them "
            "(with their .parquet and _stats.json) or write to another --out"
        )


ProduceFn = Callable[[int, ShardWriter], dict[str, Any] | None]
"""Fills one shard: ``produce(index, writer)`` writes samples/rows; returns extra stats or None."""


LOADER_START = "loader start"
"""The phase of a stage's first wait for its loader (processes starting, first images decoded)."""

LAST_COMMIT = "last commit"
"""The phase of a stage's wait for its last shard's commit, which nothing overlaps; in a short
run it may be the largest, though the disk never slowed the steady state."""

ONE_OFF_PHASES = (LOADER_START, LAST_COMMIT)
"""Phases that happen once per run: a longer run spends the same time in them, so they never
set its rate."""

RATE_SET_BY = {
    "images": "the loader set the rate",
    "model": "the model set the rate",
    "writing": "writing the output set the rate",
    "publishing": "publishing shards (their fsyncs) set the rate: is the output folder's disk slow?",
}
"""What a stage says when a phase of its main process took the most time (``timing_hints``
extends it, e.g. with the setting that adds loader processes)."""

COMMIT_IN_BACKGROUND = True
"""Publish each shard on a thread while the next one is produced (:class:`ShardPublisher`);
``False`` commits in line (the baseline of ``benchmarks/stage_commit_overlap.py``)."""


class ShardPublisher:
    """Commits produced shards (:meth:`ShardWriter.commit`), one at a time, on a background thread.

    A commit mostly waits on the disk: the fsyncs of the tar, parquet and done-marker and of
    their folder (measured on a VM's local disk: 75-100 ms per shard of 400 photos, ~10 ms of it
    CPU; a network filesystem's fsync is slower). In line, a stage's device idles that long per
    shard; here shard i is published while shard i + 1 is produced. At most one commit is in
    flight, so a shard's outcome is known before the next is handed over, and a full disk stops
    the stage at the next shard's hand-over, that shard never published.

    ``on_failed(index, err)`` gets a commit's error (it may raise to stop the stage),
    ``on_published(index, stats)`` a committed shard's stats; both run on the caller's thread.
    Leaving the ``with`` block waits for the commit in flight, even when unwinding: the stage's
    lock on its output folder must outlive every write to it.
    """

    def __init__(
        self,
        on_failed: Callable[[int, Exception], None],
        on_published: Callable[[int, dict[str, Any]], None],
    ):
        self.on_failed, self.on_published = on_failed, on_published
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="capfilt-publish")
            if COMMIT_IN_BACKGROUND
            else None
        )
        self._pending: tuple[int, Callable[[], dict[str, Any]]] | None = None

    def publish(self, index: int, writer: ShardWriter, extra: dict[str, Any] | None) -> None:
        """Commit ``writer``, whose shard ``index`` is fully produced, once the previous one is."""
        try:
            self._settle()
        except BaseException:
            writer.abort()
            raise
        if self._pool is None:
            self._pending = (index, partial(_commit, writer, extra))
            self._settle()
        else:
            self._pending = (index, self._pool.submit(_commit, writer, extra).result)

    def flush(self) -> None:
        """Wait for the commit in flight, if any, and report its outcome."""
        self._settle()

    def _settle(self) -> None:
        """Wait for the pending commit and report its outcome."""
        if self._pending is None:
            return
        (index, outcome), self._pending = self._pending, None
        try:
            stats = outcome()
        except Exception as err:
            self.on_failed(index, err)
        else:
            self.on_published(index, stats)

    def __enter__(self) -> ShardPublisher:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._settle()
            elif self._pending is not None:
                with contextlib.suppress(Exception):  # the error being raised is the one to report
                    self._pending[1]()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def _commit(writer: ShardWriter, extra: dict[str, Any] | None) -> dict[str, Any]:
    """``writer.commit(extra)``; on failure its temporaries go (as ``with ShardWriter`` does)."""
    try:
        return writer.commit(extra)
    except BaseException:
        writer.abort()
        raise


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
    inputs: Sequence[str | Sequence[str]] | None = None,
    hints: Mapping[str, str] | None = None,
    plan: Callable[[list[int]], None] | None = None,
    clock: PhaseClock | None = None,
    timing_hints: Mapping[str, str] | None = None,
) -> StageResult:
    """Run ``produce`` for every shard of this rank not yet done; write ``sizes.json`` at the end.

    ``inputs[i]``: the file(s) output shard ``i`` is made from; their identity joins the config
    hash in its done-marker (:func:`input_identity`) and they are named when the stage fails.
    ``hints``: reason → what the user should check, added when every input sample was rejected.
    ``plan``: called once with the shards this rank will produce, in order, before the first (so
    that a stage's loader can read ahead across shards: :class:`~capfilt.data.loader.ShardImages`).
    ``clock``: the phases ``produce`` times on this thread (e.g. "images", "model", "writing");
    the stage adds "publishing" (waiting for the previous shard's commit), shows the shares in its
    progress and ends by saying which phase set the rate (:data:`RATE_SET_BY`, then
    ``timing_hints``).
    Raises ``StageError`` when the input holds no sample at all or every sample was rejected,
    :class:`OutputFolderError` (before writing anything) when ``out_dir`` holds shards that the
    stage's would mix with (:func:`check_output_folder`).
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, stage, n_shards, inputs, prefix)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the folder lock (locks_out_dir) has joined the ranks' process group, also for a stage that
    # loads no model (an import, a re-threshold): the closing barrier waits for every rank
    dist = dist or current_dist_info()
    result = StageResult(out_dir)
    mine = list(range(dist.rank, n_shards, dist.world_size))
    for (
        index
    ) in mine:  # temporaries of a killed run (only this rank's: others may be writing theirs)
        for tmp in out_dir.glob(f".{shard_name(index, prefix)}[._]*.tmp*"):
            tmp.unlink(missing_ok=True)

    hashes = {
        i: _shard_hash(config_hash, input_identity(inputs[i]) if inputs is not None else None)
        for i in mine
    }
    todo = [i for i in mine if not is_shard_done(out_dir, i, hashes[i], prefix)]
    result.skipped_existing = [i for i in mine if i not in todo]
    if plan is not None:
        plan(todo)
    # the folder's count, summed before any rank writes (the log line is rank 0's)
    done = sum(all_gather_objects(len(result.skipped_existing)))
    if done:
        log.info("%s: %d of %d shards already done, resuming", stage, done, n_shards)
    total = sum(samples_per_shard[i] for i in todo) if samples_per_shard else None
    clock = clock if clock is not None else PhaseClock()
    started, processed = time.perf_counter(), 0

    def failed(index: int, err: Exception) -> None:
        """One bad shard must not lose the others (exit code 3 says retry); a full or read-only
        output folder, or a ConfigError (a re-run cannot mend it), fails every shard alike, so
        it stops the stage."""
        if isinstance(err, OSError) and err.errno in STOP_ERRNOS:
            err.rank_local = True  # type: ignore[attr-defined]  # this rank's shard met it
            raise err
        if isinstance(err, ConfigError):  # the settings or inputs, wrong for every shard alike
            err.rank_local = True  # type: ignore[attr-defined]
            raise err
        log.error("%s: shard %s failed: %s", stage, shard_name(index, prefix), err)
        log.debug("traceback of shard %s", shard_name(index, prefix), exc_info=err)
        result.failed[index] = f"{type(err).__name__}: {err}"

    def published(index: int, stats: dict[str, Any]) -> None:
        nonlocal processed
        result.done.append(index)
        processed += stats["input_count"]
        if _timed_phases(clock):
            shares = clock.describe(time.perf_counter() - started)
            progress.advance(stats["input_count"], main=shares)
        else:
            progress.advance(stats["input_count"])

    with (
        ProgressReporter(desc or stage, total=total, enabled=dist.is_main) as progress,
        ShardPublisher(failed, published) as publisher,
    ):
        for index in todo:
            writer = None
            try:
                writer = ShardWriter(
                    out_dir, index, stage=stage, config_hash=hashes[index], prefix=prefix
                )
                extra = produce(index, writer)
            except Exception as err:
                if writer is not None:
                    writer.abort()
                failed(index, err)
                continue
            except BaseException:  # KeyboardInterrupt: nothing of this shard is left behind
                if writer is not None:
                    writer.abort()
                raise
            with clock.phase("publishing"):
                publisher.publish(index, writer, extra)
        with clock.phase(LAST_COMMIT):
            publisher.flush()
    if todo:
        result.seconds = time.perf_counter() - started
        result.phase_seconds = dict(clock.seconds)
    if processed:
        # the stage's own rate (model loading and process start excluded): what a user compares
        # between machines, batch sizes and worker counts; then where the main process's time
        # went, which says what to change when the rate disappoints
        seconds = result.seconds
        log.info(
            "%s: %d samples in %.1f s (%.1f samples/s%s%s)%s",
            stage,
            processed,
            seconds,
            processed / max(seconds, 1e-9),
            _steady_rate(clock, processed, seconds),
            f" on rank {dist.rank} of {dist.world_size}" if dist.world_size > 1 else "",
            _rate_set_by(clock, seconds, timing_hints or {}),
        )
    barrier()
    names = [shard_name(i, prefix) for i in range(n_shards)]
    if dist.is_main:
        write_sizes(out_dir, prefix=prefix, names=names)
    result.stats = collect_stats(out_dir, names=names)
    _check_not_all_bad(result, stage, inputs, hints or {})
    return result


def _timed_phases(clock: PhaseClock) -> bool:
    """Whether the stage's ``produce`` timed phases of its own (else only publishing is)."""
    return bool(set(clock.seconds) - {"publishing", LAST_COMMIT})


def _steady_rate(clock: PhaseClock, processed: int, seconds: float) -> str:
    """``", 301.2 after the loader's start"``: the rate without the loader's start (seconds of
    processes starting), which a short run's rate understates and a long run's does not; ``""``
    when the start was under 5% of the time."""
    start = clock.seconds.get(LOADER_START, 0.0)
    if start <= 0.05 * seconds:
        return ""
    return f", {processed / max(seconds - start, 1e-9):.1f} after the loader's start"


def _rate_set_by(clock: PhaseClock, seconds: float, hints: Mapping[str, str]) -> str:
    """``"; main process: images 62%, model 30%, ...: the loader set the rate ..."``, or ``""``
    when the stage timed no phase of its own (only publishing)."""
    if not _timed_phases(clock):
        return ""
    # the rate is set by the steady state: more loader processes do not start the loader sooner,
    # a faster disk would not shorten the run by more than the last commit
    steady = {name: s for name, s in clock.seconds.items() if name not in ONE_OFF_PHASES}
    if not steady:
        return f"; main process: {clock.describe(seconds)}"
    largest = max(steady, key=steady.__getitem__)
    said = RATE_SET_BY.get(largest, f"{largest} set the rate")
    if largest in hints:
        said = f"{said}; {hints[largest]}"
    if clock.largest() == LOADER_START:
        said = f"the loader's start took the most time (a short run); after it, {said}"
    elif clock.largest() == LAST_COMMIT:
        said = f"the last shard's commit took the most time (a short run); before it, {said}"
    return f"; main process: {clock.describe(seconds)}: {said}"


def _check_not_all_bad(result: StageResult, stage: str, inputs, hints: Mapping[str, str]) -> None:
    """A stage whose input gave no usable sample at all failed, whatever its shards say."""
    if result.failed:
        return
    stats = result.stats
    files = [f for item in (inputs or []) for f in ([item] if isinstance(item, str) else item)]
    where = f" in {_names(files)}" if files else ""
    if stats["input_count"] == 0:
        if inputs is None:  # a stage that generates its samples (synth) may make none
            return
        errors = ", ".join(f"{k}: {v}" for k, v in stats.get("shard_errors", {}).items())
        if errors:
            raise StageError(f"{stage}: no input shard could be read ({errors}){where}")
        raise StageError(f"{stage}: the input holds no samples (empty tar?){where}")
    if sum(stats["skipped"].values()) < stats["input_count"]:
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none recorded"
    message = f"{stage}: every input sample was rejected ({reasons}){where}"
    if stats.get("examples"):
        first = stats["examples"][0]
        detail = f" ({first['detail']})" if first.get("detail") else ""
        message += f"; first: {first['uid']}: {first['reason']}{detail}"
    for reason in stats["skipped"]:
        if reason in hints:
            message += f". {hints[reason]}"
    raise StageError(message + "; check the input data")
