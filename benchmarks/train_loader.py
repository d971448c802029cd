"""The training loader's rate with its workers handing over uint8 crops, normalised as a batch
where the model is (what ``capfilt pretrain`` and ``finetune`` do), against float crops normalised
in the workers (the baseline: what they did before, and what torchvision's ``ToTensor`` +
``Normalize`` in a Dataset do).

    python benchmarks/train_loader.py                     # coco-mini's photos x4, 224 px, 2 workers
    python benchmarks/train_loader.py --workers 4 --image-size 384 --repeats 5

A GPU's pretraining takes its batches from this loader, so its rate is the most that the GPU's
step can reach (``data_wait`` in metrics.jsonl says when the loader held it back). Each way runs
the trainer's ``TrainStream`` (random crop, flip, caption choice) over coco-mini's photos
(``--coco``, each copied ``--copies`` times) through the trainer's ``make_loader`` with
``--workers`` processes, batch ``--batch``; the main process takes ``--batches`` batches after
two of warm-up, as with a GPU at hand: it copies each into a reused buffer, as the loader's
pinning thread copies it into pinned memory (four times the bytes for float crops), and leaves
normalising to the device. Printed per way, best of ``--repeats`` alternating runs: samples/s,
and the main process's CPU per sample. Both ways give the same model input to the bit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from stage_host_cost import add_photo_args, coco_photos, copied  # same folder: run as a script

from capfilt.data.importers import import_records
from capfilt.data.transforms import TrainTransform
from capfilt.train.data import TrainStream, build_sources, make_loader

WAYS = ("uint8 crops", "float crops")


class FloatCrops(TrainTransform):
    """The baseline: workers normalise each crop (float32), the main process takes it as is."""

    def pixels(self, image, rng):
        return super().normalize(super().pixels(image, rng))

    def normalize(self, pixels):
        return pixels


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_args(p)
    p.set_defaults(copies=4)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="timed batches per run")
    p.add_argument("--image-size", type=int, default=224, help="the model's input side")
    p.add_argument("--repeats", type=int, default=3, help="runs per way (alternating)")
    return p.parse_args()


def run(sources, transform: TrainTransform, args, epoch: int) -> tuple[float, float, torch.Tensor]:
    """(samples/s, main-process CPU ms per sample, the first timed batch's model input).

    The main process does what it does with a GPU at hand: it copies each batch into a reused
    buffer, as the loader's pinning thread copies it into pinned memory; normalising is the
    GPU's, done here only for the comparison, outside the timing."""
    stream = TrainStream(
        sources, transform, batch_size=args.batch, seed=0, epoch=epoch, shuffle_buffer=256
    )
    batches = iter(make_loader(stream, args.workers, seed=epoch))
    for _ in range(2):  # warm-up: the workers' start and first batches
        images = next(batches)["images"]
    pinned = torch.empty_like(images)
    wall, cpu = time.perf_counter(), time.process_time()
    first = None
    for _ in range(args.batches):
        pinned.copy_(next(batches)["images"])
        if first is None:
            first = pinned.clone()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del batches
    n = args.batches * args.batch
    return n / wall, 1000 * cpu / n, transform.normalize(first)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    records = copied(coco_photos(Path(args.coco)), args.copies)
    transforms = {
        WAYS[0]: TrainTransform(args.image_size),
        WAYS[1]: FloatCrops(args.image_size),
    }
    results: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        import_records(
            records, Path(tmp) / "photos", source="bench", origin="web", shard_size=args.shard_size
        )
        sources = build_sources([str(Path(tmp) / "photos")])
        for r in range(args.repeats):
            inputs = {}
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                rate, cpu_ms, inputs[way] = run(sources, transforms[way], args, epoch=r)
                results[way].append((rate, cpu_ms))
            if not torch.equal(*inputs.values()):
                raise SystemExit("the two ways gave different model inputs")
    print(
        f"training loader: {len(records)} photos (coco-mini x{args.copies}), {args.image_size} px, "
        f"{args.workers} workers, batch {args.batch}, {args.batches} timed batches; best of "
        f"{args.repeats} alternating runs; the same model input both ways"
    )
    best = {way: max(results[way]) for way in WAYS}
    for way in WAYS:
        rate = best[way][0]
        cpu_ms = min(c for _, c in results[way])
        print(f"  {way:<11}: {rate:7.1f} samples/s, main process {cpu_ms:.3f} ms CPU per sample")
    print(f"  uint8 crops: {best[WAYS[0]][0] / best[WAYS[1]][0]:.2f}x the samples/s")


if __name__ == "__main__":
    main()
