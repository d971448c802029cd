"""Exhaustive vs top-k ITM re-ranking in retrieval evaluation (docs/architecture.md §4): time and agreement.

    python benchmarks/retrieval_topk.py                      # 1000 test images x 5 captions, k = 16, demo size
    python benchmarks/retrieval_topk.py --n-images 100 --k 16 --model runs/pretrain

Synthesises ``--n-images`` test images of the built-in world (cached under ``--data``), builds a
random-weight model of the recipe's size (or loads ``--model``), computes the features once, then
runs the top-k and the exhaustive (k = N) re-rank in the same process and prints their times, the
ratio, and the metrics of both. Random weights cost exactly what trained ones do; only the metrics
are meaningless then. Exhaustive cost grows as N_img · N_txt, top-k as (N_img + N_txt) · k, so the
script also prints the exhaustive time extrapolated to 1000 images from the measured pair rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from capfilt.config import load_recipe
from capfilt.data.reader import read_samples
from capfilt.data.shards import expand_shards
from capfilt.data.synth import write_synth
from capfilt.eval.retrieval import compute_features, recall_at_k, retrieval_scores
from capfilt.model import build_model, train_wordpiece_tokenizer
from capfilt.runs.resolve import load_stage_model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=1000, help="test images (5 captions each)")
    p.add_argument(
        "--k", type=int, default=16, help="candidates re-ranked per query in the top-k run"
    )
    p.add_argument(
        "--recipe", default="demo", help="recipe giving the model size (and eval.batch_size)"
    )
    p.add_argument(
        "--model", default=None, help="model or run folder to load instead of a random-weight model"
    )
    p.add_argument(
        "--data",
        default="/tmp/capfilt-bench/retrieval",
        help="cache folder of the synthetic test shards",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="ITM pairs per forward pass (default: the recipe's eval.batch_size)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument("--skip-exhaustive", action="store_true", help="only the top-k run")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = args.batch_size or recipe.eval.batch_size

    data_dir = Path(args.data) / f"{recipe.name}-{args.n_images}"
    synth = dataclasses.replace(recipe.synth, n_human=0, n_web=0, n_test=args.n_images)
    start = time.perf_counter()
    write_synth(data_dir, synth)  # resumes: a second run reuses the shards
    samples = list(read_samples(expand_shards([str(data_dir / "test")])))
    print(f"data: {len(samples)} test images in {data_dir} ({time.perf_counter() - start:.1f} s)")

    if args.model:
        model, tokenizer, *_ = load_stage_model(args.model, device)
    else:
        tokenizer = train_wordpiece_tokenizer(
            [c["text"] for s in samples for c in s.captions], recipe.model.vocab_size
        )
        torch.manual_seed(0)
        model = build_model(recipe.model, tokenizer).to(device).eval()
    print(
        f"model: {args.model or 'random weights, recipe ' + recipe.name}; device {device}, {torch.get_num_threads()} threads"
    )

    start = time.perf_counter()
    feats = compute_features(model, tokenizer, samples, batch_size, recipe.data.max_words, device)
    t_feat = time.perf_counter() - start
    print(f"features: {feats.n_images} images, {feats.n_texts} texts in {t_feat:.1f} s")

    runs = [("top-k", args.k)] + (
        [] if args.skip_exhaustive else [("exhaustive", max(feats.n_images, feats.n_texts))]
    )
    results = {}
    for name, k in runs:
        start, cpu_start = time.perf_counter(), time.process_time()
        scores = retrieval_scores(model, feats, k, batch_size, device=device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        metrics = recall_at_k(scores.i2t, scores.t2i, feats.txt2img)
        results[name] = (seconds, scores.itm_pairs, cpu)
        rate = scores.itm_pairs / seconds if seconds > 0 else float("nan")
        print(
            f"{name:>10} (k = {k}): {seconds:8.1f} s wall, {cpu:8.1f} s CPU, {scores.itm_pairs} ITM pairs ({rate:.0f} pairs/s); "
            f"TR@1/5/10 {metrics['tr_r1']:.1f}/{metrics['tr_r5']:.1f}/{metrics['tr_r10']:.1f}, "
            f"IR@1/5/10 {metrics['ir_r1']:.1f}/{metrics['ir_r5']:.1f}/{metrics['ir_r10']:.1f}"
        )

    t_topk, pairs_topk, cpu_topk = results["top-k"]
    if "exhaustive" in results:
        t_full, pairs_full, cpu_full = results["exhaustive"]
        print(
            f"ratio exhaustive / top-k: {t_full / t_topk:.1f}x wall time, {cpu_full / cpu_topk:.1f}x CPU time "
            f"(CPU time is the steadier figure on a shared machine), {pairs_full / pairs_topk:.1f}x ITM pairs"
        )
        rate = pairs_full / t_full
    else:
        rate = pairs_topk / t_topk
    per_image = feats.n_texts / feats.n_images
    full_1000 = 1000 * 1000 * per_image  # exhaustive pairs at 1000 images, each pair scored once
    topk_1000 = 1000 * (1 + per_image) * args.k  # upper bound: no pair shared by the two directions
    print(
        f"extrapolated to 1000 images at {rate:.0f} pairs/s: exhaustive ~{full_1000 / rate:.0f} s, "
        f"top-k (k = {args.k}) <= ~{topk_1000 / rate:.0f} s"
    )


if __name__ == "__main__":
    main()
