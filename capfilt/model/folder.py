"""Self-describing model folder (docs/architecture.md, "Runs and model folders").

    WEIGHTS               weights; each shared (tied) tensor stored once, its other names in the metadata
    CONFIG                the ModelConfig fields
    tokenizer*.json ...   the tokenizer (``save_pretrained``)
    META                  {stage, format_version, preprocess, ...}; written last, so it marks a
                          complete folder

(file names: the constants below). Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from transformers import PreTrainedTokenizerBase

import capfilt
from capfilt.config import ModelConfig, from_dict, to_dict
from capfilt.model.build import build_unfilled
from capfilt.model.med import (
    MED,
    QUEUES,
    count_parameters,
    is_training_state,
    set_vision_layer_norm_eps,
)
from capfilt.model.tokenizer import load_tokenizer, special_ids
from capfilt.utils.files import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
"""Version of the folder layout; bumped on incompatible changes."""

WEIGHTS = "model.safetensors"
"""The weights file of a model folder (safetensors; also transformers' weights file name)."""
CONFIG = "model_config.json"
"""The ModelConfig of a model folder (JSON)."""
META = "capfilt.json"
"""A model folder's meta (JSON): stage, format version, preprocessing, ``extra``; written last."""

EXTRA_EPS = "vision_layer_norm_eps"
"""``extra`` key of the meta: the ViT LayerNorm eps of an imported checkpoint, re-applied on load."""


def unique_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each storage once (safetensors refuses shared tensors).

    Returns (tensors, aliases) where ``aliases`` maps a dropped name to the kept one; the kept
    name is the first in module order (the text encoder's, for the shared text weights).
    """
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict().items():
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t
    return tensors, aliases


def save_model_folder(
    path: str | Path,
    model: MED,
    tokenizer: PreTrainedTokenizerBase,
    cfg: ModelConfig,
    stage: str,
    extra: dict[str, Any] | None = None,
    include_momentum: bool = True,
    preprocess: dict[str, Any] | None = None,
) -> Path:
    """Write a model folder (see module doc). ``include_momentum=False`` leaves out the momentum
    encoders and queues (a smaller folder for inference; loading then re-copies the momentum
    weights from the online ones). ``extra`` lands in the meta under ``"extra"``;
    ``preprocess`` (:func:`capfilt.data.transforms.preprocess_spec`: the image size, mean and
    std the model was trained with) under ``"preprocess"``, where every inference site reads it
    (:func:`capfilt.data.transforms.eval_transform_for`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / META).unlink(missing_ok=True)  # the folder is incomplete until its meta is back

    tensors, aliases = unique_state_dict(model)
    if not include_momentum:
        tensors = {k: v for k, v in tensors.items() if not is_training_state(k)}
        aliases = {k: v for k, v in aliases.items() if not is_training_state(k)}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = safetensors_save(
        tensors, metadata={"format": "pt", "capfilt_aliases": json.dumps(aliases, sort_keys=True)}
    )
    atomic_write_bytes(path / WEIGHTS, blob)
    atomic_write_json(path / CONFIG, to_dict(cfg))

    with tempfile.TemporaryDirectory(dir=path, prefix=".tok") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), path / name)

    meta = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "capfilt_version": capfilt.__version__,
        "vocab_size": model.vocab_size,
        "special_ids": special_ids(tokenizer),
        "includes_momentum": include_momentum,
        "parameters": count_parameters(model),
        "extra": extra or {},
    }
    if preprocess is not None:
        meta["preprocess"] = dict(preprocess)
    atomic_write_json(path / META, meta)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta (:data:`META`) of a model folder, with a clear error when it is not one."""
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise ValueError(
            f"{path}: not a capfilt model folder (no {META}; incomplete or wrong path)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: model folder format {meta.get('format_version')} (this capfilt reads {FORMAT_VERSION})"
        )
    return meta


def apply_folder_settings(model: MED, meta: dict[str, Any]) -> None:
    """Settings a model folder keeps in its meta beyond ModelConfig (an imported checkpoint's ViT
    LayerNorm eps); called by :func:`load_model_folder`."""
    eps = (meta.get("extra") or {}).get(EXTRA_EPS)
    if eps is not None:
        set_vision_layer_norm_eps(model, float(eps))


def load_model_folder(
    path: str | Path, device: str | torch.device = "cpu", inference: bool = False
) -> tuple[MED, PreTrainedTokenizerBase, ModelConfig, dict[str, Any]]:
    """Load (model, tokenizer, cfg, meta) from a folder written by :func:`save_model_folder`.

    The model is rebuilt from the saved config (no checkpoint initialisation, no random one), its
    ties made by construction, and given the safetensors file's tensors
    (:func:`~capfilt.model.build.build_unfilled`); returned in eval mode on ``device``.
    ``inference``: for a model that will only infer, without its training state
    (:meth:`MED.drop_training_state`), which then never goes to the device.

    The file's tensors are read through a mapping of the file. On an accelerator they are copied
    from there to the device, and no second copy is made in host memory (a BLIP-base folder: 1.9
    GB less at the peak, in every rank of a node). On a CPU they are copied once into memory of
    the model's own, as the mapping would show a later rewrite of the file in place (a ``cp``
    over it) and end the process with SIGBUS on a truncated one.
    """
    path = Path(path)
    device = torch.device(device)
    meta = read_meta(path)
    cfg = from_dict(ModelConfig, json.loads((path / CONFIG).read_text()))
    tokenizer = load_tokenizer(str(path))
    with safe_open(str(path / WEIGHTS), framework="pt", device="cpu") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if inference:  # neither copied nor carried to the device
        tensors = {k: v for k, v in tensors.items() if not is_training_state(k)}
    if device.type == "cpu":
        tensors = {k: v.clone() for k, v in tensors.items()}
    try:
        model = build_unfilled(cfg, tokenizer, tensors)
    except ValueError as exc:
        raise ValueError(
            f"{path / WEIGHTS} does not match the model config / tokenizer: {exc}"
        ) from exc
    apply_folder_settings(model, meta)  # e.g. an imported BLIP checkpoint's ViT LayerNorm eps
    _, fresh_aliases = unique_state_dict(model)
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    missing = [k for k in sorted(expected - set(tensors)) if fresh_aliases.get(k) not in tensors]
    momentum_missing = [k for k in missing if is_training_state(k)]
    missing = [k for k in missing if not is_training_state(k)]
    if unexpected or missing:
        raise ValueError(
            f"{path / WEIGHTS} does not match the model config: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    if inference:
        model.drop_training_state()
    elif momentum_missing:  # an inference folder: momentum copies and queues as in a new model
        model.copy_params()
        if set(momentum_missing) & set(QUEUES):
            model.reset_queues()
    model.to(device)
    model.eval()
    return model, tokenizer, cfg, meta
