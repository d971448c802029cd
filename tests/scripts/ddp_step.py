"""One pretraining step on a fixed global batch; run plainly or under torchrun (gloo).

    python tests/scripts/ddp_step.py OUT.pt                       # one process, batch 2b
    torchrun --nproc_per_node 2 tests/scripts/ddp_step.py OUT.pt  # two ranks, batch b each

Rank 0 writes the mean loss parts and the averaged gradients of every parameter to OUT.pt, so a
test can compare the two runs.
"""

from __future__ import annotations

import sys

import torch

from capfilt.config import load_recipe
from capfilt.model import build_model, tokenize, train_wordpiece_tokenizer
from capfilt.train.trainer import allreduce_grads
from capfilt.utils.dist import destroy_distributed, init_distributed

GLOBAL_BATCH = 8
WORDS = "red green blue big small circle square triangle left right top bottom a the of".split()


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
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    model.train()
    b = GLOBAL_BATCH // info.world_size
    lo, hi = info.rank * b, (info.rank + 1) * b
    ids, mask = tokenize(tokenizer, texts, cfg.max_text_len)
    out = model.forward_pretrain(
        images[lo:hi],
        ids[lo:hi],
        mask[lo:hi],
        image_ids=torch.arange(GLOBAL_BATCH)[lo:hi],
        alpha=0.4,
        generator=torch.Generator().manual_seed(123),
    )
    out["loss"].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    parts = torch.stack([out["loss_itc"], out["loss_itm"], out["loss_lm"]]).detach()
    if info.distributed:
        import torch.distributed as dist

        allreduce_grads(params, info.world_size)
        dist.all_reduce(parts)
        parts /= info.world_size
    if info.is_main:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        grads = {
            n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in zip(names, params)
        }
        torch.save({"losses": parts, "grads": grads}, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
