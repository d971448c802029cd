"""Atomic shard output: ``{:08d}.tar`` + ``.parquet`` + ``_stats.json`` (the done-marker) + ``sizes.json``.

A shard becomes visible only by renames: the tar, then its parquet, then its stats file, each
written under a temporary name and fsynced first. A reader or a resumed stage therefore never sees
a half shard, and a shard counts as done exactly when its stats file exists with the stage's
config hash.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capfilt.utils.files import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from capfilt.data.reader import SkipCounter

TAR_MTIME = 0
"""Fixed member mtime so that the same samples give byte-identical tars."""


SKIPPED, DROPPED = "skipped", "dropped"
"""Parquet ``status`` of an input sample that was bad (skipped) or that the stage chose not to keep."""

STATS_SUFFIX = "_stats.json"
"""A shard's done-marker is ``{shard}_stats.json`` beside ``{shard}.tar``."""


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}{index:08d}"


def tar_path(out_dir: str | Path, index: int, prefix: str = "") -> Path:
    return Path(out_dir) / f"{shard_name(index, prefix)}.tar"


def parquet_path(out_dir: str | Path, index: int, prefix: str = "") -> Path:
    """The shard's per-input-sample table (one row per input sample, kept or dropped)."""
    return Path(out_dir) / f"{shard_name(index, prefix)}.parquet"


def stats_path(out_dir: str | Path, index: int, prefix: str = "") -> Path:
    """The shard's done-marker, written last."""
    return Path(out_dir) / f"{shard_name(index, prefix)}{STATS_SUFFIX}"


def read_done_marker(out_dir: Path, index: int, prefix: str = "") -> dict | None:
    path = stats_path(out_dir, index, prefix)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_shard_done(out_dir: Path, index: int, config_hash: str, prefix: str = "") -> bool:
    """True when shard ``index`` was completed by a stage with the same config hash."""
    stats = read_done_marker(out_dir, index, prefix)
    if not stats or stats.get("config_hash") != config_hash:
        return False
    return tar_path(out_dir, index, prefix).is_file()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _template_header() -> bytearray:
    """A GNU header block as tarfile writes it for ``_tarinfo("", 0)``, its checksum field blank
    (8 spaces, as the checksum is computed): the fixed fields of every member's header."""
    block = bytearray(
        _tarinfo("", 0).tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
    )
    block[_CHKSUM] = b" " * 8
    return block


_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
"""Header fields (ustar layout): name (NUL-padded), size (11 octal digits + NUL), checksum."""
_TEMPLATE = _template_header()


def _header(name: str, size: int) -> bytes:
    """The header block(s) of a member, byte for byte as ``TarInfo.tobuf`` in GNU format.

    tobuf builds a TarInfo's every field each call (~20 us; three members per sample, in the
    stages' main process, whose time per image is a GPU stage's ceiling:
    ``benchmarks/stage_host_cost.py``); here only the name, size and checksum change in a copy
    of a template. A name over 100 bytes (GNU long-name block) or a size of 8 GiB or more
    (base-256 digits) goes through tobuf.
    """
    encoded = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(encoded) > _NAME.stop or size >= 8**11:
        info = _tarinfo(name, size)
        return info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
    block = _TEMPLATE.copy()
    block[: len(encoded)] = encoded
    block[_SIZE] = b"%011o\0" % size
    # tarfile's checksum: the unsigned byte sum with the field as spaces, 6 octal digits + NUL
    block[_CHKSUM.start : _CHKSUM.stop - 1] = b"%06o\0" % sum(block)  # its last byte stays " "
    return bytes(block)


def _member_bytes(name: str, data: bytes) -> list[bytes]:
    """A tar member as ``TarFile.addfile`` writes it in GNU format: header block(s) (a long name
    takes its own), the data, NUL padding to the 512-byte block. Written by hand, without
    ``addfile``'s copies of the header object and of the data through a file object: the
    stages' main process writes every sample, and on a GPU its time per image is the stage's
    ceiling (``benchmarks/stage_host_cost.py``)."""
    pad = -len(data) % tarfile.BLOCKSIZE
    header = _header(name, len(data))
    return [header, data, tarfile.NUL * pad] if pad else [header, data]


