"""Caption generation with the MED decoder: nucleus sampling (BLIP's CapFilt choice), greedy, beam search.

Batched with a key/value cache: the cross-attention keys/values of each image are computed once
(first step) and reused; self-attention keys/values grow by one token per step; a batch stops
as soon as every sequence has produced ``[SEP]``. Lengths count generated tokens, the prompt
excluded. The prompt is stripped from the returned text.

The settings are the recipe's :class:`~capfilt.config.CaptionConfig` (``method``, ``top_p``,
``temperature``, ``repetition_penalty``, ``num_beams``, ``min_length``, ``max_length``,
``prompt``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from capfilt.config import CaptionConfig
from capfilt.model.tokenizer import prompt_token_ids


def prompt_ids(model, tokenizer, prompt: str, batch: int, device: torch.device) -> torch.Tensor:
    """[DEC] followed by the prompt's tokens (no [SEP]), repeated ``batch`` times."""
    ids = [model.special["dec"], *prompt_token_ids(tokenizer, prompt)]
    return (
        torch.tensor(ids, dtype=torch.long, device=device)
        .unsqueeze(0)
        .expand(batch, -1)
        .contiguous()
    )


def _new_cache(model) -> EncoderDecoderCache:
    config = model.text_decoder.config
    return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))


def _decoder_step(
    model, ids: torch.Tensor, image_embeds: torch.Tensor, cache: EncoderDecoderCache, past: int
) -> torch.Tensor:
    """Logits of the last position after feeding ``ids`` (all new tokens) with the cache."""
    mask = torch.ones(ids.shape[0], past + ids.shape[1], dtype=torch.long, device=ids.device)
    out = model.text_decoder(
        input_ids=ids,
        attention_mask=mask,
        encoder_hidden_states=image_embeds,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1, :].float()


def _penalise_repeats(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: logits of tokens already in the sequence are divided (if > 0) or multiplied by ``penalty``."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, seqs)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p`` (at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = (
        cumulative - sorted_logits.softmax(-1) >= top_p
    )  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def _block_specials(model, logits: torch.Tensor, allow_eos: bool) -> torch.Tensor:
    for name in ("pad", "cls", "enc", "dec"):
        logits[:, model.special[name]] = float("-inf")
    if not allow_eos:
        logits[:, model.special["sep"]] = float("-inf")
    return logits


@torch.no_grad()
def sample_tokens(
    model,
    image_embeds: torch.Tensor,
    start: torch.Tensor,
    settings: CaptionConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Nucleus sampling (or greedy) from ``start`` ids; returns the generated ids [B, T] (pad after [SEP])."""
    sep, pad = model.special["sep"], model.special["pad"]
    batch = start.shape[0]
    cache = _new_cache(model)
    seqs = start
    logits = _decoder_step(model, start, image_embeds, cache, 0)
    finished = torch.zeros(batch, dtype=torch.bool, device=start.device)
    generated = []
    for t in range(settings.max_length):
        logits = _penalise_repeats(logits, seqs, settings.repetition_penalty)
        logits = _block_specials(model, logits, allow_eos=t >= settings.min_length)
        if settings.method == "greedy":
            token = logits.argmax(-1)
        else:
            logits = _top_p_filter(logits / max(settings.temperature, 1e-6), settings.top_p)
            probs = logits.softmax(-1)
            if generator is not None:
                probs = probs.to(
                    generator.device
                )  # sampling follows the generator's device (CPU for reproducibility)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(start.device)
        token = torch.where(finished, torch.full_like(token, pad), token)
        generated.append(token)
        finished |= token == sep
        seqs = torch.cat([seqs, token.unsqueeze(1)], 1)
        if bool(finished.all()) or t + 1 == settings.max_length:
            break
        logits = _decoder_step(model, token.unsqueeze(1), image_embeds, cache, seqs.shape[1] - 1)
    return torch.stack(generated, 1) if generated else start.new_zeros(batch, 0)


@torch.no_grad()
def beam_search_tokens(
    model, image_embeds: torch.Tensor, start: torch.Tensor, settings: CaptionConfig
) -> torch.Tensor:
    """Beam search with length-normalised scores; returns the best generated ids per input [B, T]."""
    sep, pad = model.special["sep"], model.special["pad"]
    k = max(1, settings.num_beams)
    batch = start.shape[0]
    embeds = image_embeds.repeat_interleave(k, 0)
    seqs = start.repeat_interleave(k, 0)
    cache = _new_cache(model)
    logits = _decoder_step(model, seqs, embeds, cache, 0)
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
        cache.reorder_cache(flat_src)
        generated = torch.cat([generated[flat_src], new_tok.view(-1, 1)], 1)
        seqs = torch.cat([seqs[flat_src], new_tok.view(-1, 1)], 1)
        scores = new_scores
        logits = _decoder_step(model, new_tok.view(-1, 1), embeds, cache, seqs.shape[1] - 1)
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
    generator: torch.Generator | None = None,
) -> list[list[str]]:
    """``num_captions`` captions per image (a list per image)."""
    image_embeds = model.encode_image(images)
    if num_captions > 1:
        image_embeds = image_embeds.repeat_interleave(num_captions, 0)
    start = prompt_ids(
        model, tokenizer, settings.prompt, image_embeds.shape[0], image_embeds.device
    )
    if settings.method == "beam":
        tokens = beam_search_tokens(model, image_embeds, start, settings)
    else:
        tokens = sample_tokens(model, image_embeds, start, settings, generator)
    texts = decode_captions(model, tokenizer, tokens)
    return [texts[i * num_captions : (i + 1) * num_captions] for i in range(images.shape[0])]
