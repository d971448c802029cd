"""A shard stage under torchrun whose rank 1 is slow: sizes.json must still name every shard.

    torchrun --nproc_per_node 2 tests/scripts/stage_ranks.py OUT_DIR

Nothing here joins a process group before the stage (as an import or a re-threshold, which load
no model): the stage (its folder lock) must do it, or its closing barrier waits for no one and
rank 0 writes ``sizes.json`` while rank 1 is still writing its shards.
"""

from __future__ import annotations

import io
import sys
import time

from PIL import Image

from capfilt.data.sample import build_sample, caption_entry, make_key
from capfilt.data.stage import run_shard_stage
from capfilt.utils.dist import env_dist_info

SLOW_RANK_SECONDS = 2.0


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "JPEG")
    return buf.getvalue()


def produce(index, writer):
    if env_dist_info().rank == 1:
        time.sleep(SLOW_RANK_SECONDS)
    for i in range(index + 1):
        writer.write(build_sample(make_key("k", index, i), _jpeg(), [caption_entry("t", "human")]))


if __name__ == "__main__":
    result = run_shard_stage(sys.argv[1], 4, produce, stage="t", config_hash="h")
    if env_dist_info().rank == 0:
        print("samples", result.stats["count"])
