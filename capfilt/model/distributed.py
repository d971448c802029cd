"""All-gather helpers for the losses that work on the global batch (docs/architecture.md §2 and "Scale").

Everything here is a no-op (identity) when ``torch.distributed`` is not initialised, so the same
model code runs in a plain single process. Gathers concatenate along dim 0 in rank order and
need the same shape on every rank (pad first: :meth:`Gather.no_grad_padded`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from capfilt.utils.dist import is_distributed, rank_and_world


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the gradient and returns the local slice.

    Rank r's rows of the output feed the losses of every rank; summing the gradients of all ranks
    gives rank r the exact gradient of the summed loss for its own input (DDP then averages).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        ctx.rank, ctx.n = rank, t.shape[0]
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` of every rank along dim 0; gradient flows back to the local part."""
    if not is_distributed() or dist.get_world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t)


@torch.no_grad()
def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` of every rank along dim 0, detached."""
    if not is_distributed() or dist.get_world_size() == 1:
        return t.detach()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)


@torch.no_grad()
def all_reduce_max(value: int, device: torch.device) -> int:
    """Largest ``value`` over ranks (``value`` itself in a single process)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], device=device, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class Gather:
    """All-gather across the default process group; identity in a single process.

    ``MED.forward_pretrain(gather=...)`` uses this object (the default). Every rank must call the
    model with the same local batch size (all_gather needs equal shapes), and every rank must
    take part in each call (they are collectives).
    """

    @property
    def rank(self) -> int:
        return rank_and_world()[0]

    @property
    def world_size(self) -> int:
        return rank_and_world()[1]

    def with_grad(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_with_grad(t)

    def no_grad(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_no_grad(t)

    def max_int(self, value: int, device: torch.device) -> int:
        return all_reduce_max(value, device)

    def no_grad_padded(
        self, t: torch.Tensor, value: int | float = 0, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad dim 1 of ``t`` to the largest length over ranks (or to ``length``, a length an
        earlier call returned: the ids' for their mask, without another round trip), then gather.

        Returns (padded local tensor, gathered tensor); used for token ids whose padded length
        differs between ranks.
        """
        if length is None:
            length = self.max_int(t.shape[1], t.device)  # a collective and a host sync
        if length > t.shape[1]:
            t = F.pad(t, (0, length - t.shape[1]), value=value)
        return t, self.no_grad(t)


class LocalGather(Gather):
    """Never communicates: every rank works on its own batch only (BLIP-pretrain-style ITM)."""

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def with_grad(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def no_grad(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    def max_int(self, value: int, device: torch.device) -> int:
        return int(value)
