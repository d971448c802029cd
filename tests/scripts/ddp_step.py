"""Training steps on fixed global batches; run plainly or under torchrun (gloo).

    python tests/scripts/ddp_step.py OUT.pt                       # one process, batch 2b
    torchrun --nproc_per_node 2 tests/scripts/ddp_step.py OUT.pt  # two ranks, batch b each

Each case calls the model the way the trainer does (``wrap_for_training``: DDP under torchrun,
``sync_unless_last`` around every micro-batch) for one stage and a number of micro-batches, then
one AdamW step. Rank 0 writes, per case, the mean loss parts, the averaged gradients (None where
a parameter had none) and which parameters the optimiser step changed to OUT.pt, so a test can compare the runs.
"""

from __future__ import annotations

import sys

import torch

from capfilt.config import load_recipe
from capfilt.model import build_model, tokenize, train_wordpiece_tokenizer
from capfilt.train.optim import build_optimizer
from capfilt.train.trainer import STAGE_LOSSES, finite_means, sync_unless_last, wrap_for_training
from capfilt.utils.dist import destroy_distributed, init_distributed

GLOBAL_BATCH = 8
WORDS = "red green blue big small circle square triangle left right top bottom a the of".split()
CASES = [("pretrain", 1), ("pretrain", 2), ("captioner", 2), ("filter", 1)]
"""(stage, micro-batches per optimiser step)."""
LOSS_KEYS = ("loss_itc", "loss_itm", "loss_lm")


def run_case(stage: str, grad_accum: int, info, cfg, tokenizer, images, ids, mask) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    model.train()
    losses = STAGE_LOSSES[stage]
    module = wrap_for_training(model, losses, info, torch.device("cpu"))
    optimizer = build_optimizer(model, load_recipe("tiny").train)
    micro_global = GLOBAL_BATCH // grad_accum
    b = micro_global // info.world_size
    window: dict[str, torch.Tensor] = {}
    for micro in range(grad_accum):
        lo = micro * micro_global + info.rank * b
        with sync_unless_last(module, micro, grad_accum):
            out = module(
                images[lo : lo + b],
                ids[lo : lo + b],
                mask[lo : lo + b],
                image_ids=torch.arange(GLOBAL_BATCH)[lo : lo + b],
                alpha=0.4,
                weights=losses,
                generator=torch.Generator().manual_seed(123 + micro),
            )
            (out["loss"] / grad_accum).backward()
        for key in LOSS_KEYS:
            window[key] = window.get(key, 0) + out[key].detach()
    # the trainer's logged means: over the micro-batches and, under torchrun, over the ranks
    means = finite_means(window, grad_accum)
    parts = torch.tensor([means[key] for key in LOSS_KEYS])
    grads = {
        n: (p.grad.clone() if p.grad is not None else None)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    moved = {
        n: bool((p.detach() != before[n]).any()) for n, p in model.named_parameters() if n in before
    }
    return {"losses": parts, "grads": grads, "moved": moved}


def main(out_path: str) -> None:
    info = init_distributed()
    cfg = load_recipe("tiny", ["model.text_dropout=0.0", "model.queue_size=32"]).model
    gen = torch.Generator().manual_seed(0)
    texts = [
        " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=gen))
        for _ in range(GLOBAL_BATCH)
    ]
    images = torch.randn(GLOBAL_BATCH, 3, cfg.image_size, cfg.image_size, generator=gen)
    tokenizer = train_wordpiece_tokenizer(WORDS * 4, 100)
    ids, mask = tokenize(tokenizer, texts, cfg.max_text_len)
    results = {
        f"{stage}/{accum}": run_case(stage, accum, info, cfg, tokenizer, images, ids, mask)
        for stage, accum in CASES
    }
    if info.is_main:
        torch.save(results, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
