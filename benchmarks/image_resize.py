"""An inference stage's loader worker's cost per photo: decoding it and resizing it to the
model's input, with capfilt's resize (torch's uint8 bicubic kernel) against Pillow's (the
baseline: what capfilt ran before, and what torchvision's transforms on a PIL image run).

    python benchmarks/image_resize.py                    # coco-mini's photos, 224 and 384 px
    python benchmarks/image_resize.py --sizes 384 --repeats 5

Every inference stage's worker (caption, filter, eval) decodes a photo and resizes it to the
model's square input (``EvalTransform.pixels``). A GPU stage needs its rate divided by one
worker's rate in workers, so a worker's cost per photo decides how many of a node's cores a GPU
needs. Both ways run here in one process, on one thread, alternating, on the same photos
decoded once as the stages decode them (``decode_image``, timed apart). The script also prints
how far apart the two ways' pixels are. Then ``capfilt caption`` itself races both ways on the
photos copied ``--copies`` times, its loader in the main process (``num_workers`` 0: the way a
worker's cost shows in a stage's rate on this 2-core machine), with a random-weight tiny model
at ``--stage-size`` px that writes 5-token captions, best of ``--repeats`` alternating runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from stage_host_cost import add_photo_args, coco_photos, make_inputs  # same folder: run as a script
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

import capfilt.pipeline.caption as caption_mod
from capfilt.config import load_recipe
from capfilt.data.reader import decode_image
from capfilt.data.transforms import EvalTransform


def pillow_pixels(image, size: int) -> torch.Tensor:
    """The baseline eval resize: Pillow's bicubic on the PIL image, then to uint8 [3, S, S]."""
    return F.pil_to_tensor(F.resize(image, [size, size], InterpolationMode.BICUBIC))


def per_image_ms(fn: Callable, items: list) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return 1000 * (time.perf_counter() - started) / len(items)


def stage_race(args: argparse.Namespace) -> None:
    """The caption stage's wall time with Pillow's resize against capfilt's, alternating."""
    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-resize-"))
    shipped = EvalTransform.pixels
    try:
        photos, model, n = make_inputs(
            root, argparse.Namespace(**vars(args), image_size=args.stage_size)
        )
        cfg = dataclasses.replace(
            load_recipe("demo", []).caption, num_workers=0, max_length=5, min_length=1
        )
        ways = {"Pillow's resize": lambda self, im: pillow_pixels(im, self.image_size)}
        ways["capfilt's"] = shipped
        best = dict.fromkeys(ways, float("inf"))
        images = dict.fromkeys(ways, float("inf"))
        for run in range(args.repeats):
            for way, (name, pixels) in enumerate(ways.items()):
                EvalTransform.pixels = pixels
                started = time.perf_counter()
                out = root / f"out-{run}-{way}"  # a fresh folder: nothing to resume
                result = caption_mod.caption_shards(model, [str(photos)], out, cfg)
                best[name] = min(best[name], time.perf_counter() - started)
                waited = sum(
                    v for k, v in result.phase_seconds.items() if k in ("images", "loader start")
                )
                images[name] = min(images[name], waited)
    finally:
        EvalTransform.pixels = shipped
        shutil.rmtree(root, ignore_errors=True)
    (base, ours), (base_images, our_images) = best.values(), images.values()
    print(
        f"\ncapfilt caption, {n} photos at {args.stage_size} px, loader in the main process: "
        f"{n / base:.0f} vs {n / ours:.0f} images/s with Pillow's resize vs capfilt's: "
        f"{base / ours:.2f}x; the stage's waits for images {base_images:.2f} vs {our_images:.2f} s"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_args(p)  # --coco, --copies (of each photo, for the stage race), --shard-size
    p.set_defaults(copies=4)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per way (best kept)")
    p.add_argument("--stage-size", type=int, default=224, help="the stage race's model input side")
    p.add_argument("--no-stage", action="store_true", help="leave the stage race out")
    args = p.parse_args()
    torch.set_num_threads(1)  # a loader worker's: one thread
    data = [Path(record.path).read_bytes() for record in coco_photos(Path(args.coco))]
    print(
        f"{len(data)} photos ({sum(map(len, data)) / len(data) / 1e3:.0f} kB on average), 1 thread"
    )
    for size in args.sizes:
        images = [decode_image(d, size) for d in data]  # as a stage's worker decodes them
        decode = min(per_image_ms(lambda d, s=size: decode_image(d, s), data) for _ in range(2))
        shipped = EvalTransform(size)
        ways = (lambda im, s=size: pillow_pixels(im, s), shipped.pixels)  # baseline, capfilt's
        best = [float("inf"), float("inf")]
        for _ in range(args.repeats):
            for way, fn in enumerate(ways):
                best[way] = min(best[way], per_image_ms(fn, images))
        base, ours = best
        print(
            f"\n{size} px: decoding {decode:.2f} ms per photo; resizing: Pillow {base:.2f} ms, "
            f"capfilt {ours:.2f} ms: {base / ours:.2f}x faster\n  a worker's photo, decoded "
            f"and resized: {decode + base:.2f} vs {decode + ours:.2f} ms: "
            f"{(decode + base) / (decode + ours):.2f}x the photos/s "
            f"({1000 / (decode + base):.0f} vs {1000 / (decode + ours):.0f} per worker)"
        )
        diffs = [(shipped.pixels(im).int() - pillow_pixels(im, size).int()).abs() for im in images]
        n_values = sum(d.numel() for d in diffs)
        far = sum(int((d > 2).sum()) for d in diffs)
        print(
            f"  eval pixels vs Pillow's: mean difference "
            f"{sum(float(d.sum()) for d in diffs) / n_values:.4f} levels; {far} of {n_values:,} "
            f"values ({far / n_values:.1e}) more than 2 levels apart, at most "
            f"{max(int(d.max()) for d in diffs)}"
        )
    if not args.no_stage:
        stage_race(args)


if __name__ == "__main__":
    main()
