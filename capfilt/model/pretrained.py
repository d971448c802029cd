"""Initialise the MED from public checkpoints: a timm ViT and a BERT (docs/architecture.md §1).

Files are read without unpickling code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

_WEIGHT_FILES = (
    SAFE_WEIGHTS_NAME,  # transformers' (and timm's hub) file names
    WEIGHTS_NAME,
    "open_clip_model.safetensors",
    "model.pth",
)


def torch_load_weights(path: str | Path):
    """``torch.load(weights_only=True)`` on CPU; a file that is not a torch checkpoint (or holds
    pickled code) raises ``ValueError`` naming it, whatever torch's unpickler raised."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # UnpicklingError, KeyError, RuntimeError, EOFError, ... by content
        reason = (str(err).splitlines() or [""])[0]
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason})"
        ) from err


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file (``weights_only``), unwrapping ``model``/``state_dict``."""
    path = Path(path)
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ValueError(f"no weights file ({', '.join(_WEIGHT_FILES)}) in {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    sd = torch_load_weights(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def init_vision(vit: nn.Module, spec: str) -> None:
    """Load a timm ViT checkpoint (file, folder, or timm model name when online) into ``vit``.

    The position embedding is resampled to the model's grid and the classifier head dropped
    (timm's own ``checkpoint_filter_fn`` does both and converts other ViT layouts).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    if Path(spec).exists():
        sd = load_state_dict_file(spec)
    else:
        import timm

        try:
            sd = timm.create_model(spec, pretrained=True, num_classes=0).state_dict()
        except Exception as exc:  # unknown name, or offline
            raise ValueError(
                f"model.vision_checkpoint: '{spec}' is neither a file nor a loadable timm model: {exc}"
            ) from exc
    sd = checkpoint_filter_fn(sd, vit)
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing:
        raise ValueError(
            f"model.vision_checkpoint '{spec}' lacks weights of the ViT: {missing[:8]}"
        )
    if unexpected:
        log.warning(
            "vision checkpoint: %d unused tensors (e.g. %s)", len(unexpected), unexpected[:4]
        )


def _bert_state_dict(spec: str) -> dict[str, torch.Tensor]:
    path = Path(spec)
    if not path.exists():
        try:
            from huggingface_hub import snapshot_download

            path = Path(
                snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt"])
            )
        except Exception as exc:
            raise ValueError(
                f"model.text_checkpoint: '{spec}' is not a folder and not reachable as a hub id: {exc}"
            ) from exc
    sd = load_state_dict_file(path)
    out = {}
    for k, v in sd.items():
        for prefix in ("bert.", "model.", "text_encoder."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        out[k] = v
    return out


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the first rows (vocabulary entries) of ``src`` into ``dst``; extra rows keep their init."""
    n = min(dst.shape[0], src.shape[0])
    dst[:n].copy_(src[:n])


@torch.no_grad()
def init_text(text_encoder: nn.Module, text_decoder: nn.Module, spec: str) -> None:
    """Initialise encoder and decoder from a BERT checkpoint folder, as BLIP did from bert-base-uncased.

    Embeddings, self-attention and FFN come from BERT; the decoder's own self-attention is a copy
    of BERT's too; cross-attention stays randomly initialised; the LM head transform and bias come
    from BERT's MLM head. Vocabulary rows beyond BERT's ([DEC], [ENC]) keep their init.
    """
    sd = _bert_state_dict(spec)
    enc_sd = {}
    for k, v in sd.items():
        if k.startswith("embeddings.token_type") or k.startswith("pooler.") or k.startswith("cls."):
            continue  # the MED has no token types and no pooler (as BLIP's med.py)
        if k in ("embeddings.word_embeddings.weight",):
            _copy_rows(text_encoder.embeddings.word_embeddings.weight, v)
            continue
        enc_sd[k] = v
    enc_sd = {k: v for k, v in enc_sd.items() if not k.endswith("position_ids")}
    try:
        missing, unexpected = text_encoder.load_state_dict(enc_sd, strict=False)
    except (
        RuntimeError
    ) as exc:  # shape mismatch: width/heads/intermediate differ from the checkpoint
        raise ValueError(
            f"model.text_checkpoint '{spec}' does not fit the text config: {exc}"
        ) from exc
    missing = [
        k
        for k in missing
        if ".crossattention." not in k and k != "embeddings.word_embeddings.weight"
    ]
    if missing:
        raise ValueError(
            f"model.text_checkpoint '{spec}' lacks weights of the text stack: {missing[:8]}"
        )
    if unexpected:
        log.warning("text checkpoint: %d unused tensors (e.g. %s)", len(unexpected), unexpected[:4])
    for i, layer in enumerate(text_decoder.bert.encoder.layer):
        prefix = f"encoder.layer.{i}.attention."
        layer.attention.load_state_dict(
            {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        )
    head = text_decoder.cls.predictions
    transform = {
        k[len("cls.predictions.transform.") :]: v
        for k, v in sd.items()
        if k.startswith("cls.predictions.transform.")
    }
    if transform:
        head.transform.load_state_dict(transform)
    if "cls.predictions.bias" in sd:
        _copy_rows(head.bias, sd["cls.predictions.bias"])
