"""A fresh MED for a config and tokenizer, optionally initialised from public checkpoints."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from capfilt.config.schema import ModelConfig
from capfilt.model.med import MED
from capfilt.model.tokenizer import special_ids


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


def build_unfilled(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> MED:
    """A MED for ``cfg`` whose tensors are allocated but not initialised, for a caller about to
    overwrite them from a weights file (a model folder, an imported checkpoint): drawing random
    initial weights is most of the time of building a model (6 of the 8 s of loading a BLIP-base
    folder on this project's CPU machine).

    Built on the meta device, then given memory. ``Module.to_empty`` gives each module that holds
    a shared parameter its own copy, so the shared ones (the LM output layer and the word
    embeddings, a bias under two names) are shared again afterwards.
    """
    try:
        with torch.device("meta"):
            model = build_model(cfg, tokenizer, pretrained=False)
    except (RuntimeError, NotImplementedError):  # a library that reads a value while building
        with torch.random.fork_rng(devices=[]):  # values to be overwritten: leave torch's RNG be
            return build_model(cfg, tokenizer, pretrained=False)
    first: dict[int, str] = {}
    shared: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name:
            shared[name] = kept
    model.to_empty(device="cpu")
    for name, kept in shared.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(kept))
    return model
