"""Atomic file writes: a reader never sees a half-written file.

Every file capfilt writes that another step reads (shards, done-markers, model folders, run
folders, reports) goes through here: write under a temporary name, fsync, rename.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or an interrupt must not leave the temporary behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Indented, key-sorted JSON; numpy scalars and other number-likes are written as floats."""
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n").encode()
    )
