"""Which device a process computes on, and the precision it computes in there."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from capfilt.utils.dist import env_dist_info, local_gpu


def default_device() -> torch.device:
    """This rank's GPU when there is one (from torchrun's LOCAL_RANK: :func:`local_gpu`), else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_gpu(env_dist_info().local_rank))
    return torch.device("cpu")


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context for ``precision``: ``auto`` = bf16 on GPU, fp32 on CPU; ``bf16`` /
    ``fp32`` force it. Training and inference share this rule."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. From the host to a GPU through pinned memory, without blocking:
    a copy from pageable memory first waits for all the work queued on the GPU (a host sync)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
