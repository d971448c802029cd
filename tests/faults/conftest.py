"""Builders of bad input for the fault tests: tars made member by member, tiny model folders."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import subprocess_env


def jpeg(color=(200, 30, 30), size=40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar holding ``members`` (name, data) in that order, as ``tar cf`` would write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(n: int, prefix: str = "g") -> list[tuple[str, bytes]]:
    return [
        m
        for i in range(n)
        for m in (
            (f"{prefix}{i}.jpg", jpeg((20 * i % 255, 90, 40))),
            (f"{prefix}{i}.txt", b"a red square"),
        )
    ]


def huge_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of side × side black pixels, compressed row by row (about 100 KB):
    decoded in full it would take side² bytes, three times that as RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "capfilt", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight tiny captioner and filter folders (their outputs are not judged here)."""
    import torch

    from capfilt.config import load_recipe
    from capfilt.model import build_model, save_model_folder, train_wordpiece_tokenizer

    root = tmp_path_factory.mktemp("fault_models")
    cfg = load_recipe("tiny").model
    tok = train_wordpiece_tokenizer(
        ["a red square", "a blue circle", "two green shapes left of a big one"] * 20,
        cfg.vocab_size,
    )
    out = {}
    for seed, stage in enumerate(("captioner", "filter")):
        torch.manual_seed(seed)
        save_model_folder(root / stage, build_model(cfg, tok).eval(), tok, cfg, stage=stage)
        out[stage] = root / stage
    return out
