"""Where the inference stages' loader workers come from: a fork server.

Standard library only, so that a command can start the server before it imports torch: the
server's own imports (torch, torchvision, capfilt's loader: 2-3 s) then run beside the
command's, and beside the loading of its model, instead of after them when the first batch is
wanted (benchmarks/stage_start.py).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import sys
from collections.abc import Sequence

LOADER_MODULE = "capfilt.data.loader"
"""The module of the loader's dataset (``capfilt.data.loader``), imported once by the server."""


def worker_context(extra_modules: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """Where loader workers come from: spawned, each imports torch, the loader's module, the
    transform's module and the main module again (seconds). A fork server that has imported them
    once forks each worker in a fraction of that, and like spawn it never forks a process that
    has started CUDA. Spawn where there is no fork server (Windows). ``extra_modules`` (e.g. a
    transform's module) are imported by the server as well, when it starts here."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Read when the server starts (once per process); a module that fails to import is skipped.
    # "__main__" covers a script run by path; `python -m pkg` needs its module's name as well.
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    preload = ["__main__", LOADER_MODULE]
    preload += [m for m in extra_modules if m not in preload]
    context.set_forkserver_preload(preload + ([main_spec.name] if main_spec else []))
    return context


def start_worker_server(num_workers: int) -> None:
    """Start the fork server that ``num_workers`` loader workers will come from, now.

    Returns at once: the server imports its modules in its own process. Nothing to do without
    workers or without a fork server, or when the server already runs.
    """
    if num_workers <= 0:
        return
    context = worker_context()
    if context.get_start_method() == "forkserver":
        import multiprocessing.forkserver  # POSIX only

        multiprocessing.forkserver.ensure_running()
