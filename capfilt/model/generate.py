"""Caption generation with the MED decoder: nucleus sampling (BLIP's CapFilt choice), greedy, beam search.

Batched with caches: the cross-attention keys/values of each image are computed once and reused
at every step; self-attention keys/values go to a preallocated :class:`~capfilt.model.text.KVCache`.
Lengths count generated tokens, the prompt excluded. The prompt is stripped from the returned text.

Sampling stays on the model's device without a host sync per token:

- Each row draws its random numbers from a counter-based hash of (its seed, step)
  (:func:`row_seeds` makes the seed from the sampling seed and the sample's key), so a caption
  depends only on (seed, key), not on the batch, the shard split or the device's RNG state.
- Nucleus sampling looks at the ``TOP_K`` most likely tokens only, with their probabilities under
  the full softmax: the kept set is exactly the full-vocabulary nucleus whenever that nucleus has at
  most ``TOP_K`` tokens (the mass of the top ``TOP_K`` reaches ``top_p``), else its first ``TOP_K``.
- Finished rows are checked every ``CHECK_EVERY`` steps; then the batch stops when all are done,
  or the finished rows leave it (cache, image keys/values and sequences shrink).

The settings are the recipe's :class:`~capfilt.config.CaptionConfig` (``method``, ``top_p``,
``temperature``, ``repetition_penalty``, ``num_beams``, ``min_length``, ``max_length``,
``prompt``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from capfilt.config import CaptionConfig
from capfilt.model.text import CrossKV, KVCache
from capfilt.model.tokenizer import prompt_token_ids

TOP_K = 64
"""Candidates per step of nucleus sampling (see the module doc for when this is exact)."""

CHECK_EVERY = 4
"""Decoding steps between checks of which rows are finished (each check syncs with the host)."""

_MASK32 = 0xFFFFFFFF


def prompt_ids(model, tokenizer, prompt: str, batch: int, device: torch.device) -> torch.Tensor:
    """[DEC] followed by the prompt's tokens (no [SEP]), repeated ``batch`` times."""
    ids = [model.special["dec"], *prompt_token_ids(tokenizer, prompt)]
    return (
        torch.tensor(ids, dtype=torch.long, device=device)
        .unsqueeze(0)
        .expand(batch, -1)
        .contiguous()
    )


