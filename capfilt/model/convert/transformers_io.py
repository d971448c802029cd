"""transformers' BLIP checkpoints <-> MED: load a local transformers BLIP folder (or fetch a hub
snapshot) as a MED, and write a MED as a transformers folder (weights, config, tokenizer,
``BlipProcessor``). Which path is such a folder is decided by ``capfilt.runs.resolve``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from capfilt.config.schema import ModelConfig
from capfilt.data.transforms import CLIP_MEAN, CLIP_STD, preprocess_spec
from capfilt.model.convert.config_map import (
    hf_config_from_model,
    kind_of_hf_config,
    model_config_from_hf,
)
from capfilt.model.convert.fill import INIT_SEED, fill_imported, new_med
from capfilt.model.convert.keymaps import ARCHITECTURES, KINDS, hf_key_to_med
from capfilt.model.med import MED
from capfilt.model.tokenizer import load_tokenizer, special_ids


# ---------------------------------------------------------------------------------- import
def med_from_hf_model(
    hf_model, tokenizer, kind: str | None = None, source: str = ""
) -> tuple[MED, ModelConfig, dict[str, Any]]:
    """MED from an in-memory transformers BLIP captioner or retrieval model.

    Returns (model in eval mode, ModelConfig, meta) where ``meta`` is laid out like a model
    folder's (``stage``, ``preprocess``, ``extra.imported``, ``extra.vision_layer_norm_eps``).
    """
    kind = kind_of_hf_config(hf_model.config, kind)
    cfg, eps, temp = model_config_from_hf(hf_model.config, kind)
    tc = hf_model.config.text_config
    ids = special_ids(tokenizer)
    expected = {"dec": tc.bos_token_id, "pad": tc.pad_token_id, "sep": tc.sep_token_id}
    wrong = {k: (ids[k], v) for k, v in expected.items() if v is not None and ids[k] != v}
    if wrong:
        raise ValueError(
            "tokenizer and checkpoint disagree on special ids (tokenizer, config): "
            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in wrong.items())
        )
    model = new_med(cfg, tokenizer, tc.vocab_size)
    values, unknown = {}, []
    for key, tensor in hf_model.state_dict().items():
        target = hf_key_to_med(key, kind)
        if target is None:
            unknown.append(key)
        else:
            values[target] = tensor
    if unknown:
        raise ValueError(f"transformers weights with no place in capfilt's MED: {unknown[:8]}")
    if temp is not None:  # a capfilt export's trained temperature, kept in its config
        values["temp"] = torch.tensor(temp)
    imported = {
        "format": "transformers",
        "architecture": ARCHITECTURES[kind],
        "source": source,
        "self_attention_filled_from": "decoder" if kind == "captioner" else "encoder",
    }
    meta, _ = fill_imported(model, values, kind, cfg, tokenizer, eps, imported)
    return model, cfg, meta


def fetch_hub_checkpoint(repo_id: str) -> Path:
    """Local snapshot of a hub checkpoint (config, tokenizer, processor, safetensors weights)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.bin"]))
    except Exception as exc:  # offline, unknown id, gated
        raise ValueError(f"'{repo_id}': no such local folder, and {_hub_failure(exc)}") from exc
    return path


_HUB_FAILURES = {
    "RepositoryNotFoundError": "no hub repository of that id (or a private one: log in first)",
    "GatedRepoError": "its hub repository is gated: accept its terms on the hub and log in",
    "LocalEntryNotFoundError": "the hub could not be reached to look for it (offline?), nor is "
    "it in the local hub cache",
    "OfflineModeIsEnabled": "HF_HUB_OFFLINE is set, and it is not in the local hub cache",
}
"""What a failed hub fetch means, by huggingface_hub's error class, for a spec that may as well
be a mistyped local path (``run/captioner`` where ``runs/`` was meant)."""


def _hub_failure(exc: Exception) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in _HUB_FAILURES:
            return _HUB_FAILURES[cls.__name__]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"the hub did not give it ({type(exc).__name__}{': ' + first if first else ''})"


def load_hf_blip(folder: str | Path, kind: str | None = None, tokenizer: str | None = None):
    """Load a local transformers BLIP captioner/filter folder as transformers itself does;
    returns (hf_model, tokenizer, kind)."""
    from transformers import AutoConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "model_type", None) != "blip":
        raise ValueError(
            f"{folder}: not a transformers BLIP checkpoint (no config.json with model_type 'blip')"
        )
    kind = kind_of_hf_config(config, kind)
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    hf_model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ValueError(
            f"{folder}: the checkpoint lacks weights of {cls.__name__}: {sorted(missing)[:8]}"
        )
    tok_source = tokenizer or str(folder)
    try:
        tok = load_tokenizer(tok_source)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (pass the checkpoint's tokenizer explicitly: --tokenizer)"
        ) from exc
    return hf_model.eval(), tok, kind


