"""Filling a MED from a checkpoint's tensors: a model built unfilled, the side a checkpoint lacks
taken from the side it has, the heads it lacks initialised from a seed, and the meta of the
imported model."""

from __future__ import annotations

import re
from typing import Any

import torch

from capfilt.config.schema import ModelConfig
from capfilt.data.transforms import preprocess_spec
from capfilt.model.build import build_unfilled
from capfilt.model.convert.keymaps import partner_key
from capfilt.model.folder import EXTRA_EPS, FORMAT_VERSION
from capfilt.model.med import MED, QUEUES, is_training_state, set_vision_layer_norm_eps
from capfilt.model.tokenizer import special_ids

BLIP_PROMPT = "a picture of "
"""BLIP's caption prompt (capfilt's ``caption.prompt`` default)."""
INIT_SEED = 0
"""Seed of the initialisation of the parts a checkpoint lacks and of new queues (conversion is
deterministic)."""


def new_med(cfg: ModelConfig, tokenizer, vocab_size: int) -> MED:
    """A MED to fill from a checkpoint with :func:`fill_med`: its tensors are allocated but not
    initialised (:func:`~capfilt.model.build.build_unfilled`), as a checkpoint holds all but a
    few heads, which :func:`fill_med` initialises."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens (with [DEC]/[ENC]) but the checkpoint's vocabulary only {vocab_size}"
        )
    if len(tokenizer) < vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens (with [DEC]/[ENC]) but the checkpoint's vocabulary {vocab_size}: "
            "is it the checkpoint's tokenizer?"
        )
    return build_unfilled(cfg, tokenizer)


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


@torch.no_grad()
def fill_med(model: MED, values: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Write MED-named tensors into ``model`` (from :func:`new_med`); fill the absent text side
    from the present one; initialise what the source lacks.

    The parameters the source lacks (a captioner's ITC/ITM heads, a filter's LM-head transform)
    get a new MED's initialisation (:meth:`MED.init_parts`) and queues the source lacks are drawn
    as a new MED's, all from :data:`INIT_SEED`; the momentum copies are the online model's unless
    the source has them all.

    Returns ``{"filled": [...], "initialised": [...], "momentum": [...]}``: parameters copied
    from the other text side's self-attention, parameters the source lacks (initialised), and
    whether the momentum state came from the source.
    Raises ValueError on unknown names, shape mismatches, or a lacking part that has no
    initialisation of its own (the image encoder).
    """
    sd = model.state_dict()
    unknown = sorted(k for k in values if k not in sd)
    if unknown:
        raise ValueError(f"unknown weights for this model: {unknown[:8]}")
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(sd[k].shape)}"
        for k, v in values.items()
        if tuple(v.shape) != tuple(sd[k].shape)
    ]
    if bad:
        raise ValueError(f"weights do not fit the model config: {bad[:6]}")

    plan: dict[str, torch.Tensor] = {}
    filled = []
    for key in sd:
        if key in values:
            continue
        partner = partner_key(key)
        if partner is not None and partner in values:
            plan[key] = values[partner]
            if (
                ".attention." in key
            ):  # self-attention: a copy; shared parts are the same tensor anyway
                filled.append(key)
    plan.update(values)  # the source's own tensors last: they win over any fill of a shared tensor
    written = {_storage_key(sd[key]) for key in plan}
    online = {k: v for k, v in sd.items() if not is_training_state(k)}
    initialised = sorted(k for k, v in online.items() if _storage_key(v) not in written)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        # before the copies: a module initialised whole may hold a tensor the source has (the
        # LM bias's Linear holds the tied word embeddings)
        try:
            model.init_parts(initialised)
        except ValueError as exc:  # a part a checkpoint cannot do without (the image encoder)
            raise ValueError(
                f"the checkpoint lacks weights a model cannot do without: {exc}"
            ) from exc
        model.reset_queues()
    for key, value in plan.items():
        sd[key].copy_(value.to(sd[key].dtype))

    momentum_keys = [k for k in sd if is_training_state(k) and k not in QUEUES]
    has_momentum = bool(momentum_keys) and all(k in values for k in momentum_keys)
    if not has_momentum:
        model.copy_params()
    if not ("image_queue" in values and "text_queue" in values):
        model.queue_ptr.zero_()
    model.idx_queue.fill_(-1)  # image ids of someone else's data set mean nothing here
    return {
        "filled": filled,
        "initialised": initialised,
        "momentum": ["loaded" if has_momentum else "copied from online"],
    }


def summarise(keys: list[str]) -> list[str]:
    """Module-level summary of parameter names (``text_decoder.cls.predictions.bias`` ->
    ``text_decoder.cls.predictions``; layer indices collapsed)."""
    out = []
    for key in keys:
        name = re.sub(r"\.\d+\.", ".*.", key.rsplit(".", 1)[0])
        if name not in out:
            out.append(name)
    return out


def fill_imported(
    model: MED,
    values: dict[str, torch.Tensor],
    kind: str,
    cfg: ModelConfig,
    tokenizer,
    eps: float,
    imported: dict,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Fill ``model`` from a checkpoint's ``values`` (:func:`fill_med`), set its ViT LayerNorm eps
    and put it in eval mode; returns (its meta: ``imported`` plus what was filled and what kept
    its seeded initialisation, the fill report)."""
    report = fill_med(model, values)
    set_vision_layer_norm_eps(model, eps)
    model.eval()
    imported = {
        **imported,
        "filled": summarise(report["filled"]),
        "initialised": summarise(report["initialised"]),
    }
    return imported_meta(kind, cfg, tokenizer, model, eps, imported), report


def imported_meta(
    kind: str, cfg: ModelConfig, tokenizer, model: MED, eps: float, imported: dict
) -> dict[str, Any]:
    """The meta of an imported model, laid out like a model folder's (``stage``, ``preprocess``:
    BLIP's CLIP statistics, which a transformers import replaces with its processor's,
    ``extra.imported``, ``extra.vision_layer_norm_eps``)."""
    return {
        "format_version": FORMAT_VERSION,
        "stage": kind,
        "vocab_size": model.vocab_size,
        "special_ids": special_ids(tokenizer),
        "preprocess": preprocess_spec(cfg.image_size),
        "extra": {"imported": imported, EXTRA_EPS: eps},
    }