def encode_field(value: Any) -> bytes:
    """Sample field → bytes: bytes as is, str as UTF-8, anything else as JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")


class ShardWriter:
    """Writes one output shard; use as a context manager, then ``commit(extra_stats)``.

    ``write(sample)`` adds a sample to the tar (``__key__`` plus extension → value fields);
    ``record(row)`` adds a row to the parquet (one per *input* sample, kept or dropped).
    Nothing is visible under the final names until ``commit``.
    """

    def __init__(
        self, out_dir: str | Path, index: int, *, stage: str, config_hash: str, prefix: str = ""
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.stage = stage
        self.config_hash = config_hash
        self.name = shard_name(index, prefix)
        self.tar_path = tar_path(self.out_dir, index, prefix)
        self.parquet_path = parquet_path(self.out_dir, index, prefix)
        self.stats_path = stats_path(self.out_dir, index, prefix)
        self._tmp_tar = self.out_dir / f".{self.name}.tar.tmp{os.getpid()}"
        self._fh = open(self._tmp_tar, "wb")
        self._keys: set[str] = set()
        self.rows: list[dict] = []
        self.n_written = 0
        self.skipped: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.shard_errors: Counter[str] = Counter()
        self._first_skip: dict[str, str] | None = None
        self._committed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self.name}")
        self._keys.add(key)
        for ext in sorted(k for k in sample if not k.startswith("__")):
            for part in _member_bytes(f"{key}.{ext}", encode_field(sample[ext])):
                self._fh.write(part)
        self.n_written += 1

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def skip(self, reason: str, row: dict[str, Any] | None = None, detail: str = "") -> None:
        """Count an unusable input sample (bad input), and record it in the parquet when given."""
        self.skipped[reason] += 1
        if row is not None:
            self.rows.append({**row, "status": SKIPPED, "reason": reason})
            if self._first_skip is None:
                self._first_skip = {"uid": str(row.get("uid", "")), "reason": reason}
                if detail or row.get("detail"):
                    self._first_skip["detail"] = str(detail or row.get("detail"))

    def add_skipped(self, skipped: SkipCounter | Mapping[str, int]) -> None:
        """Add the bad input a reader met (its ``SkipCounter``) to this shard: one parquet row per
        rejected sample (``uid``, status ``skipped``, ``reason``, ``detail``) and the counts; damage
        to a whole tar goes to the stats' ``shard_errors``. A bare mapping adds counts only."""
        if isinstance(skipped, Mapping):
            self.skipped.update(skipped)
            return
        for record in skipped.records:
            self.skip(record.reason, {"uid": record.key, "detail": record.detail}, record.detail)
        self.skipped.update(skipped.counts - Counter(r.reason for r in skipped.records))
        self.shard_errors.update(skipped.shard_events)

    def drop(self, reason: str, row: dict[str, Any] | None = None) -> None:
        """Count a good input sample the stage decided not to keep (e.g. every text filtered out)."""
        self.dropped[reason] += 1
        if row is not None:
            self.rows.append({**row, "status": DROPPED, "reason": reason})

    def _end_tar(self) -> None:
        """The end of the archive as ``TarFile.close`` writes it: two zero blocks, then zeros
        up to a multiple of the 10240-byte record."""
        end = self._fh.tell() + 2 * tarfile.BLOCKSIZE
        self._fh.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))

    def abort(self) -> None:
        # closing flushes, which fails again on a full disk: the error that made us abort is
        # the one to report, and the temporary goes either way
        try:
            with contextlib.suppress(OSError):
                self._fh.close()
        finally:
            self._tmp_tar.unlink(missing_ok=True)

    def commit(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish tar, parquet, then stats (the done-marker). Returns the stats."""
        self._end_tar()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp_tar, self.tar_path)
        import pandas as pd  # lazily: keeps `capfilt --help` fast

        table = pd.DataFrame(self.rows)
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        atomic_write_bytes(self.parquet_path, buf.getvalue())
        stats = {
            "shard": self.tar_path.name,
            "stage": self.stage,
            "config_hash": self.config_hash,
            "count": self.n_written,
            "input_count": self.n_written + sum(self.dropped.values()) + sum(self.skipped.values()),
            "skipped": dict(sorted(self.skipped.items())),
            "dropped": dict(sorted(self.dropped.items())),
            **(
                {"shard_errors": dict(sorted(self.shard_errors.items()))}
                if self.shard_errors
                else {}
            ),
            **({"first_skipped": self._first_skip} if self._first_skip else {}),
            **(extra_stats or {}),
        }
        atomic_write_json(self.stats_path, stats)
        self._committed = True
        return stats


def write_sizes(
    out_dir: str | Path, prefix: str = "", names: Iterable[str] | None = None
) -> dict[str, int]:
    """Write ``sizes.json`` (shard file → sample count) from the done-markers in ``out_dir``.

    ``names`` limits it to those shards (a stage's own), so stale files of another run don't count.
    """
    out_dir = Path(out_dir)
    sizes = {}
    wanted = set(names) if names is not None else None
    for path in sorted(out_dir.glob(f"{prefix}*{STATS_SUFFIX}")):
        if wanted is not None and path.name.removesuffix(STATS_SUFFIX) not in wanted:
            continue
        stats = json.loads(path.read_text())
        sizes[stats["shard"]] = int(stats["count"])
    atomic_write_json(out_dir / "sizes.json", sizes)
    return sizes


def collect_stats(out_dir: str | Path, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Sum counts, skip reasons and whole-tar errors over the done-markers of a folder, with the
    first rejected sample of each shard that had one (``examples``)."""
    out_dir = Path(out_dir)
    total, inputs, skipped, shard_errors = 0, 0, Counter(), Counter()
    examples: list[dict] = []
    for path in sorted(out_dir.glob(f"*{STATS_SUFFIX}")):
        if names is not None and path.name.removesuffix(STATS_SUFFIX) not in names:
            continue
        stats = json.loads(path.read_text())
        total += stats.get("count", 0)
        inputs += stats.get("input_count", 0)
        skipped.update(stats.get("skipped", {}))
        shard_errors.update(stats.get("shard_errors", {}))
        if stats.get("first_skipped"):
            examples.append(stats["first_skipped"])
    return {
        "count": total,
        "input_count": inputs,
        "skipped": dict(sorted(skipped.items())),
        "shard_errors": dict(sorted(shard_errors.items())),
        "examples": examples,
    }


def drop_skipped_rows(table):
    """The rows of a shard parquet that describe read samples (``status`` skipped rows removed):
    what score tables and summaries count."""
    if "status" not in table.columns:
        return table
    # without the skipped rows' gaps, columns such as ``kept`` are plain bool again
    return table[table["status"] != SKIPPED].reset_index(drop=True).infer_objects()