def hf_preprocess(folder: str | Path, image_size: int) -> dict[str, Any]:
    """The preprocessing of a transformers checkpoint's ``BlipImageProcessor`` as a model folder
    records it (:func:`~capfilt.data.transforms.preprocess_spec`); CLIP's statistics, BLIP's and
    ``BlipImageProcessor``'s defaults, when the folder has no processor file. Refuses a processor
    that capfilt's transform (bicubic resize to ``image_size``, /255, mean/std) cannot follow."""
    from PIL import Image
    from transformers import BlipImageProcessor

    try:
        proc = BlipImageProcessor.from_pretrained(str(folder))
    except OSError:  # neither preprocessor_config.json nor processor_config.json
        return preprocess_spec(image_size)
    problems = []
    size = (proc.size["height"], proc.size["width"])
    if proc.do_resize and size != (image_size, image_size):
        problems.append(f"resize to {size[0]}x{size[1]} (the model's image_size: {image_size})")
    bicubic = int(Image.Resampling.BICUBIC)  # transformers' ``resample`` is Pillow's number
    if proc.do_resize and int(proc.resample) != bicubic:
        problems.append(f"resample {proc.resample} (capfilt: bicubic, {bicubic})")
    if not proc.do_rescale or abs(proc.rescale_factor - 1 / 255) > 1e-12:
        problems.append("pixel values not rescaled by 1/255")
    if problems:
        raise ValueError(
            f"{folder}: its image processor prepares images in a way capfilt does not: "
            + "; ".join(problems)
        )
    if not proc.do_normalize:  # the pixels as they are: the identity normalisation
        return preprocess_spec(image_size, [0.0] * 3, [1.0] * 3)
    return preprocess_spec(image_size, proc.image_mean, proc.image_std)


def import_transformers(
    folder: str | Path,
    kind: str | None = None,
    tokenizer: str | None = None,
    source: str | None = None,
):
    """(MED, tokenizer, ModelConfig, meta) from a local transformers BLIP folder; ``source`` (the
    folder, or the hub id it was fetched for) is recorded in the meta, and the preprocessing of
    the folder's image processor (:func:`hf_preprocess`) in its ``preprocess``."""
    hf_model, tok, kind = load_hf_blip(folder, kind, tokenizer)
    model, cfg, meta = med_from_hf_model(hf_model, tok, kind, source=str(source or folder))
    meta["preprocess"] = hf_preprocess(folder, cfg.image_size)
    return model, tok, cfg, meta


# ---------------------------------------------------------------------------------- export
@torch.no_grad()
def med_to_hf(model: MED, cfg: ModelConfig, kind: str, eps: float | None = None):
    """A transformers ``BlipForConditionalGeneration`` (captioner) or ``BlipForImageTextRetrieval``
    (filter) with the MED's weights (eval mode)."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    if kind not in KINDS:
        raise ValueError(f"kind: choose captioner or filter, got '{kind}'")
    config = hf_config_from_model(model, cfg, kind, eps)
    cls = BlipForConditionalGeneration if kind == "captioner" else BlipForImageTextRetrieval
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        hf_model = cls(config)
    med_sd = model.state_dict()
    hf_sd = hf_model.state_dict()
    missing = []
    for key, tensor in hf_sd.items():
        source = hf_key_to_med(key, kind)
        if source is None or source not in med_sd:
            missing.append(key)
            continue
        tensor.copy_(med_sd[source].to(tensor.dtype))
    if missing:
        raise ValueError(f"no capfilt weights for transformers keys {missing[:8]}")
    return hf_model.eval()


def write_transformers_folder(
    model: MED,
    tokenizer,
    cfg: ModelConfig,
    out: str | Path,
    kind: str,
    eps: float | None = None,
    preprocess: dict[str, Any] | None = None,
) -> Path:
    """Save a MED as a transformers BLIP checkpoint folder: weights + config, tokenizer, and a
    ``BlipProcessor`` (image size, bicubic, and the mean/std of ``preprocess``, the model
    folder's saved preprocessing; CLIP's when there is none)."""
    from transformers import BlipImageProcessor, BlipProcessor

    mean = list((preprocess or {}).get("mean") or CLIP_MEAN)
    std = list((preprocess or {}).get("std") or CLIP_STD)
    hf_model = med_to_hf(model, cfg, kind, eps)  # first: a model it refuses leaves no folder
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    image_processor = BlipImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=mean,
        image_std=std,
    )
    try:
        BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
            str(out)
        )
    except Exception:  # a tokenizer class the processor refuses: save the parts on their own
        image_processor.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return out
