"""One local copy of each remote shard, shared by the loader workers that split it.

Loader workers split a shard by sample position (``capfilt/data/loader.py``), so each of them
walks the whole tar: in a local file it seeks over the other workers' samples, but a stream
(``pipe:``, http, ``hf://``) cannot seek, and W workers would each fetch all of its bytes: W times
the traffic and, where the network is the bottleneck, W times the wait. Instead the first worker
that needs a remote shard copies it into a scratch folder the stage owns; the others wait for the
copy and read it seekably, and while they work on it the next shard is fetched in the background.
The main process deletes a copy once every worker has finished its shard, and the folder when
the loader closes, so about two shards are on disk at a time.

A copy holds bytes only; damage in the tar is found by the readers of the copy, as one process
streaming the shard would find it. A fetch that breaks off (a 404, a dropped connection, a
``pipe:`` command that exits with an error), or a copy that cannot be written (a full
``$TMPDIR``), fails the shard as a stream reader does (:class:`~capfilt.data.reader.ShardFetchError`):
no output, a re-run retries it. So the output does not depend on the worker count.

Workers coordinate through files only (they are separate processes): ``N.claim`` is created
exclusively by the one worker that fetches shard N, ``N.ready`` appears when ``N.tar`` or
``N.error`` is complete.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from capfilt.data.reader import open_shard

POLL_SECONDS = 0.05
"""How often a worker waiting for another's copy looks for it."""

CHUNK_BYTES = 1 << 20


class ShardCopyError(RuntimeError):
    """A remote shard's transfer failed, or its local copy could not be written."""


class ShardCopies:
    """Local copies of remote shards in ``folder`` (one folder per loader, made by its owner)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, index: int, suffix: str) -> Path:
        return self.folder / f"{index:08d}.{suffix}"

    def _claim(self, index: int) -> bool:
        """True for the one caller (of any process) that is to fetch shard ``index``."""
        try:
            os.close(os.open(self._path(index, "claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def _fetch(self, index: int, url: str) -> None:
        part = self._path(index, "part")
        fetch_error = write_error = None
        try:
            with open(part, "wb") as copy:
                try:
                    with open_shard(url) as source:
                        while chunk := source.read(CHUNK_BYTES):
                            try:
                                copy.write(chunk)
                            except OSError as err:
                                write_error = err
                                break
                except Exception as err:  # noqa: BLE001 - the transfer's, whatever its kind
                    fetch_error = err  # (a write error, met first, is the one reported)
        except OSError as err:  # opening or flushing the copy
            write_error = write_error or err
        if write_error is not None:  # this disk's trouble: fail the shard, no partial output
            self._fail(
                index,
                f"{url}: could not write its local copy in {self.folder} ({write_error}); "
                "copies of remote shards read by several loader workers go under $TMPDIR",
            )
            return
        if fetch_error is not None:
            self._fail(index, f"{url}: its transfer failed: {fetch_error}")
            return
        os.replace(part, self._path(index, "tar"))
        self._path(index, "ready").touch()

    def _fail(self, index: int, message: str) -> None:
        try:
            self._path(index, "error").write_text(message)
            self._path(index, "part").unlink(missing_ok=True)
        except OSError:
            pass  # the error file is what matters; without it the readers still fail
        finally:  # even on a full disk the waiting workers must stop waiting
            self._path(index, "ready").touch()

    def prefetch(self, index: int, url: str) -> None:
        """Start fetching shard ``index`` in a background thread, unless a worker already has."""
        if self._claim(index):
            threading.Thread(target=self._fetch, args=(index, url), daemon=True).start()

    def local(self, index: int, url: str) -> str:
        """The path of the local copy of shard ``index`` from ``url``, fetching it here if no
        worker has started to. Raises :class:`ShardCopyError`."""
        if self._claim(index):
            self._fetch(index, url)
        while not self._path(index, "ready").exists():
            time.sleep(POLL_SECONDS)
        error = self._path(index, "error")
        if error.exists():
            raise ShardCopyError(error.read_text() or f"{url}: its local copy failed")
        if not self._path(index, "tar").exists():
            raise ShardCopyError(f"{url}: its local copy in {self.folder} is missing")
        return str(self._path(index, "tar"))

    def remove(self, index: int) -> None:
        """Delete shard ``index``'s copy (every worker is done with it); its markers stay, so no
        worker fetches it again."""
        for suffix in ("tar", "part"):
            self._path(index, suffix).unlink(missing_ok=True)
