"""Caption generation with the MED decoder: nucleus sampling (BLIP's CapFilt choice), greedy, beam search.

Batched with caches: the cross-attention keys/values of each image are computed once and reused
at every step; self-attention keys/values go to a preallocated :class:`~capfilt.model.text.KVCache`.
Lengths count generated tokens, the prompt excluded. The prompt is stripped from the returned text.

Sampling stays on the model's device without a host sync per token; each row's draws depend only
on (seed, its key), and nucleus sampling looks at the top 64 tokens (:mod:`capfilt.model.decoding`,
the step's parts). Finished rows are checked every ``CHECK_EVERY`` steps on an accelerator, every
step on a CPU; then the batch stops when all are done, or the finished rows leave it (cache, image
keys/values and sequences shrink).
With ``caption.cuda_graphs`` on a GPU, nucleus and greedy decoding instead replay one captured
step with fixed shapes (:mod:`capfilt.model.decode_graph`).

The settings are the recipe's :class:`~capfilt.config.CaptionConfig` (``method``, ``top_p``,
``temperature``, ``repetition_penalty``, ``num_beams``, ``min_length``, ``max_length``,
``prompt``).
"""

from __future__ import annotations

import torch

from capfilt.config import CaptionConfig
from capfilt.model.decode_graph import sample_tokens_static
from capfilt.model.decoding import (
    CHECK_EVERY,
    block_specials,
    choose_tokens,
    decoder_step,
    penalise_repeats,
    random_seeds,
    trim_padding,
)
from capfilt.model.text import CrossKV, KVCache
from capfilt.model.tokenizer import prompt_token_ids
from capfilt.utils.device import to_device


def prompt_ids(model, tokenizer, prompt: str, batch: int, device: torch.device) -> torch.Tensor:
    """[DEC] followed by the prompt's tokens (no [SEP]), repeated ``batch`` times."""
    ids = [model.special["dec"], *prompt_token_ids(tokenizer, prompt)]
    row = torch.tensor(ids, dtype=torch.long)
    # made on the host, copied without blocking (a blocking copy waits for the image encoder)
    return to_device(row.unsqueeze(0).expand(batch, -1).contiguous(), device)


def _select_kv(cross_kv: CrossKV, rows: torch.Tensor) -> CrossKV:
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in cross_kv]


