"""How many intra-op threads a process computes with: chosen from the recipe, never inherited.

torch starts with one thread per core, whatever else runs: loader worker processes, the other
ranks of a node, or (on a shared machine) other jobs. For the small models of the demo and the
tests, oversubscribed cores cost more than a second thread gains (``benchmarks/threads.py``
measures both sides), so a stage sets its thread count once, from ``runtime.threads``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from capfilt.utils.dist import env_dist_info


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and SLURM restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int, num_workers: int = 0) -> int:
    """Intra-op threads for this process.

    ``requested`` > 0 is taken as is. 0 (auto): ``OMP_NUM_THREADS`` when the environment sets it
    (torchrun sets 1 per rank unless told otherwise); else this rank's share of the cores (the
    affinity divided among the node's ranks) less one core per loader worker process and one for
    the main process's own Python work and the rest of the machine, at least 1. OpenMP threads
    spin-wait for each other, so one without a core of its own stalls the rest: on a busy 2-core
    machine 2 threads ran the demo's steps at 0.08-0.11x the speed of 1 (benchmarks/threads.py),
    against at most 1.35x faster when the machine is idle.
    """
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    info = env_dist_info()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size if info.distributed else 1))
    share = available_cores() // max(1, ranks_here)
    return max(1, share - max(0, num_workers) - 1)


@contextmanager
def use_threads(requested: int, num_workers: int = 0):
    """Run the block with :func:`choose_threads` intra-op threads; restore the count after."""
    import torch

    before = torch.get_num_threads()
    n = choose_threads(requested, num_workers)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
