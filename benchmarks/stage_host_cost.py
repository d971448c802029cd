"""The caption and filter stages' own cost on the host per image, the model's work taken out.

    python benchmarks/stage_host_cost.py                          # coco-mini's photos x10, 2 workers
    python benchmarks/stage_host_cost.py --workers 4 --copies 20 --image-size 384

On a GPU a stage can go no faster than its main process hands batches over and writes what comes
back: receiving the loader workers' decoded images, forming batches, writing the output shards
and parquet. Here the model calls of both stages are replaced by instant stubs (the captioner
returns a fixed caption, the filter fixed scores), the batch normalisation, which a GPU does on
the device, by a no-op, and the pinned memory a GPU's batches are joined in (blocks that torch
caches and reuses) by one reused buffer (``--fresh-buffers``: fresh memory per batch, as on a
CPU, whose first-touch page faults cost ~0.25 ms per 384 px image here). What the main process
then spends in CPU time per image is the host's share, and 1000 / (ms per image) the images/s
no GPU can raise a stage above on this host.

Two ways, alternating: the loader as shipped (each worker hands over a chunk of ``ceil(batch /
workers)`` images as one tensor) and its baseline, one image per handover (``chunk_size`` 1:
the loader before chunks, one shared-memory tensor and one pickled sample per image).
Photos: ``--coco`` (default ../shared/data/coco-mini, the repository's sibling ``shared``
folder), each copied ``--copies`` times, in shards of ``--shard-size``; a random-weight tiny
model at ``--image-size`` sets the workers' resize (its weights are never used).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

import capfilt.data.loader as loader_mod
import capfilt.pipeline.caption as caption_mod
import capfilt.pipeline.filter as filter_mod
from capfilt.config import load_recipe
from capfilt.data.importers import ImportRecord, coco_records, import_records
from capfilt.data.transforms import EvalTransform, preprocess_spec
from capfilt.model import build_model, save_model_folder, train_wordpiece_tokenizer


def add_photo_args(p: argparse.ArgumentParser) -> None:
    """``--coco``, ``--copies``, ``--shard-size``: :func:`coco_photos`, :func:`copied`, in shards."""
    here = Path(__file__).resolve().parents[1]
    p.add_argument("--coco", default=str(here.parent / "shared" / "data" / "coco-mini"))
    p.add_argument("--copies", type=int, default=10, help="copies of each photo")
    p.add_argument("--shard-size", type=int, default=400)


def coco_photos(coco: Path) -> list[ImportRecord]:
    """coco-mini's photos as ``capfilt data import coco`` reads them."""
    records = []
    for split in ("train2017", "val2017"):
        found = coco_records(coco / "annotations" / f"captions_{split}.json", coco / split)
        records += [r for r in found if r.path is not None and Path(r.path).is_file()]
    if not records:
        raise SystemExit(f"no photos in {coco}")
    return records


def copied(records: list[ImportRecord], copies: int) -> list[ImportRecord]:
    """Each record ``copies`` times, under distinct uids."""
    return [dataclasses.replace(r, uid=f"{r.uid}-{c}") for c in range(copies) for r in records]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_args(p)
    p.add_argument("--workers", type=int, default=2, help="loader workers of the stages")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=384, help="the model's input side")
    p.add_argument("--repeats", type=int, default=2, help="runs per way and stage (alternating)")
    p.add_argument(
        "--fresh-buffers",
        action="store_true",
        help="join each batch's chunks into fresh memory, as on a CPU (default: a reused buffer, "
        "as a GPU's cached pinned blocks)",
    )
    return p.parse_args()


def make_inputs(root: Path, args: argparse.Namespace) -> tuple[Path, Path, int]:
    records = coco_photos(Path(args.coco))
    copies = copied(records, args.copies)
    import_records(
        copies, root / "photos", source="bench", origin="web", shard_size=args.shard_size
    )
    cfg = load_recipe("tiny", [f"model.image_size={args.image_size}", "model.patch_size=32"]).model
    tok = train_wordpiece_tokenizer([c for r in records for c in r.captions], 300)
    save_model_folder(
        root / "model",
        build_model(cfg, tok),
        tok,
        cfg,
        "pretrain",
        preprocess=preprocess_spec(cfg.image_size),
    )
    return root / "photos", root / "model", len(copies)


def instant_captions(model, tokenizer, images, settings, num_captions=1, seeds=None):
    return [["a photo of something"] * num_captions for _ in range(images.shape[0])]


