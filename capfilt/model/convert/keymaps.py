"""Parameter names: transformers' ``BlipVisionModel`` -> timm ViT, transformers BLIP keys and
BLIP's original ``.pth`` keys -> MED keys (an export walks the transformers keys the same way),
and the text weight each side shares with the other."""

from __future__ import annotations

import re

import torch

from capfilt.model.med import is_training_state

KINDS = ("captioner", "filter")
"""What a transformers BLIP checkpoint holds: a captioner (LM) or a filter (ITC + ITM)."""
ARCHITECTURES = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}
"""The transformers class of each kind."""

# timm ViT name <-> transformers BlipVisionModel name; {i} = block index, {p} = weight | bias
VISION_KEYS = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
)

HEADS = ("vision_proj.", "text_proj.", "itm_head.")


def _pattern(template: str) -> re.Pattern:
    body = (
        re.escape(template)
        .replace(r"\{i\}", r"(?P<i>\d+)")
        .replace(r"\{p\}", r"(?P<p>weight|bias)")
    )
    return re.compile(body + r"\Z")


_HF_TO_TIMM = [(_pattern(h), t) for t, h in VISION_KEYS]


def _rename(name: str, rules) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def hf_to_timm_vision_key(name: str) -> str | None:
    """``encoder.layers.3.self_attn.projection.weight`` -> ``blocks.3.attn.proj.weight`` (None: no match)."""
    return _rename(name, _HF_TO_TIMM)


def hf_key_to_med(key: str, kind: str) -> str | None:
    """The MED parameter a transformers key of a ``kind`` checkpoint goes to (None: unknown)."""
    if key.startswith("vision_model."):
        name = hf_to_timm_vision_key(key[len("vision_model.") :])
        return None if name is None else "visual_encoder." + name
    if kind == "captioner" and key.startswith("text_decoder."):
        return key
    if kind == "filter" and key.startswith(("text_encoder.", *HEADS)):
        return key
    return None


def partner_key(key: str) -> str | None:
    """The same text weight on the other side (encoder <-> decoder)."""
    if key.startswith("text_encoder."):
        return "text_decoder.bert." + key[len("text_encoder.") :]
    if key.startswith("text_decoder.bert."):
        return "text_encoder." + key[len("text_decoder.bert.") :]
    return None


def blip_state_dict_to_med(
    sd: dict[str, torch.Tensor], kind: str, momentum: bool = True
) -> dict[str, torch.Tensor]:
    """BLIP's original names -> MED names, keeping what ``kind`` uses."""
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids") or key == "idx_queue" or ".pooler." in key:
            continue
        if key == "ptr_queue":
            key = "queue_ptr"
        if key.startswith("text_encoder_m.") and ".crossattention." in key:
            continue  # BLIP's momentum text encoder has unused cross-attention; capfilt's has none
        if is_training_state(key):
            if not momentum:
                continue
        elif kind == "captioner" and key.startswith(("text_encoder.", *HEADS)):
            continue
        elif kind == "filter" and key.startswith("text_decoder."):
            continue
        out[key] = value
    if "queue_ptr" in out:
        out["queue_ptr"] = out["queue_ptr"].reshape(1).long()
    return out
