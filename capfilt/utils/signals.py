"""SIGTERM handled as Ctrl-C.

A batch scheduler (SLURM, Kubernetes, systemd) stops a job with SIGTERM first, then SIGKILL after
a grace period. Python's default for SIGTERM ends the process on the spot: no ``finally`` runs,
so a stage's loader workers, its fork server and resource tracker outlive it and its shard
copies stay in ``$TMPDIR``. Raised as ``KeyboardInterrupt`` in the main thread, SIGTERM takes the
paths Ctrl-C takes: the shard in flight is abandoned or finished publishing, workers are shut
down, temporary folders removed, and the command says how to resume.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_TERMINATED = 128 + signal.SIGTERM
"""143: a process stopped by SIGTERM, as shells report it (Ctrl-C's is 130)."""

_owner: int | None = None
"""The pid that installed the handler: a process forked from it inherits the handler."""

_received = False


def _on_sigterm(signum, frame) -> None:
    global _received
    if os.getpid() != _owner:  # a forked child (a fork-started worker): the default, to die
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _received:  # a second SIGTERM (the scheduler's and torchrun's both reach a rank) must
        return  # not cut the cleanup short; SIGKILL still does
    _received = True
    raise KeyboardInterrupt


def terminate_as_interrupt() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in this process's main thread (only the
    main thread may install a handler; elsewhere nothing changes)."""
    global _owner, _received
    if threading.current_thread() is not threading.main_thread():
        return
    _owner, _received = os.getpid(), False
    signal.signal(signal.SIGTERM, _on_sigterm)


def terminated() -> bool:
    """Whether the KeyboardInterrupt being handled came from SIGTERM."""
    return _received
