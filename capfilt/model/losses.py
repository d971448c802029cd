"""The three pretraining losses of docs/architecture.md §2 as small pure functions (no module state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capfilt.config.schema import ITM_NEGATIVES

IGNORE_INDEX = -100
"""Label of positions that take no part in the LM loss (padding, prompt)."""

LABEL_SMOOTHING = 0.1
"""LM label smoothing (docs/architecture.md §2, LM; BLIP's decoder)."""


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m_all: torch.Tensor,
    text_feat_m_all: torch.Tensor,
    temp: torch.Tensor | float,
    alpha: float,
    sim_targets: torch.Tensor,
    image_feat_m: torch.Tensor | None = None,
    text_feat_m: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-text contrastive loss with momentum distillation (docs/architecture.md §2, ITC, from ALBEF).

    - ``image_feat``/``text_feat`` [b, D]: normalised features of the local batch (with grad);
    - ``image_feat_m_all``/``text_feat_m_all`` [K, D]: momentum features of the global batch
      followed by the queue (no grad);
    - ``sim_targets`` [b, K]: hard targets, rows summing to 1 (one-hot, or spread over the
      columns sharing the sample's image id);
    - ``image_feat_m``/``text_feat_m`` [b, D]: the local momentum features, needed when
      ``alpha > 0`` for the soft targets ``alpha * softmax(s_m) + (1 - alpha) * sim_targets``.

    Loss = mean over i2t and t2i of the cross-entropy of ``log_softmax(s / temp)`` against
    the targets, averaged over the local batch.
    """
    sim_i2t = image_feat.float() @ text_feat_m_all.float().t() / temp
    sim_t2i = text_feat.float() @ image_feat_m_all.float().t() / temp
    targets = sim_targets.float()
    if alpha > 0:
        if image_feat_m is None or text_feat_m is None:
            raise ValueError(
                "itc_loss: alpha > 0 needs the local momentum features image_feat_m/text_feat_m"
            )
        with torch.no_grad():
            sim_i2t_m = image_feat_m.float() @ text_feat_m_all.float().t() / temp
            sim_t2i_m = text_feat_m.float() @ image_feat_m_all.float().t() / temp
            i2t_targets = alpha * sim_i2t_m.softmax(1) + (1 - alpha) * targets
            t2i_targets = alpha * sim_t2i_m.softmax(1) + (1 - alpha) * targets
    else:
        i2t_targets = t2i_targets = targets
    loss_i2t = -(F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def itc_targets(ids_local: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """Hard ITC targets from image ids (BLIP retrieval fine-tuning): ``(idx == idx_all)`` normalised.

    ``ids_local`` [b], ``ids_all`` [K]; every row must contain at least one match (the sample
    itself is in ``ids_all``).
    """
    pos = (ids_local.view(-1, 1) == ids_all.view(1, -1)).float()
    return pos / pos.sum(1, keepdim=True)


def too_few_images(batch: int, distinct: int) -> ValueError:
    """The error for an ITM batch where some sample has no other image to pair with."""
    return ValueError(
        "ITM needs at least 2 distinct images in the (global) batch: some sample has no other "
        f"image to use as a hard negative (global batch of {batch} with {distinct} distinct "
        "image ids). Use a larger batch or drop 'itm' from the losses."
    )


@torch.no_grad()
def sample_itm_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_ids: torch.Tensor,
    generator: torch.Generator | None = None,
    mode: str = "hard",
    known_distinct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negatives for ITM (docs/architecture.md §2, ITM): one negative image per text, one negative text per image.

    ``sim_i2t`` [B, B] (images vs texts) and ``sim_t2i`` [B, B] (texts vs images) of the global
    batch, ``image_ids`` [B] its image ids. ``mode`` (one of :data:`ITM_NEGATIVES`):

    - ``hard`` (BLIP): sampling probability ``softmax(sim) + 1e-4`` (the 1e-4 keeps rows from being
      all zero);
    - ``random``: uniform, whatever the similarities: the easy differences first, and rarely a
      negative that is true of the image after all (docs/architecture.md §2, ITM);
    - ``mixed``: rows at even positions of the global batch hard, odd rows random (the positions
      are those of the global batch, so the choice does not depend on the number of ranks).

    In every mode the sample itself (diagonal) and every item of the same image id have probability 0.
    Returns (neg_image_idx [B] for each text, neg_text_idx [B] for each image).
    Raises ``ValueError`` when a row has no valid negative or the mode is unknown; with
    ``known_distinct`` (the caller saw two image ids on the host) that check, a host sync on a GPU,
    is skipped.
    """
    if mode not in ITM_NEGATIVES:
        raise ValueError(f"sample_itm_negatives: mode must be one of {ITM_NEGATIVES}, got {mode!r}")
    big_b = image_ids.numel()
    if sim_i2t.shape != (big_b, big_b) or sim_t2i.shape != (big_b, big_b):
        raise ValueError(
            f"sample_itm_negatives: shape mismatch sim_i2t {tuple(sim_i2t.shape)}, sim_t2i {tuple(sim_t2i.shape)}, "
            f"image_ids {big_b}"
        )
    # a sample's own column carries its own id, so this also zeroes the diagonal
    same = image_ids.view(-1, 1) == image_ids.view(1, -1)
    valid = ~same
    if not known_distinct and not bool(valid.any(1).all()):
        raise too_few_images(big_b, int(image_ids.unique().numel()))
    if mode == "random":
        w_t2i = w_i2t = valid.float()
    else:
        w_t2i = (sim_t2i.float().softmax(1) + 1e-4).masked_fill(same, 0)
        w_i2t = (sim_i2t.float().softmax(1) + 1e-4).masked_fill(same, 0)
        if mode == "mixed":
            # multinomial normalises each row, so uniform rows need no scaling to match the hard ones
            odd = (torch.arange(big_b, device=valid.device) % 2 == 1).view(-1, 1)
            w_t2i = torch.where(odd, valid.float(), w_t2i)
            w_i2t = torch.where(odd, valid.float(), w_i2t)
    neg_image_idx = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_text_idx = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_image_idx, neg_text_idx


def itm_loss(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> torch.Tensor:
    """Image-text matching loss (docs/architecture.md §2, ITM): 2-way cross-entropy over bs positives (label 1)
    and 2·bs negatives (label 0), averaged over all 3·bs pairs."""
    logits = torch.cat([logits_pos, logits_neg], 0).float()
    labels = torch.cat(
        [
            torch.ones(logits_pos.shape[0], dtype=torch.long, device=logits.device),
            torch.zeros(logits_neg.shape[0], dtype=torch.long, device=logits.device),
        ]
    )
    return F.cross_entropy(logits, labels)


def lm_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int = 0
) -> torch.Tensor:
    """LM labels (docs/architecture.md §2, LM): the decoder input ids with padding and the first ``prompt_len``
    tokens (the [DEC] token and the prompt) set to -100."""
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if prompt_len > 0:
        labels[:, :prompt_len] = IGNORE_INDEX
    return labels


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = LABEL_SMOOTHING
) -> torch.Tensor:
    """Captioning LM loss (docs/architecture.md §2, LM): next-token cross-entropy with label smoothing.

    ``logits`` [B, L, V] are the decoder outputs at every position and ``labels`` [B, L] the
    input ids with -100 at ignored positions (see :func:`lm_labels`); position t predicts
    label t+1. Averaged over the non-ignored tokens of the batch.
    """
    shifted = logits[:, :-1, :].float()
    target = labels[:, 1:].reshape(-1)
    per_token = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        target,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="none",
    )
    # sum / count instead of reduction="mean": no host sync, and 0 (not NaN) when nothing is labelled
    count = (target != IGNORE_INDEX).sum().clamp(min=1)
    return per_token.sum() / count
