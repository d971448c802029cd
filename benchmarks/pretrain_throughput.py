"""Pretraining throughput and model FLOP utilisation, against this machine's dense matmul rate.

    python benchmarks/pretrain_throughput.py --recipe demo [--steps 5] [--batch 64] [--json out.json]

Measures, in one run:
1. the machine's dense fp32 (or bf16 on GPU) matmul rate with square matmuls (the baseline);
2. the FLOPs of one full pretraining step (ITC + ITM + LM, forward + backward) of the recipe's
   model, counted by ``torch.utils.flop_counter``;
3. samples/s of real optimiser steps (AdamW, momentum update) on the built-in benchmark's
   images and captions, data loading excluded (it runs in worker processes in training).
Prints samples/s and MFU = achieved model FLOP/s ÷ measured matmul FLOP/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from capfilt.config import load_recipe
from capfilt.data.synth import write_synth
from capfilt.data.transforms import TrainTransform
from capfilt.model import build_model, tokenize, train_wordpiece_tokenizer
from capfilt.train.data import TrainStream, build_sources
from capfilt.train.optim import build_optimizer


def matmul_rate(
    device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 3.0
) -> float:
    """Best sustained FLOP/s of ``size``² matmuls over about ``seconds``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="demo")
    parser.add_argument(
        "--steps", type=int, default=5, help="timed optimiser steps (after 1 warm-up step)"
    )
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the recipe's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, ["synth.n_human=256", "synth.n_web=0", "synth.n_test=0"])
    batch = args.batch or recipe.data.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        write_synth(tmp, recipe.synth)
        sources = build_sources([str(Path(tmp) / "human")])
        stream = iter(
            TrainStream(
                sources,
                TrainTransform(recipe.model.image_size, hflip=False),
                batch_size=batch,
                seed=0,
                epoch=0,
                shuffle_buffer=64,
            )
        )
        batches = [next(stream) for _ in range(args.steps + 1)]
    tokenizer = train_wordpiece_tokenizer(
        [t for b in batches for t in b["texts"]], recipe.model.vocab_size
    )
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer).to(device).train()
    optimizer = build_optimizer(model, recipe.train)
    inputs = []
    for b in batches:
        ids, mask = tokenize(tokenizer, b["texts"], recipe.model.max_text_len)
        inputs.append(
            (b["images"].to(device), ids.to(device), mask.to(device), b["image_ids"].to(device))
        )

    def step(images, ids, mask, image_ids) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.clamp_temp()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = model.forward_pretrain(images, ids, mask, image_ids=image_ids, alpha=0.4)
        out["loss"].backward()
        optimizer.step()
        model.momentum_update()

    counter = FlopCounterMode(display=False)
    with counter:
        step(*inputs[0])  # also the warm-up
    flops_per_step = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for inp in inputs[1:]:
        step(*inp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = matmul_rate(device, dtype)

    samples_per_s = args.steps * batch / elapsed
    achieved = flops_per_step * args.steps / elapsed
    result = {
        "recipe": args.recipe,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "batch": batch,
        "trainable_params_m": round(
            sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2
        ),
        "gflop_per_step": round(flops_per_step / 1e9, 2),
        "samples_per_s": round(samples_per_s, 2),
        "achieved_gflops": round(achieved / 1e9, 2),
        "matmul_gflops": round(peak / 1e9, 2),
        "mfu_vs_matmul": round(achieved / peak, 3),
    }
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
