"""Pretraining throughput and model FLOP utilisation, against this machine's dense matmul rate.

    python benchmarks/pretrain_throughput.py --recipe demo [--steps 5] [--rounds 3] [--batch 64]
    python benchmarks/pretrain_throughput.py --recipe blip-base --batch 64 --matmul-size 8192  # GPU

Measures, in one run:
1. the FLOPs of one full pretraining step (ITC + ITM + LM, forward + backward) of the recipe's
   model, counted by ``torch.utils.flop_counter``;
2. samples/s of real optimiser steps (AdamW, fused on GPU; momentum update) on the built-in
   benchmark's images and captions, data loading excluded (it runs in worker processes in
   training), in ``--rounds`` blocks of ``--steps`` steps;
3. the machine's dense fp32 (bf16 on GPU) rate of ``--matmul-size``² matmuls (the baseline),
   measured right after each block of steps, so that both sides see the same clocks and load.
Prints samples/s and MFU = achieved model FLOP/s ÷ matmul FLOP/s, the median over the rounds of
each round's own ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from capfilt.config import load_recipe
from capfilt.data.synth import write_synth
from capfilt.data.transforms import TrainTransform
from capfilt.model import build_model, pad_vocabulary, tokenize, train_wordpiece_tokenizer
from capfilt.train.data import TrainStream, build_sources
from capfilt.train.optim import build_optimizer
from capfilt.utils.device import autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(
    device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 1.0
) -> float:
    """Best sustained FLOP/s of ``size``² matmuls over about ``seconds`` (after one warm-up)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
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
    parser.add_argument(
        "--rounds", type=int, default=3, help="blocks of steps, each followed by a matmul timing"
    )
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the recipe's)")
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=0,
        help="side of the baseline's square matmuls (default: 8192 on GPU, 2048 on CPU)",
    )
    parser.add_argument(
        "--matmul-seconds", type=float, default=1.0, help="time per matmul measurement"
    )
    parser.add_argument(
        "--vocab",
        type=int,
        default=0,
        help="pad the trained tokenizer with unused tokens to this size (30522: BERT-base's "
        "vocabulary, for blip-base without the hub)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    recipe = load_recipe(
        args.recipe, ["synth.n_human=256", "synth.n_web=0", "synth.n_test=0", *args.overrides]
    )
    batch = args.batch or recipe.data.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)

    with tempfile.TemporaryDirectory() as tmp:
        write_synth(tmp, recipe.synth)
        sources = build_sources([str(Path(tmp) / "human")])
        transform = TrainTransform(recipe.model.image_size, hflip=False)
        stream = iter(
            TrainStream(
                sources,
                transform,
                batch_size=batch,
                seed=0,
                epoch=0,
                shuffle_buffer=64,
            )
        )
        batches = [next(stream) for _ in range(args.steps + 1)]  # the rounds reuse them
    tokenizer = train_wordpiece_tokenizer(
        [t for b in batches for t in b["texts"]], recipe.model.vocab_size
    )
    pad_vocabulary(tokenizer, args.vocab)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer).to(device).train()
    optimizer = build_optimizer(model, recipe.train)
    forward = torch.compile(model) if args.compile else model
    inputs = []
    for b in batches:
        ids, mask = tokenize(tokenizer, b["texts"], recipe.model.max_text_len)
        # image ids stay on the host, as the trainer passes them (checked there, no device sync)
        image_ids = b["image_ids"].pin_memory() if device.type == "cuda" else b["image_ids"]
        images = transform.normalize(b["images"].to(device))
        inputs.append((images, ids.to(device), mask.to(device), image_ids))

    def step(images, ids, mask, image_ids, fwd=forward) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.clamp_temp()
        with autocast(device):
            out = fwd(images, ids, mask, image_ids=image_ids, alpha=0.4)
        out["loss"].backward()
        optimizer.step()
        model.momentum_update()

    counter = FlopCounterMode(display=False)
    with counter:
        step(*inputs[0], fwd=model)  # the eager model: also the warm-up
    flops_per_step = counter.get_total_flops()
    step(*inputs[0])  # compiles, with --compile
    step_times, peaks, mfus = [], [], []
    for _ in range(args.rounds):
        _sync(device)
        start = time.perf_counter()
        for inp in inputs[1:]:
            step(*inp)
        _sync(device)
        elapsed = time.perf_counter() - start
        peak = matmul_rate(device, dtype, matmul_size, args.matmul_seconds)
        step_times.append(elapsed)
        peaks.append(peak)
        mfus.append(flops_per_step * args.steps / elapsed / peak)
    elapsed = statistics.median(step_times)
    peak = statistics.median(peaks)
    samples_per_s = args.steps * batch / elapsed
    achieved = flops_per_step * args.steps / elapsed
    result = {
        "recipe": args.recipe,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "batch": batch,
        "vocab": len(tokenizer),
        "trainable_params_m": round(
            sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2
        ),
        "gflop_per_step": round(flops_per_step / 1e9, 2),
        "samples_per_s": round(samples_per_s, 2),
        "achieved_gflops": round(achieved / 1e9, 2),
        "matmul": f"{matmul_size}^2 {str(dtype).removeprefix('torch.')}",
        "matmul_gflops": round(peak / 1e9, 2),
        "mfu_vs_matmul": round(statistics.median(mfus), 3),
        "mfu_per_round": [round(m, 3) for m in mfus],
    }
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
