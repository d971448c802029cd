"""Intra-op threads against loader workers: training steps per second for each pairing, in one run.

    python benchmarks/threads.py [--recipe demo] [--threads 1 2] [--workers 0 1] [--steps 6] [--rounds 3]

Each setting (threads × loader workers) trains the recipe's model on the built-in benchmark's
images: a fresh DataLoader per measurement, one warm-up step, then ``--steps`` timed steps that
include waiting for the loader (decode and augmentation run in the main process at 0 workers).
Settings are measured alternately, ``--rounds`` times each, so a change in the machine's load
hits them all alike; the median is reported as samples/s and as a ratio to the first setting
(the baseline). ``runtime.threads: 0`` (auto) picks the setting this machine's cores give: see
capfilt/utils/threads.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from capfilt.config import load_recipe
from capfilt.data.synth import write_synth
from capfilt.data.transforms import TrainTransform
from capfilt.model import build_model, tokenize, train_wordpiece_tokenizer
from capfilt.train.data import TrainStream, build_sources, make_loader
from capfilt.train.optim import build_optimizer
from capfilt.utils.threads import available_cores, choose_threads


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per setting")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, ["synth.n_human=512", "synth.n_web=0", "synth.n_test=0"])
    mcfg, data_cfg = recipe.model, recipe.data
    settings = list(itertools.product(args.threads, args.workers))
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        write_synth(tmp, recipe.synth)
        sources = build_sources([str(Path(tmp) / "human")])
        transform = TrainTransform(
            mcfg.image_size, data_cfg.crop_scale, data_cfg.hflip, data_cfg.mean, data_cfg.std
        )
        first = next(
            iter(
                TrainStream(sources, transform, batch_size=256, seed=0, epoch=0, shuffle_buffer=64)
            )
        )
        tokenizer = train_wordpiece_tokenizer(first["texts"], mcfg.vocab_size)
        torch.manual_seed(0)
        model = build_model(mcfg, tokenizer).train()
        optimizer = build_optimizer(model, recipe.train)

        def step(batch) -> None:
            optimizer.zero_grad(set_to_none=True)
            model.clamp_temp()
            ids, mask = tokenize(tokenizer, batch["texts"], mcfg.max_text_len)
            images = transform.normalize(batch["images"])
            out = model(images, ids, mask, image_ids=batch["image_ids"], alpha=0.4)
            out["loss"].backward()
            optimizer.step()
            model.momentum_update()

        for round_ in range(args.rounds):
            for threads, workers in settings:
                torch.set_num_threads(threads)
                stream = TrainStream(
                    sources,
                    transform,
                    batch_size=data_cfg.batch_size,
                    seed=0,
                    epoch=round_,
                    shuffle_buffer=256,
                    max_words=data_cfg.max_words,
                )
                batches = iter(make_loader(stream, workers, seed=round_))
                step(next(batches))  # warm-up: worker start and first batch
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(next(batches))
                times[(threads, workers)].append(time.perf_counter() - start)
                del batches

    base = statistics.median(times[settings[0]])
    rows = []
    print(
        f"recipe {args.recipe}, batch {data_cfg.batch_size}, {available_cores()} cores; "
        f"auto (runtime.threads: 0) at data.num_workers={data_cfg.num_workers}: "
        f"{choose_threads(0, data_cfg.num_workers)} threads"
    )
    print(f"{'threads':>7} {'workers':>7} {'samples/s':>10} {'vs ' + str(settings[0]):>14}")
    for threads, workers in settings:
        median = statistics.median(times[(threads, workers)])
        rate = args.steps * data_cfg.batch_size / median
        rows.append(
            {"threads": threads, "workers": workers, "samples_per_s": round(rate, 2),
             "ratio": round(base / median, 3), "runs_s": [round(t, 3) for t in times[(threads, workers)]]}
        )  # fmt: skip
        print(f"{threads:>7} {workers:>7} {rate:>10.1f} {base / median:>13.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
