"""BLIP's original ``.pth`` checkpoints: their tensors, the ModelConfig read off them, and a MED
filled from them (names already capfilt's, see ``keymaps.blip_state_dict_to_med``)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from capfilt.config.schema import ModelConfig
from capfilt.model.convert.config_map import TEXT_LEN
from capfilt.model.convert.fill import fill_imported, new_med
from capfilt.model.convert.keymaps import KINDS, blip_state_dict_to_med
from capfilt.model.med import MED
from capfilt.model.pretrained import torch_load_weights
from capfilt.model.vision import VIT_LAYER_NORM_EPS


def _count(prefix: str, keys, pattern: str) -> int:
    rx = re.compile(re.escape(prefix) + pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def model_config_from_blip_state_dict(
    sd: dict[str, torch.Tensor], kind: str, overrides: dict[str, Any] | None = None
) -> ModelConfig:
    """Dimensions read off the tensors; head counts are width / 64 (BLIP's ViT-B/L and BERT-base)
    unless ``overrides`` says otherwise (any ModelConfig field)."""
    keys = list(sd)
    try:
        vision_width = sd["visual_encoder.cls_token"].shape[-1]
        patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd["visual_encoder.pos_embed"].shape[1] - 1)
        side = (
            "text_encoder."
            if "text_encoder.embeddings.word_embeddings.weight" in sd
            else "text_decoder.bert."
        )
        words = sd[side + "embeddings.word_embeddings.weight"]
        intermediate = sd[side + "encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"not a BLIP state dict: no {exc}") from None
    text_width = words.shape[1]
    embed_dim = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    fields: dict[str, Any] = dict(
        image_size=grid * patch,
        patch_size=patch,
        vision_width=vision_width,
        vision_depth=_count("visual_encoder.", keys, r"blocks\.(\d+)\."),
        vision_heads=max(1, vision_width // 64),
        text_width=text_width,
        text_layers=_count(side, keys, r"encoder\.layer\.(\d+)\."),
        text_heads=max(1, text_width // 64),
        text_intermediate=intermediate,
        vocab_size=words.shape[0],
        max_text_len=TEXT_LEN[kind],
        embed_dim=embed_dim,
    )
    if "image_queue" in sd:
        fields["queue_size"] = sd["image_queue"].shape[1]
    if "temp" in sd:
        fields["temp"] = float(sd["temp"])
    for key, value in (overrides or {}).items():
        if key not in ModelConfig.__dataclass_fields__:
            raise ValueError(f"model config: unknown field '{key}'")
        fields[key] = value
    cfg = replace(ModelConfig(), **fields)
    cfg.validate()
    return cfg


def kind_of_blip_state_dict(sd: dict[str, torch.Tensor], kind: str | None) -> str:
    has_dec = any(k.startswith("text_decoder.") for k in sd)
    has_enc = any(k.startswith("text_encoder.") for k in sd)
    auto = (
        "pretrain"
        if has_dec and has_enc
        else "captioner"
        if has_dec
        else "filter"
        if has_enc
        else None
    )
    if auto is None:
        raise ValueError("not a BLIP state dict: no text_encoder.* or text_decoder.* weights")
    if kind is None:
        return auto
    if kind not in (*KINDS, "pretrain"):
        raise ValueError(f"kind: choose captioner, filter or pretrain, got '{kind}'")
    if (
        (kind == "captioner" and not has_dec)
        or (kind == "filter" and not has_enc)
        or (kind == "pretrain" and auto != "pretrain")
    ):
        raise ValueError(
            f"the state dict holds a {auto} (text_encoder: {has_enc}, text_decoder: {has_dec}), not a {kind}"
        )
    return kind


def import_blip_state_dict(
    sd: dict[str, torch.Tensor],
    tokenizer,
    kind: str | None = None,
    model_config: dict[str, Any] | ModelConfig | None = None,
    momentum: bool = True,
    source: str = "",
) -> tuple[MED, ModelConfig, dict[str, Any]]:
    """MED from a state dict in BLIP's original layout (``visual_encoder.*``, ``text_encoder.*``,
    ``text_decoder.*``, optionally ``*_m`` and queues). ``model_config``: a ModelConfig, or
    ModelConfig fields overriding those read off the tensors (head counts, chiefly)."""
    kind = kind_of_blip_state_dict(sd, kind)
    if isinstance(model_config, ModelConfig):
        cfg = model_config
    else:
        cfg = model_config_from_blip_state_dict(sd, kind, model_config)
    values = blip_state_dict_to_med(sd, kind, momentum)
    model = new_med(
        cfg,
        tokenizer,
        values[next(k for k in values if k.endswith("word_embeddings.weight"))].shape[0],
    )
    imported = {
        "format": "blip-pth",
        "source": source,
        "self_attention_filled_from": {"captioner": "decoder", "filter": "encoder"}.get(kind),
    }
    meta, report = fill_imported(model, values, kind, cfg, tokenizer, VIT_LAYER_NORM_EPS, imported)
    meta["extra"]["imported"]["momentum"] = report["momentum"][0]
    return model, cfg, meta


def load_blip_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an original BLIP checkpoint (``torch.load(weights_only=True)``; ``{"model": ...}`` unwrapped)."""
    sd = torch_load_weights(path)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
