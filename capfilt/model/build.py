"""A fresh MED for a config and tokenizer, optionally initialised from public checkpoints."""

from __future__ import annotations

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
