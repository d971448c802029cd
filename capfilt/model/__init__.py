"""The MED model (docs/architecture.md §1), its losses (§2), tokenizer and self-describing model folders."""

from __future__ import annotations

from capfilt.model.build import build_model
from capfilt.model.distributed import Gather, LocalGather, all_gather_no_grad, all_gather_with_grad
from capfilt.model.folder import load_model_folder, read_meta, save_model_folder
from capfilt.model.losses import itc_loss, itm_loss, lm_labels, lm_loss, sample_itm_negatives
from capfilt.model.med import LOSSES, MED, check_image_ids, count_parameters
from capfilt.model.tokenizer import (
    build_tokenizer,
    length_chunks,
    load_tokenizer,
    pad_vocabulary,
    prompt_length,
    special_ids,
    tokenize,
    tokenize_with_prompt,
    train_wordpiece_tokenizer,
)

__all__ = [
    "check_image_ids",
    "LOSSES",
    "MED",
    "Gather",
    "LocalGather",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "build_model",
    "build_tokenizer",
    "length_chunks",
    "count_parameters",
    "itc_loss",
    "itm_loss",
    "lm_labels",
    "lm_loss",
    "load_model_folder",
    "load_tokenizer",
    "pad_vocabulary",
    "prompt_length",
    "read_meta",
    "sample_itm_negatives",
    "save_model_folder",
    "special_ids",
    "tokenize",
    "tokenize_with_prompt",
    "train_wordpiece_tokenizer",
]
