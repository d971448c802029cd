"""Shared fixtures: paths to the real data in ../shared/data and small helpers."""

from __future__ import annotations

import json
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


def pytest_configure(config):
    # Tiny models gain nothing from a second thread, and OpenMP spin-waiting makes a busy 2-core
    # machine (or a test's own subprocesses) very slow.
    import torch

    torch.set_num_threads(1)
