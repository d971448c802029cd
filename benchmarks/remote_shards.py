"""Remote shards read by several loader workers: one shared local copy per shard vs one stream per worker.

    python benchmarks/remote_shards.py                       # 4 shards of 5 MB, 2 workers, 20 MB/s
    python benchmarks/remote_shards.py --workers 4 --rate 50 --shards 8

The inference stages' loader workers split a shard by sample position, so every worker walks the
whole tar. A remote shard (``pipe:``, http, ``hf://``) cannot seek: before
``capfilt/data/shard_copies.py`` each worker streamed all of it, W times the bytes; now the first
worker that needs it fetches it once into a local copy the others read. Here the shards are served
through ``pipe:`` commands that copy a local tar at ``--rate`` MB/s, the rate shared by all the
streams open at once (a file lock around each chunk, as one network link would be), and the
inference loader (:class:`capfilt.data.loader.ShardImages`, the caption/filter/eval path) reads
every batch of every shard. Each way runs ``--repeats`` times, alternating; printed: the fastest
wall time, and the bytes fetched over the shards' own size. The baseline ("a stream per worker")
is the same loader with the local copies switched off in this process.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import capfilt.data.loader as loader_mod
from capfilt.data.loader import ShardImages
from capfilt.data.reader import SkipCounter
from capfilt.data.transforms import EvalTransform

SLOW_CAT = """
import fcntl, sys, time
path, lock, log, rate = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
chunk, sent = 1 << 16, 0
with open(path, "rb") as src, open(lock, "a") as held:
    while data := src.read(chunk):
        fcntl.flock(held, fcntl.LOCK_EX)  # one link: the open streams share the rate
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        time.sleep(len(data) / rate)
        fcntl.flock(held, fcntl.LOCK_UN)
        sent += len(data)
with open(log, "a") as out:
    out.write(f"{sent}\\n")
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--images", type=int, default=100, help="images per shard")
    p.add_argument("--side", type=int, default=256, help="image side in pixels (noise JPEGs)")
    p.add_argument("--rate", type=float, default=20.0, help="MB/s shared by the open streams")
    p.add_argument("--workers", type=int, default=2, help="loader workers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args()


def write_shards(root: Path, n_shards: int, n_images: int, side: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for s in range(n_shards):
        path = root / f"{s:08d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(n_images):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                jpg = io.BytesIO()
                Image.fromarray(pixels).save(jpg, format="JPEG", quality=90)
                for ext, data in (("jpg", jpg.getvalue()), ("txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def read_all(urls: list[str], workers: int, batch: int) -> int:
    images = 0
    with ShardImages(urls, EvalTransform(224), batch, workers) as stream:
        for index in range(len(urls)):
            for samples, _ in stream.batches(index, SkipCounter("bench")):
                images += len(samples)
    return images


def main() -> None:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="capfilt-bench-remote-"))
    try:
        measure(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(root: Path, args: argparse.Namespace) -> None:
    shards = write_shards(root, args.shards, args.images, args.side)
    total = sum(p.stat().st_size for p in shards)
    script, lock, log = root / "slow_cat.py", root / "link.lock", root / "sent.log"
    script.write_text(SLOW_CAT)
    rate = args.rate * 1e6
    urls = [f"pipe:{sys.executable} {script} {p} {lock} {log} {rate}" for p in shards]
    print(
        f"{args.shards} shards x {args.images} images ({total / 1e6:.1f} MB), served at "
        f"{args.rate:g} MB/s shared; {args.workers} loader workers, batch {args.batch}"
    )
    remote = loader_mod.REMOTE_PREFIXES
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.repeats):
        for label, prefixes in (("a stream per worker", ()), ("one shared copy", remote)):
            loader_mod.REMOTE_PREFIXES = prefixes  # () = no copies: the loader before them
            log.unlink(missing_ok=True)
            start = time.perf_counter()
            n = read_all(urls, args.workers, args.batch)
            seconds = time.perf_counter() - start
            sent = sum(int(x) for x in log.read_text().split())
            assert n == args.shards * args.images, n
            if label not in best or seconds < best[label][0]:
                best[label] = (seconds, sent)
    loader_mod.REMOTE_PREFIXES = remote
    for label, (seconds, sent) in best.items():
        print(
            f"{label:20s} {seconds:6.2f} s  {n / seconds:7.1f} images/s  "
            f"fetched {sent / total:.2f}x the shards' bytes"
        )
    ratio = best["a stream per worker"][0] / best["one shared copy"][0]
    print(f"one shared copy: {ratio:.2f}x faster than a stream per worker")


if __name__ == "__main__":
    main()
