"""A fresh MED for a config and tokenizer, optionally initialised from public checkpoints."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from capfilt.config.schema import ModelConfig
from capfilt.model.med import MED, tensor_names
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


def build_unfilled(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    values: dict[str, torch.Tensor] | None = None,
) -> MED:
    """A MED for ``cfg`` holding ``values`` (state-dict names; taken as they are, not copied) and,
    for every other tensor, memory that is not initialised: for a caller that overwrites those
    from a checkpoint (an import) or from nothing (an inference folder's momentum copies).
    Drawing random initial weights is most of the time of building a model (6 of the 8 s of
    loading a BLIP-base folder on this project's CPU machine); taking the values as they are
    spares a second copy of them in host memory where the model goes to an accelerator next.

    Built on the meta device, then each tensor replaced, once for all the names it has: a tied
    tensor (the LM output layer and the word embeddings, the LM bias under two names) stays one.
    A library that reads a value while building (an older timm's drop-path rates) cannot be built
    there: the model is then built as usual and ``values`` copied in. A value of another shape
    than the model's tensor raises ValueError; one of another dtype is converted.
    """
    values = values or {}
    try:
        with torch.device("meta"):
            model = build_model(cfg, tokenizer, pretrained=False)
    except (RuntimeError, NotImplementedError):  # a library that reads a value while building
        with torch.random.fork_rng(devices=[]):  # values to be overwritten: leave torch's RNG be
            model = build_model(cfg, tokenizer, pretrained=False)
        try:
            model.load_state_dict(values, strict=False)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from exc
        return model
    for empty, names in tensor_names(model):
        given = next((values[n] for n in names if n in values), None)
        if given is None:
            given = torch.empty_like(empty, device="cpu")
        elif given.shape != empty.shape:
            raise ValueError(
                f"{names[0]}: {tuple(given.shape)} in the weights, {tuple(empty.shape)} in the model"
            )
        given = given.to(empty.dtype)
        if isinstance(empty, nn.Parameter):
            given = nn.Parameter(given, requires_grad=empty.requires_grad)
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, given)
    return model
