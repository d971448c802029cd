"""Shared by the shard stages that run a model (caption, filter, eval): loading, batching, identity."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

import torch

from capfilt.config import ConfigError
from capfilt.model import load_model_folder
from capfilt.train.run_folder import resolve_model_dir

T = TypeVar("T")


def load_stage_model(path: str | Path, device: torch.device):
    """(model, tokenizer, model_cfg, meta, folder) from a model folder, a run folder, or a
    transformers BLIP captioner/filter (folder, or hub id when online; converted on the fly)."""
    from capfilt.model.hf_blip import (
        import_transformers,
        is_transformers_blip_folder,
        looks_like_hub_id,
    )

    if is_transformers_blip_folder(path) or looks_like_hub_id(str(path)):
        try:
            model, tokenizer, cfg, meta, folder = import_transformers(path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return model.to(device).eval(), tokenizer, cfg, meta, folder
    folder = resolve_model_dir(path)
    model, tokenizer, cfg, meta = load_model_folder(folder, device=device)
    model.eval()
    return model, tokenizer, cfg, meta, folder


def model_fingerprint(folder: Path) -> str:
    """Short identity of a model folder (weights + config), recorded with what it produced."""
    digest = hashlib.sha256()
    for name in ("model_config.json", "capfilt.json", "config.json"):
        path = folder / name
        if path.is_file():
            digest.update(path.read_bytes())
    weights = folder / "model.safetensors"
    if weights.is_file():
        with open(weights, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def inference_autocast(device: torch.device):
    """bf16 autocast on GPU, plain fp32 on CPU (CONVENTIONS: Scale)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def write_json(path: Path, obj) -> None:
    from capfilt.data.writer import atomic_write_json

    atomic_write_json(path, json.loads(json.dumps(obj, default=float)))
