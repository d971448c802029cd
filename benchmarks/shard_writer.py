"""capfilt's shard writer against webdataset's ``TarWriter``, writing the same samples.

    python benchmarks/shard_writer.py                       # 2,000 samples of 150 kB, 3 rounds
    python benchmarks/shard_writer.py --samples 5000 --image-kb 60

The caption and filter stages write every sample of their output shards in the main process; on
a GPU that process's CPU time per image is the stage's ceiling (``stage_host_cost.py``). Each
sample here is what a stage writes: an image's bytes (random, ``--image-kb``; a JPEG is not
re-encoded either way), a JSON record and a caption. Both sides write the same samples to a tar
in a temporary folder (the page cache: no disk in the timing), timed by process CPU time around
the writes, alternating, best of ``--rounds``; closing the tar (and capfilt's fsync, parquet and
done-marker) is outside the timing. The two tars hold the same members with
the same contents (checked); capfilt's headers differ only in fixed owner, mode and mtime.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import webdataset as wds

from capfilt.data.writer import ShardWriter, tar_path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--image-kb", type=int, default=150, help="size of each sample's image bytes")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per side (alternating)")
    return p.parse_args()


def make_samples(n: int, image_kb: int) -> list[dict]:
    image = os.urandom(image_kb * 1024)
    return [
        {
            "__key__": f"{i:09d}-0",
            "jpg": image,
            "json": {
                "uid": f"{i:09d}",
                "captions": [{"text": "a dog on a red sofa", "origin": "web"}],
            },
            "txt": "a dog on a red sofa",
        }
        for i in range(n)
    ]


def write_capfilt(samples: list[dict], folder: Path) -> float:
    with ShardWriter(folder, 0, stage="bench", config_hash="-") as writer:
        start = time.process_time()
        for sample in samples:
            writer.write(sample)
        seconds = time.process_time() - start
        writer.commit()  # untimed: the tar's end, fsync, parquet, done-marker
    return seconds


def write_webdataset(samples: list[dict], folder: Path) -> float:
    with wds.TarWriter(str(folder / "webdataset.tar")) as writer:
        start = time.process_time()
        for sample in samples:
            writer.write(sample)
        return time.process_time() - start


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def main() -> None:
    args = parse_args()
    samples = make_samples(args.samples, args.image_kb)
    best = {"capfilt ShardWriter": float("inf"), "webdataset TarWriter": float("inf")}
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-writer-") as tmp:
        folder = Path(tmp)
        for _ in range(args.rounds):
            for side, write in (
                ("capfilt ShardWriter", write_capfilt),
                ("webdataset TarWriter", write_webdataset),
            ):
                best[side] = min(best[side], write(samples, folder))
        ours, theirs = members(tar_path(folder, 0)), members(folder / "webdataset.tar")
        # webdataset writes JSON without sorted keys: compare the parsed records
        same = ours.keys() == theirs.keys() and all(
            ours[k] == theirs[k]
            or (k.endswith(".json") and json.loads(ours[k]) == json.loads(theirs[k]))
            for k in ours
        )
    n = args.samples
    print(
        f"{n} samples (image {args.image_kb} kB + json + txt), process CPU time, best of {args.rounds}:"
    )
    for side, seconds in best.items():
        print(f"  {side:22s} {1e6 * seconds / n:7.1f} us/sample ({n / seconds:8.0f} samples/s)")
    ratio = best["webdataset TarWriter"] / best["capfilt ShardWriter"]
    print(f"  ratio {ratio:.2f}x less CPU per sample; same members and contents: {same}")


if __name__ == "__main__":
    main()
