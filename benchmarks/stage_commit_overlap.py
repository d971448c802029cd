"""A stage's wall time with each shard published while the next is produced, against in line.

    python benchmarks/stage_commit_overlap.py                      # coco-mini's photos x10
    python benchmarks/stage_commit_overlap.py --device-ms 3 --shard-size 1000 --copies 10

Publishing a shard (``ShardWriter.commit``) mostly waits on the disk: the fsyncs of its tar,
parquet and done-marker. In line, a stage's device idles that long once per shard; since
``capfilt.data.stage.ShardPublisher`` the commit runs on a thread while the next shard is
produced.

This runs ``run_shard_stage``, the loop every stage runs, as a GPU stage whose loader keeps up
(as a GPU machine's many loader processes do): each shard's samples are coco-mini's photos
(``--coco``, default ../shared/data/coco-mini; each copied ``--copies`` times, in shards of
``--shard-size``), written through as the caption and filter stages write them (image bytes,
caption json, one parquet row each), in batches of ``--batch`` for which the host waits
``--device-ms`` per image, as for a GPU's model (1 ms: the filter's target of 1,000 images/s).
Then the same photos go through ``capfilt data import`` (``import_records``), whose own work
(reading and checking each photo) takes the place of the device's. Both ways alternate,
``--repeats`` times; the output shards are the same bytes either way.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from stage_host_cost import add_photo_args, coco_photos, copied  # same folder: run as a script

import capfilt.data.stage as stage_mod
from capfilt.data.importers import import_records
from capfilt.data.sample import build_sample, caption_entry, make_key
from capfilt.data.writer import ShardWriter


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_photo_args(p)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device-ms", type=float, default=1.0, help="the host's wait per image")
    p.add_argument("--repeats", type=int, default=3, help="runs per way (alternating)")
    p.add_argument("--tmp", default=None, help="where the shards go (default: $TMPDIR)")
    return p.parse_args()


WAYS = {"in line": False, "background (shipped)": True}


def main() -> None:
    args = parse_args()
    records = copied(coco_photos(Path(args.coco)), args.copies)
    photos = [(r.load(), r.captions[0]) for r in records]
    n_shards = -(-len(photos) // args.shard_size)

    def produce(index: int, writer: ShardWriter) -> None:
        mine = photos[index * args.shard_size : (index + 1) * args.shard_size]
        for start in range(0, len(mine), args.batch):
            batch = mine[start : start + args.batch]
            time.sleep(len(batch) * args.device_ms / 1000)  # the model's time on the device
            for i, (jpeg, text) in enumerate(batch, start):
                key = make_key("bench", index, i)
                writer.write(build_sample(key, jpeg, [caption_entry(text, "web")]))
                writer.record({"uid": key, "status": "kept", "reason": ""})

    commits: list[float] = []
    shipped_commit = ShardWriter.commit

    def timed_commit(self, extra=None):
        start = time.perf_counter()
        try:
            return shipped_commit(self, extra)
        finally:
            commits.append(time.perf_counter() - start)

    ShardWriter.commit = timed_commit
    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-commit-", dir=args.tmp))
    try:  # the outputs take GBs: gone whatever happens
        stage = race(
            lambda out: stage_mod.run_shard_stage(
                out, n_shards, produce, stage="bench", config_hash="b"
            ),
            root / "stage",
            args.repeats,
        )
        waits = 1000 * sum(commits) / len(commits)
        imported = race(
            lambda out: import_records(
                records, out, source="bench", origin="web", shard_size=args.shard_size
            ),
            root / "import",
            args.repeats,
        )
    finally:
        stage_mod.COMMIT_IN_BACKGROUND = True
        ShardWriter.commit = shipped_commit
        shutil.rmtree(root, ignore_errors=True)
    n = len(photos)
    print(
        f"{n} photos (coco-mini x{args.copies}, {sum(len(j) for j, _ in photos) / n / 1e3:.0f} kB "
        f"each) in {n_shards} shards of {args.shard_size}; a commit took {waits:.0f} ms on "
        f"average; wall time, best of {args.repeats}:"
    )
    report(
        f"the stage loop, batches of {args.batch}, the host waiting {args.device_ms:g} ms per "
        "image for the device:",
        stage,
        n,
    )
    report("`capfilt data import` of the same photos (its own work, no device):", imported, n)


def race(run, out: Path, repeats: int) -> tuple[dict[str, float], bool]:
    """Best wall time of ``run(folder)`` per way (alternating), and whether the tars are the same."""
    best: dict[str, float] = {}
    tars: dict[str, dict[str, bytes]] = {}
    for repeat in range(repeats):
        for way, background in WAYS.items():
            stage_mod.COMMIT_IN_BACKGROUND = background
            folder = out / f"{repeat}-{background}"  # a fresh folder: nothing to resume
            start = time.perf_counter()
            run(folder)
            best[way] = min(best.get(way, float("inf")), time.perf_counter() - start)
            tars[way] = {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}
            shutil.rmtree(folder)
    return best, tars["in line"] == tars["background (shipped)"] and bool(tars["in line"])


def report(title: str, result: tuple[dict[str, float], bool], n: int) -> None:
    best, same = result
    print(f"  {title}")
    for way, seconds in best.items():
        print(f"    publishing {way:22s} {seconds:6.2f} s  ({n / seconds:6.0f} images/s)")
    print(
        f"    in the background: {best['in line'] / best['background (shipped)']:.2f}x the "
        f"in-line rate; output tars {'identical' if same else 'DIFFER'}"
    )


if __name__ == "__main__":
    main()
