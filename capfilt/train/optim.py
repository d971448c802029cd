"""AdamW with BLIP's parameter groups and learning-rate schedules (docs/architecture.md §5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from capfilt.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms, the temperature and token/position embeddings of the ViT are exempt."""
    no_decay_names = set()
    for module_name, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            no_decay_names.update(f"{module_name}.{n}" if module_name else n for n in hook())
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or name in no_decay_names or name.endswith(("cls_token", "pos_embed")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; the fused CUDA kernel (one launch for all parameters
    instead of a few per tensor) when the model is on a GPU. Build it after moving the model."""
    groups = param_groups(model, cfg.weight_decay)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=on_cuda or None)


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based).

    Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``; then BLIP's per-epoch step
    decay ``lr * lr_decay_rate ** epoch`` or a cosine from ``lr`` to ``min_lr`` over the remaining
    steps; never below ``min_lr``.
    """
    total = cfg.epochs * steps_per_epoch
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(1, cfg.warmup_steps)
    if cfg.schedule == "step":
        lr = cfg.lr * cfg.lr_decay_rate ** (step // steps_per_epoch)
    else:
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    return max(cfg.min_lr, lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
