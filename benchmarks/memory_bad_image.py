"""Peak memory of ``capfilt caption`` and ``capfilt filter`` on a shard holding one 20000 × 20000
PNG (a ~100 KB file that declares 400 M pixels) against the same shard without it.

    python benchmarks/memory_bad_image.py [--samples 16]

Baseline: the same command on the shard without the PNG, measured in the same run; each command
runs in its own process and its peak resident set is read from ``os.wait4``. The acceptance bound
is a difference under 200 MB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults.conftest import good_members, huge_png, make_tar  # noqa: E402
from tests.faults.test_memory import max_rss_kb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    import torch

    from capfilt.config import load_recipe
    from capfilt.model import build_model, save_model_folder, train_wordpiece_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = load_recipe("tiny").model
        tok = train_wordpiece_tokenizer(["a red square", "a blue circle"] * 20, cfg.vocab_size)
        for stage in ("captioner", "filter"):
            torch.manual_seed(0)
            save_model_folder(root / stage, build_model(cfg, tok).eval(), tok, cfg, stage=stage)
        good = good_members(args.samples)
        half = len(good) // 2 // 2 * 2
        make_tar(root / "plain" / "00000000.tar", good)
        make_tar(
            root / "bomb" / "00000000.tar",
            [*good[:half], ("huge.png", huge_png()), ("huge.txt", b"black"), *good[half:]],
        )
        print(f"{'stage':8} {'without (MB)':>13} {'with PNG (MB)':>14} {'difference (MB)':>16}")
        for stage, model in (("caption", "captioner"), ("filter", "filter")):
            peaks = {}
            for name in ("plain", "bomb"):
                code, peaks[name] = max_rss_kb(
                    [stage, "tiny", "--model", str(root / model), "--shards", str(root / name),
                     "--out", str(root / f"{stage}_{name}")]
                )  # fmt: skip
                if code != 0:
                    sys.exit(f"{stage} on {name} exited {code}")
            diff = (peaks["bomb"] - peaks["plain"]) / 1024
            print(
                f"{stage:8} {peaks['plain'] / 1024:13.0f} {peaks['bomb'] / 1024:14.0f} {diff:16.0f}"
            )


if __name__ == "__main__":
    main()