def instant_scores(model, tokenizer, images, image_index, texts, max_len, **kw):
    n, with_cosine = len(texts), kw.get("with_cosine", True)
    scores = torch.tensor([[0.7] * n, [0.3] * n]) if with_cosine else torch.full((1, n), 0.7)
    return filter_mod.PendingScores(scores, with_cosine)


def run_stage(stage: str, model: Path, shards: Path, out: Path, args) -> float:
    """Main-process CPU seconds of one stage run."""
    recipe = load_recipe("blip-base", [])
    start = time.process_time()
    if stage == "caption":
        cfg = dataclasses.replace(recipe.caption, num_workers=args.workers, batch_size=args.batch)
        result = caption_mod.caption_shards(model, [str(shards)], out, cfg)
    else:
        cfg = dataclasses.replace(recipe.filter, num_workers=args.workers, batch_size=args.batch)
        result = filter_mod.filter_shards(model, [str(shards)], out, cfg)
    seconds = time.process_time() - start
    if result.failed:
        raise SystemExit(f"{stage} failed: {result.failed}")
    return seconds


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    caption_mod.generate_captions = instant_captions
    filter_mod.score_pairs = instant_scores
    EvalTransform.normalize = lambda self, pixels: pixels  # a GPU normalises on the device
    buffers: dict[tuple, torch.Tensor] = {}

    def reused_join_buffer(shape, dtype, pin):
        # as a GPU's pinned blocks, which torch's host allocator caches: no fresh pages to fault
        # in per batch (the stubs above never keep a batch past their call)
        if (shape, dtype) not in buffers:
            buffers[shape, dtype] = torch.empty(shape, dtype=dtype)
        return buffers[shape, dtype]

    shipped_join_buffer = loader_mod.ShardImages._join_buffer
    if not args.fresh_buffers:
        loader_mod.ShardImages._join_buffer = staticmethod(reused_join_buffer)
    shipped_init = loader_mod.ShardImages.__init__

    def one_per_handover(self, *a, **kw):
        shipped_init(self, *a, **kw)
        self.chunk_size = 1

    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-host-"))
    try:  # the shards and stage outputs take GBs: gone whatever happens
        measure(root, args, shipped_init, one_per_handover)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        loader_mod.ShardImages.__init__ = shipped_init
        loader_mod.ShardImages._join_buffer = staticmethod(shipped_join_buffer)


def measure(root: Path, args: argparse.Namespace, shipped_init, one_per_handover) -> None:
    photos, model, n = make_inputs(root, args)
    print(
        f"{n} images (coco-mini x{args.copies}), {args.workers} loader workers, batch "
        f"{args.batch}, resized to {args.image_size} px, joined into "
        f"{'fresh memory' if args.fresh_buffers else 'a reused buffer'}; main-process CPU per "
        "image, model stubbed:"
    )
    # untimed: the first stage run of a process imports and builds what the rest reuse
    # (transformers' lazy imports alone are ~1.5 s of CPU)
    first = sorted(photos.glob("*.tar"))[0]
    run_stage("caption", model, first, root / "warm-caption", args)
    run_stage("filter", model, root / "warm-caption", root / "warm-filter", args)
    ways = {"one image per handover": one_per_handover, "chunks (shipped)": shipped_init}
    best: dict[tuple[str, str], float] = {}
    runs = 0
    for _ in range(args.repeats):
        for stage in ("caption", "filter"):
            src = photos if stage == "caption" else root / "captioned_ref"
            if stage == "filter" and not src.exists():
                run_stage("caption", model, photos, src, args)
            for way, init in ways.items():
                loader_mod.ShardImages.__init__ = init
                runs += 1
                out = root / f"{stage}-{runs}"  # a fresh folder: nothing to resume
                seconds = run_stage(stage, model, src, out, args)
                key = (stage, way)
                best[key] = min(best.get(key, seconds), seconds)
    for stage in ("caption", "filter"):
        for way in ways:
            ms = 1000 * best[(stage, way)] / n
            print(f"{stage:8s} {way:24s} {ms:6.2f} ms/image  (at most {1000 / ms:6.0f} images/s)")
        ratio = best[(stage, "one image per handover")] / best[(stage, "chunks (shipped)")]
        print(f"{stage:8s} chunks: {ratio:.2f}x less main-process CPU per image")


if __name__ == "__main__":
    main()
