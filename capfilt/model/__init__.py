"""The MED model (SPEC §1), its losses (SPEC §2), tokenizer and self-describing model folders."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from capfilt.config.schema import ModelConfig
from capfilt.model.distributed import Gather, LocalGather, all_gather_no_grad, all_gather_with_grad
from capfilt.model.folder import load_model_folder, read_meta, save_model_folder
from capfilt.model.losses import itc_loss, itm_loss, lm_labels, lm_loss, sample_itm_negatives
from capfilt.model.med import LOSSES, MED, count_parameters
from capfilt.model.tokenizer import (
    build_tokenizer,
    load_tokenizer,
    prompt_length,
    special_ids,
    tokenize,
    train_wordpiece_tokenizer,
)


def build_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, pretrained: bool = True
) -> MED:
    """A MED sized for ``tokenizer`` (vocab = ``len(tokenizer)``).

    ``pretrained``: initialise from ``cfg.vision_checkpoint`` / ``cfg.text_checkpoint`` when set
    (then the momentum copies are re-synced). ``load_model_folder`` passes False.
    """
    model = MED(cfg, vocab_size=len(tokenizer), special=special_ids(tokenizer))
    if pretrained and (cfg.vision_checkpoint or cfg.text_checkpoint):
        from capfilt.model.pretrained import init_text, init_vision

        if cfg.vision_checkpoint:
            init_vision(model.visual_encoder, cfg.vision_checkpoint)
        if cfg.text_checkpoint:
            if not cfg.tokenizer:
                raise ValueError(
                    "model.text_checkpoint needs model.tokenizer set to that checkpoint's tokenizer"
                )
            init_text(model.text_encoder, model.text_decoder, cfg.text_checkpoint)
        model.copy_params()
    return model


__all__ = [
    "LOSSES",
    "MED",
    "Gather",
    "LocalGather",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "build_model",
    "build_tokenizer",
    "count_parameters",
    "itc_loss",
    "itm_loss",
    "lm_labels",
    "lm_loss",
    "load_model_folder",
    "load_tokenizer",
    "prompt_length",
    "read_meta",
    "sample_itm_negatives",
    "save_model_folder",
    "special_ids",
    "tokenize",
    "train_wordpiece_tokenizer",
]
