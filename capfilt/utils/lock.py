"""One capfilt job per output folder: an advisory lock on ``OUT/.capfilt.lock``.

Two stages writing one folder would delete each other's temporary files and mix their counts.
The first job's main rank holds ``flock(LOCK_EX)`` on the lock file for as long as it writes; a
second job fails at once, naming the holder's pid. Under torchrun the ranks of one job share the
folder, so only rank 0 takes the lock and tells the other ranks whether it got it: a lock per
rank would let a second job's rank r run beside a first job of another world size.

The lock is released when the holder's file descriptor closes, so a killed job never leaves a
stale lock behind (only the file, which the next job takes over). A job that ends removes the
file, so a finished folder holds only its output; a job that opened the file just before it
was removed notices (the path no longer names what it locked) and locks the new file instead.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from capfilt.utils.dist import DistInfo, init_distributed, is_distributed

LOCK_NAME = ".capfilt.lock"

try:
    import fcntl
except ImportError:  # not POSIX: no lock (capfilt's targets are Linux and macOS)
    fcntl = None  # type: ignore[assignment]


class FolderInUseError(RuntimeError):
    """Another capfilt process is writing the same output folder."""


def _try_lock(folder: Path):
    """Open and exclusively lock ``folder/.capfilt.lock``; the open file, or the holder's pid."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            return None, holder
        except BaseException:
            fh.close()
            raise
        # the previous holder may have removed the file between our open and our lock: then we
        # locked an orphan, and must lock the file now at the path
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh, None


def _release(fh, remove_folder: bool) -> None:
    """Remove the lock file while still holding it (a finished job leaves its folder as it
    found it: a folder the lock made and nothing filled is removed too), then close it, which
    releases the lock."""
    path = Path(fh.name)
    try:
        path.unlink(missing_ok=True)
        if remove_folder:
            path.parent.rmdir()  # only when empty
    except OSError:
        pass
    finally:
        fh.close()


def _share_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of the process group (the value itself without one)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def folder_lock(folder: str | Path, dist: DistInfo | None = None) -> Iterator[None]:
    """Hold the folder's lock (creating the folder) for the duration of the block.

    Raises ``FolderInUseError`` on every rank when another job holds it.
    """
    folder = Path(folder)
    # the ranks join their process group here if nothing did before (an import, a re-threshold):
    # rank 0's answer must reach them, or a folder in use fails rank 0 alone
    dist = dist or init_distributed()
    fh, holder = None, None
    made_folder = not folder.exists()
    if fcntl is not None and dist.is_main:
        try:
            fh, holder = _try_lock(folder)
        except OSError as err:  # e.g. a read-only folder: tell the other ranks, then raise here
            _share_from_main(f"error: {err}")
            raise
    holder = _share_from_main(holder)
    if holder is not None:
        if holder.startswith("error: "):
            raise OSError(holder.removeprefix("error: "))
        raise FolderInUseError(
            f"{folder} is in use by another capfilt process (pid {holder}); "
            "wait for it to finish or choose another output folder"
        )
    try:
        yield
    finally:
        if fh is not None:
            _release(fh, made_folder)


F = TypeVar("F", bound=Callable[..., Any])


def locks_out_dir(fn: F) -> F:
    """Decorator: run ``fn`` holding the lock of its ``out_dir`` argument (and its ``dist``, if any)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        with folder_lock(bound.arguments["out_dir"], bound.arguments.get("dist")):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
