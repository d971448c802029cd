"""Distributed set-up: a plain process by default, DDP when launched by ``torchrun``.

    torchrun --nproc_per_node 4 -m capfilt pretrain demo --shards ... --out runs/x

Single-process runs never touch ``torch.distributed``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Rank/world from torchrun's (or SLURM's) environment, without initialising anything."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    return DistInfo()


def local_gpu(local_rank: int) -> int:
    """The CUDA device index of the rank with ``local_rank`` on its node: that index when the node's
    GPUs are all visible (torchrun), the rank's share when a launcher gives each process fewer
    (e.g. SLURM's ``--gpus-per-task=1``, where every process sees one GPU as device 0)."""
    import torch

    count = torch.cuda.device_count()
    return local_rank % count if count else local_rank


def backend_for(device: str | None = None) -> str:
    """The process group's backend: NCCL for CUDA tensors, gloo for CPU ones. ``device``: where
    the collectives' tensors live (default: CUDA when there is a GPU), so a CPU evaluation under
    torchrun on a GPU node (``--device cpu``) gets gloo."""
    import torch

    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise the process group when launched with several processes (:func:`backend_for`
    ``device``)."""
    info = env_dist_info()
    if not info.distributed:
        return info
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(local_gpu(info.local_rank))
        dist.init_process_group(backend=backend)
    return info


def is_distributed() -> bool:
    """True when a default process group exists (torchrun); never imports torch.distributed itself."""
    if "torch.distributed" not in sys.modules:  # nothing can have initialised a process group
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def current_dist_info() -> DistInfo:
    """Rank/world of the process group when one is initialised, else from the environment."""
    if is_distributed():
        import torch.distributed as dist

        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    return env_dist_info()


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group; (0, 1) without one (what collectives see)."""
    if not is_distributed():
        return 0, 1
    info = current_dist_info()
    return info.rank, info.world_size


def all_gather_objects(obj):
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_over_ranks(tensor):
    """``tensor``'s mean over the ranks (a new tensor; ``tensor`` itself without a process group)."""
    if not is_distributed():
        return tensor
    import torch.distributed as dist

    total = tensor.clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
