"""A 20000 × 20000 PNG (about 100 KB) in a shard costs ``capfilt caption`` no more memory than a
shard without it: the image is rejected from its header (``image_too_large``), never decoded."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import subprocess_env

from .conftest import good_members, huge_png, make_tar

MARGIN_KB = 200 * 1024


def max_rss_kb(args: list[str]) -> tuple[int, int]:
    """(exit status, peak resident set in KB) of ``python -m capfilt ARGS`` run on its own."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "capfilt", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
    )
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss


def test_huge_png_does_not_raise_caption_peak_memory(tiny_models, tmp_path):
    good = good_members(8)
    make_tar(tmp_path / "plain" / "00000000.tar", good)
    make_tar(
        tmp_path / "bomb" / "00000000.tar",
        [*good[:8], ("huge.png", huge_png()), ("huge.txt", b"black"), *good[8:]],
    )
    peaks = {}
    for name in ("plain", "bomb"):
        code, peaks[name] = max_rss_kb(
            ["caption", "tiny", "--model", str(tiny_models["captioner"]),
             "--shards", str(tmp_path / name), "--out", str(tmp_path / f"out_{name}")]
        )  # fmt: skip
        assert code == 0, name
    assert peaks["bomb"] - peaks["plain"] < MARGIN_KB, peaks
