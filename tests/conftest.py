"""Shared fixtures: paths to the real data in ../shared/data and small helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
COCO_MINI = SHARED_DATA / "coco-mini"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    if not (COCO_MINI / "annotations" / "captions_val2017.json").is_file():
        pytest.skip(f"coco-mini not found at {COCO_MINI}")
    return COCO_MINI


def coco_captions(split_json: Path) -> dict[int, list[str]]:
    data = json.loads(split_json.read_text())
    out: dict[int, list[str]] = {}
    for ann in data["annotations"]:
        out.setdefault(ann["image_id"], []).append(ann["caption"])
    return out


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a test's subprocess: this one, one OpenMP thread, and this checkout
    first on ``PYTHONPATH``, ahead of (not instead of) what is already there, e.g. packages a GPU
    image brings in a side folder."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def pytest_configure(config):
    # Tiny models gain nothing from a second thread, and OpenMP spin-waiting makes a busy 2-core
    # machine (or a test's own subprocesses) very slow.
    import torch

    torch.set_num_threads(1)
    # and what a stage chooses under runtime.threads = 0 (auto), in this process and its children
    os.environ["OMP_NUM_THREADS"] = "1"


def tiny_model_config(**overrides):
    """The tiny MED config the model tests share: 32 px images in 8 px patches, width 32,
    2 layers and 2 heads on both sides, ITC size 16; ``overrides`` are ModelConfig fields."""
    from capfilt.config import ModelConfig

    fields = dict(
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_depth=2,
        vision_heads=2,
        text_width=32,
        text_layers=2,
        text_heads=2,
        text_intermediate=64,
        embed_dim=16,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def build_tiny_model(tokenizer, seed: int | None = 0, **overrides):
    """A MED of :func:`tiny_model_config` (``overrides`` applied) for ``tokenizer``, its random
    initialisation drawn after ``torch.manual_seed(seed)`` (None: from torch's current state)."""
    import torch

    from capfilt.model import build_model

    if seed is not None:
        torch.manual_seed(seed)
    return build_model(tiny_model_config(**overrides), tokenizer)