def row_seeds(seed: int, keys: Sequence[str], num_captions: int = 1) -> torch.Tensor:
    """Per-caption sampling seeds [len(keys) * num_captions] (31-bit) from (seed, key, caption index)."""
    out = []
    for key in keys:
        for j in range(num_captions):
            digest = hashlib.blake2b(f"{seed}\0{key}\0{j}".encode(), digest_size=4).digest()
            out.append(int.from_bytes(digest, "little") & 0x7FFFFFFF)
    return torch.tensor(out, dtype=torch.long)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x < 2^32, without overflowing int64 (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An invertible 32-bit integer mix (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_draws(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform number in [0, 1) per row from (seed, step): float32 with 24 random bits."""
    x = _hash32((_hash32(seeds & _MASK32) + step * 0x9E3779B9) & _MASK32)
    return (x >> 8).to(torch.float32) / float(1 << 24)


def _penalise_repeats(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: logits of tokens already in the sequence are divided (if > 0) or multiplied by ``penalty``."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, seqs)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


def nucleus_candidates(
    logits: torch.Tensor, top_p: float, k: int = TOP_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus among the ``k`` most likely tokens: (probabilities [B, k] under the full softmax,
    0 where dropped; token ids [B, k]), most likely first.

    A token is kept when the mass of the tokens before it is below ``top_p`` (so the first one
    always is): the smallest set reaching ``top_p``, exact while it fits in ``k``.
    """
    values, index = logits.topk(min(k, logits.shape[-1]), dim=-1)
    probs = (values - logits.logsumexp(-1, keepdim=True)).exp()
    if top_p < 1.0:
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    return probs, index


def _sample(probs: torch.Tensor, index: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row from unnormalised ``probs`` with uniforms ``u``."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    pick = (cdf <= target).sum(-1, keepdim=True).clamp_(max=probs.shape[-1] - 1)
    return index.gather(1, pick).squeeze(1)


def _block_specials(model, logits: torch.Tensor, allow_eos: bool) -> torch.Tensor:
    for name in ("pad", "cls", "enc", "dec"):
        logits[:, model.special[name]] = float("-inf")
    if not allow_eos:
        logits[:, model.special["sep"]] = float("-inf")
    return logits


COMPILE_BACKEND = "inductor"
"""``torch.compile`` backend of ``caption.compile`` (the tests trace with ``aot_eager``)."""


def _decoder(model, compiled: bool):
    """The model's text decoder, or its compiled twin (made once per decoder module and kept in
    its ``__dict__``, outside its submodules and state dict)."""
    if not compiled:
        return model.text_decoder
    decoder = model.text_decoder.__dict__.get("_compiled_decoder")
    if decoder is None:
        decoder = torch.compile(model.text_decoder, backend=COMPILE_BACKEND)
        object.__setattr__(model.text_decoder, "_compiled_decoder", decoder)
    return decoder


def _decoder_step(
    model, ids: torch.Tensor, cross_kv: CrossKV, cache: KVCache, compiled: bool = False
) -> torch.Tensor:
    """Logits [B, vocab] (float32) of the last position after feeding ``ids`` (the new tokens)."""
    out = _decoder(model, compiled)(input_ids=ids, cross_kv=cross_kv, cache=cache, last_only=True)
    return out.logits[:, -1, :].float()


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

    ``seeds`` [B]: per-row sampling seeds (:func:`row_seeds`); default: drawn from torch's global
    generator. ``cross_kv``: the images' cross-attention keys/values (else from ``image_embeds``).
    """
    sep, pad = model.special["sep"], model.special["pad"]
    batch, device = start.shape[0], start.device
    if cross_kv is None:
        cross_kv = model.image_cross_kv(image_embeds)
    if seeds is None:
        seeds = torch.randint(0, 2**31 - 1, (batch,), dtype=torch.long)
    seeds = seeds.to(device)
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
    logits = _decoder_step(model, start, cross_kv, cache, settings.compile)
    for t in range(max_len):
        length = start.shape[1] + t
        logits = _penalise_repeats(logits, seqs[:, :length], settings.repetition_penalty)
        logits = _block_specials(model, logits, allow_eos=t >= settings.min_length)
        if settings.method == "greedy":
            token = logits.argmax(-1)
        else:
            scaled = logits / max(settings.temperature, 1e-6)
            probs, index = nucleus_candidates(scaled, settings.top_p)
            token = _sample(probs, index, uniform_draws(seeds, t))
        token = token.masked_fill(finished, pad)
        out[rows, t] = token
        seqs[:, length] = token
        finished |= token == sep
        if t + 1 == max_len:
            break
        if (t + 1) % CHECK_EVERY == 0:
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
        logits = _decoder_step(model, token.unsqueeze(1), cross_kv, cache, settings.compile)
    width = int((out != pad).any(0).nonzero().max()) + 1 if bool((out != pad).any()) else 0
    return out[:, :width]


@torch.no_grad()
def beam_search_tokens(
    model, image_embeds: torch.Tensor, start: torch.Tensor, settings: CaptionConfig
) -> torch.Tensor:
    """Beam search with length-normalised scores; returns the best generated ids per input [B, T]."""
    sep, pad = model.special["sep"], model.special["pad"]
    k = max(1, settings.num_beams)
    batch = start.shape[0]
    cross_kv = [
        (a.repeat_interleave(k, 0), b.repeat_interleave(k, 0))
        for a, b in model.image_cross_kv(image_embeds)
    ]
    seqs = start.repeat_interleave(k, 0)
    cache = KVCache(seqs.shape[1] + settings.max_length)
    logits = _decoder_step(model, seqs, cross_kv, cache, settings.compile)
    scores = torch.zeros(batch, k, device=start.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first only
    best: list[tuple[float, list[int]] | None] = [None] * batch
    generated = seqs.new_zeros(batch * k, 0)
    for t in range(settings.max_length):
        logits = _penalise_repeats(logits, seqs, settings.repetition_penalty)
        logp = _block_specials(model, logits, allow_eos=t >= settings.min_length).log_softmax(-1)
        vocab = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(batch, k * vocab)
        top_scores, top_idx = total.topk(2 * k, dim=1)
        beam_src, token = top_idx // vocab, top_idx % vocab
        new_scores = torch.full((batch, k), float("-inf"), device=start.device)
        new_src = torch.zeros(batch, k, dtype=torch.long, device=start.device)
        new_tok = torch.full((batch, k), pad, dtype=torch.long, device=start.device)
        for b in range(batch):
            filled = 0
            for score, src, tok in zip(
                top_scores[b].tolist(), beam_src[b].tolist(), token[b].tolist()
            ):
                if score == float("-inf"):
                    break
                if tok == sep or t + 1 == settings.max_length:
                    hyp = generated[b * k + src].tolist() + [tok]
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
        flat_src = (new_src + torch.arange(batch, device=start.device).view(-1, 1) * k).view(-1)
        cache.select(flat_src)
        generated = torch.cat([generated[flat_src], new_tok.view(-1, 1)], 1)
        seqs = torch.cat([seqs[flat_src], new_tok.view(-1, 1)], 1)
        scores = new_scores
        logits = _decoder_step(model, new_tok.view(-1, 1), cross_kv, cache, settings.compile)
    width = max(len(h[1]) for h in best if h is not None) if any(best) else 0
    out = torch.full((batch, width), pad, dtype=torch.long, device=start.device)
    for b, hyp in enumerate(best):
        if hyp is not None:
            out[b, : len(hyp[1])] = torch.tensor(hyp[1], device=start.device)
    return out


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
    (:func:`row_seeds`), default drawn from torch's global generator."""
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
        tokens = sample_tokens(model, None, start, settings, seeds, cross_kv=cross_kv)
    texts = decode_captions(model, tokenizer, tokens)
    return [texts[i * num_captions : (i + 1) * num_captions] for i in range(images.shape[0])]