@torch.no_grad()
def sample_tokens(
    model,
    image_embeds: torch.Tensor | None,
    start: torch.Tensor,
    settings: CaptionConfig,
    seeds: torch.Tensor | None = None,
    cross_kv: CrossKV | None = None,
) -> torch.Tensor:
    """Nucleus sampling (or greedy) from ``start`` ids; returns the generated ids [B, T] (pad after [SEP]).

    ``seeds`` [B]: per-row sampling seeds (:func:`~capfilt.model.decoding.row_seeds`); default:
    drawn from torch's global generator. ``cross_kv``: the images' cross-attention keys/values
    (else from ``image_embeds``).
    """
    sep, pad = model.special["sep"], model.special["pad"]
    batch, device = start.shape[0], start.device
    if cross_kv is None:
        cross_kv = model.image_cross_kv(image_embeds)
    if seeds is None:
        seeds = random_seeds(batch)
    seeds = to_device(seeds, device)
    max_len = settings.max_length
    if max_len <= 0:
        return start.new_zeros(batch, 0)
    cache = KVCache(start.shape[1] + max_len)
    # rows still in the batch (ids into the output), their sequences so far, their outputs
    rows = torch.arange(batch, device=device)
    seqs = torch.full((batch, start.shape[1] + max_len), pad, dtype=torch.long, device=device)
    seqs[:, : start.shape[1]] = start
    out = torch.full((batch, max_len), pad, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    on_cpu = device.type == "cpu"  # reading values back to the host costs nothing
    check_every = 1 if on_cpu else CHECK_EVERY
    logits = decoder_step(model, start, cross_kv, cache, settings.compile)
    for t in range(max_len):
        length = start.shape[1] + t
        token = choose_tokens(model, logits, seqs[:, :length], settings, seeds, t, on_cpu)
        token = token.masked_fill(finished, pad)
        out[rows, t] = token
        seqs[:, length] = token
        finished |= token == sep
        if t + 1 == max_len:
            break
        if (t + 1) % check_every == 0:
            n_done = int(finished.sum())
            if n_done == finished.numel():
                break
            if n_done:  # finished rows leave the batch
                live = (~finished).nonzero().squeeze(1)
                rows, seqs, seeds = rows[live], seqs[live], seeds[live]
                finished = finished[live]
                token = token[live]
                cross_kv = _select_kv(cross_kv, live)
                cache.select(live)
        logits = decoder_step(model, token.unsqueeze(1), cross_kv, cache, settings.compile)
    return trim_padding(out, pad)


@torch.no_grad()
def beam_search_tokens(
    model, image_embeds: torch.Tensor, start: torch.Tensor, settings: CaptionConfig
) -> torch.Tensor:
    """Beam search with length-normalised scores; returns the best generated ids per input [B, T].

    The beams' bookkeeping (which candidates continue, which hypotheses finish) runs on the host
    from one copy of each step's top candidates: on a GPU, one wait per step instead of a few per
    input row."""
    sep, pad = model.special["sep"], model.special["pad"]
    k = max(1, settings.num_beams)
    batch, device = start.shape[0], start.device
    cross_kv = [
        (a.repeat_interleave(k, 0), b.repeat_interleave(k, 0))
        for a, b in model.image_cross_kv(image_embeds)
    ]
    seqs = start.repeat_interleave(k, 0)
    cache = KVCache(seqs.shape[1] + settings.max_length)
    logits = decoder_step(model, seqs, cross_kv, cache, settings.compile)
    scores = torch.zeros(batch, k)  # on the host, as the bookkeeping that updates them
    scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first only
    best: list[tuple[float, list[int]] | None] = [None] * batch
    generated: list[list[int]] = [[] for _ in range(batch * k)]  # each beam's tokens so far
    for t in range(settings.max_length):
        logits = penalise_repeats(logits, seqs, settings.repetition_penalty)
        logp = block_specials(model, logits, allow_eos=t >= settings.min_length).log_softmax(-1)
        vocab = logp.shape[-1]
        total = (to_device(scores, device).view(-1, 1) + logp).view(batch, k * vocab)
        top_scores, top_idx = total.topk(2 * k, dim=1)
        top_scores, top_idx = top_scores.cpu(), top_idx.cpu()  # the step's one wait
        new_scores = torch.full((batch, k), float("-inf"))
        new_src = torch.zeros(batch, k, dtype=torch.long)
        new_tok = torch.full((batch, k), pad, dtype=torch.long)
        for b in range(batch):
            filled = 0
            for score, index in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                if score == float("-inf"):
                    break
                src, tok = divmod(index, vocab)
                if tok == sep or t + 1 == settings.max_length:
                    hyp = generated[b * k + src] + [tok]
                    normalised = score / len(hyp)
                    if best[b] is None or normalised > best[b][0]:
                        best[b] = (normalised, hyp)
                    continue
                if filled < k:
                    new_scores[b, filled], new_src[b, filled], new_tok[b, filled] = score, src, tok
                    filled += 1
        # stop an input once its best finished hypothesis beats every live beam's best possible score
        live = new_scores.max(1).values
        done = all(
            best[b] is not None and (live[b] == float("-inf") or best[b][0] >= live[b] / (t + 2))
            for b in range(batch)
        )
        if done or t + 1 == settings.max_length:
            break
        flat_src = (new_src + torch.arange(batch).view(-1, 1) * k).view(-1)
        generated = [
            generated[src] + [tok]
            for src, tok in zip(flat_src.tolist(), new_tok.view(-1).tolist(), strict=True)
        ]
        flat_src, tokens = to_device(flat_src, device), to_device(new_tok.view(-1, 1), device)
        cache.select(flat_src)
        seqs = torch.cat([seqs[flat_src], tokens], 1)
        scores = new_scores
        logits = decoder_step(model, tokens, cross_kv, cache, settings.compile)
    width = max(len(h[1]) for h in best if h is not None) if any(best) else 0
    out = torch.full((batch, width), pad, dtype=torch.long)
    for b, hyp in enumerate(best):
        if hyp is not None:
            out[b, : len(hyp[1])] = torch.tensor(hyp[1])
    return to_device(out, device)


def decode_captions(model, tokenizer, tokens: torch.Tensor, prompt: str = "") -> list[str]:
    """Generated ids → text, cut at [SEP], special tokens and the prompt removed."""
    sep = model.special["sep"]
    texts = []
    for row in tokens.tolist():
        if sep in row:
            row = row[: row.index(sep)]
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        if prompt and text.startswith(prompt.strip()):
            text = text[len(prompt.strip()) :].strip()
        texts.append(text)
    return texts


@torch.no_grad()
def generate_captions(
    model,
    tokenizer,
    images: torch.Tensor,
    settings: CaptionConfig,
    num_captions: int = 1,
    seeds: torch.Tensor | None = None,
) -> list[list[str]]:
    """``num_captions`` captions per image (a list per image); ``seeds``: one per caption, image-major
    (:func:`~capfilt.model.decoding.row_seeds`), default drawn from torch's global generator."""
    image_embeds = model.encode_image(images)
    n = images.shape[0] * num_captions
    start = prompt_ids(model, tokenizer, settings.prompt, n, image_embeds.device)
    if settings.method == "beam":
        if num_captions > 1:
            image_embeds = image_embeds.repeat_interleave(num_captions, 0)
        tokens = beam_search_tokens(model, image_embeds, start, settings)
    else:
        # keys/values projected once per image, shared by its captions
        cross_kv = model.image_cross_kv(image_embeds)
        if num_captions > 1:
            cross_kv = [
                (k.repeat_interleave(num_captions, 0), v.repeat_interleave(num_captions, 0))
                for k, v in cross_kv
            ]
        if settings.cuda_graphs and start.is_cuda:
            if seeds is None:
                seeds = random_seeds(n)
            tokens = sample_tokens_static(model, start, settings, seeds, cross_kv)
        else:
            tokens = sample_tokens(model, None, start, settings, seeds, cross_kv=cross_kv)
    texts = decode_captions(model, tokenizer, tokens)
    return [texts[i * num_captions : (i + 1) * num_captions] for i in range(images.shape[0])]
