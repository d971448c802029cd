"""One decoding step's parts, shared by the eager loop (:mod:`capfilt.model.generate`) and the
CUDA-graph loop (:mod:`capfilt.model.decode_graph`): the per-row random draws, the choice of the
next token, and the decoder's forward pass for new tokens.

Sampling stays on the model's device without a host sync per token:

- Each row draws its random numbers from a counter-based hash of (its seed, step)
  (:func:`row_seeds` makes the seed from the sampling seed and the sample's key), so a caption
  depends only on (seed, key), not on the batch, the shard split or the device's RNG state.
- Nucleus sampling looks at the ``TOP_K`` most likely tokens only, with their probabilities under
  the full softmax: the kept set is exactly the full-vocabulary nucleus whenever that nucleus has at
  most ``TOP_K`` tokens (the mass of the top ``TOP_K`` reaches ``top_p``), else its first ``TOP_K``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from capfilt.config import CaptionConfig
from capfilt.model.text import CrossKV, KVCache, StaticKVCache

TOP_K = 64
"""Candidates per step of nucleus sampling (see the module doc for when this is exact)."""

CHECK_EVERY = 4
"""Decoding steps between checks of which rows are finished on an accelerator (each check syncs
with the host); on a CPU, where a check costs nothing, the eager loop checks at every step."""

COMPILE_BACKEND = "inductor"
"""``torch.compile`` backend of ``caption.compile`` (the tests trace with ``aot_eager``)."""

_MASK32 = 0xFFFFFFFF


def row_seeds(seed: int, keys: Sequence[str], num_captions: int = 1) -> torch.Tensor:
    """Per-caption sampling seeds [len(keys) * num_captions] (31-bit) from (seed, key, caption index)."""
    out = []
    for key in keys:
        for j in range(num_captions):
            digest = hashlib.blake2b(f"{seed}\0{key}\0{j}".encode(), digest_size=4).digest()
            out.append(int.from_bytes(digest, "little") & 0x7FFFFFFF)
    return torch.tensor(out, dtype=torch.long)


def random_seeds(n: int) -> torch.Tensor:
    """``n`` sampling seeds from torch's global generator: the default when no keys give them."""
    return torch.randint(0, 2**31 - 1, (n,), dtype=torch.long)


def trim_padding(out: torch.Tensor, pad: int) -> torch.Tensor:
    """Generated ids [B, T] cut after the last column that holds a token other than [PAD]."""
    used = (out != pad).any(0).nonzero()
    return out[:, : int(used.max()) + 1 if used.numel() else 0]


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


def uniform_draws(seeds: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One uniform number in [0, 1) per row from (seed, step): float32 with 24 random bits.
    ``step`` may be a 0-dim long tensor on the seeds' device (a captured step reads it there)."""
    x = _hash32((_hash32(seeds & _MASK32) + step * 0x9E3779B9) & _MASK32)
    return (x >> 8).to(torch.float32) / float(1 << 24)


def penalise_repeats(logits: torch.Tensor, seqs: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: logits of tokens already in the sequence are divided (if > 0) or multiplied by ``penalty``."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, seqs)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seqs, seen)


def block_specials(model, logits: torch.Tensor, allow_eos: bool | torch.Tensor) -> torch.Tensor:
    """[PAD], [CLS], [ENC], [DEC] never; [SEP] only where ``allow_eos`` (a bool, or a 0-dim bool
    tensor that a captured step computes on the device)."""
    for name in ("pad", "cls", "enc", "dec"):
        logits[:, model.special[name]] = float("-inf")
    sep = model.special["sep"]
    if isinstance(allow_eos, torch.Tensor):
        logits[:, sep] = torch.where(allow_eos, logits[:, sep], float("-inf"))
    elif not allow_eos:
        logits[:, sep] = float("-inf")
    return logits


def nucleus_candidates(
    probs: torch.Tensor, top_p: float, k: int = TOP_K
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus among the ``k`` most likely tokens of the full-vocabulary probabilities
    ``probs`` [B, vocab]: (their probabilities [B, k], 0 where dropped; token ids [B, k]), most
    likely first.

    A token is kept when the mass of the tokens before it is below ``top_p`` (so the first one
    always is): the smallest set reaching ``top_p``, exact while it fits in ``k``.
    """
    probs, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
    if top_p < 1.0:
        # the mass before each token, an exclusive prefix sum: before the first exactly 0, before
        # the second exactly the first's probability (what sample_nucleus' sure rows rely on)
        before = F.pad(probs[:, :-1].cumsum(-1), (1, 0))
        probs = probs.masked_fill(before >= top_p, 0.0)
    return probs, index


def _sample(probs: torch.Tensor, index: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row from unnormalised ``probs`` with uniforms ``u``."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    pick = (cdf <= target).sum(-1, keepdim=True).clamp_(max=probs.shape[-1] - 1)
    return index.gather(1, pick).squeeze(1)


def sample_nucleus(
    logits: torch.Tensor,
    top_p: float,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    sure_rows_first: bool = False,
) -> torch.Tensor:
    """One token per row [B] drawn from the nucleus of ``logits`` with the rows' draws for ``step``.

    ``sure_rows_first`` (the eager loop on a CPU): rows whose most likely token alone holds
    ``top_p``, and more than half the mass (so that it is the only most likely one), take that
    token without the top-k. It is their whole nucleus, so the general path would draw it whatever
    the draw: the tokens are the same. The top-k is most of a step's sampling cost, and a trained
    captioner is that sure of about half its tokens (the demo's at temperature 0.3). Picking the
    rows reads a value back: free on a CPU, a sync on a GPU and impossible in a captured step.
    """
    probs = logits.softmax(-1)
    if sure_rows_first:
        top, token = probs.max(-1)
        unsure = ((top < top_p) | (top <= 0.5)).nonzero().squeeze(1)
        if unsure.numel() < token.numel():
            if unsure.numel():
                draws = uniform_draws(seeds.index_select(0, unsure), step)
                picked = nucleus_candidates(probs.index_select(0, unsure), top_p)
                token[unsure] = _sample(*picked, draws)
            return token
    return _sample(*nucleus_candidates(probs, top_p), uniform_draws(seeds, step))


def choose_tokens(
    model,
    logits: torch.Tensor,
    seqs: torch.Tensor,
    settings: CaptionConfig,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    sure_rows_first: bool = False,
) -> torch.Tensor:
    """The next token of each row [B] from the last position's ``logits`` [B, vocab]: repetition
    penalty over ``seqs`` (the ids so far; [PAD] entries are harmless: [PAD] is blocked), specials
    blocked ([SEP] before ``min_length`` generated tokens), then greedy or nucleus sampling with
    the rows' draws for ``step`` (generated tokens so far: an int, or a 0-dim device tensor);
    ``sure_rows_first``: see :func:`sample_nucleus`."""
    logits = penalise_repeats(logits, seqs, settings.repetition_penalty)
    allow_eos = step >= settings.min_length
    logits = block_specials(model, logits, allow_eos)
    if settings.method == "greedy":
        return logits.argmax(-1)
    scaled = logits / max(settings.temperature, 1e-6)
    return sample_nucleus(scaled, settings.top_p, seeds, step, sure_rows_first)


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


def decoder_step(
    model,
    ids: torch.Tensor,
    cross_kv: CrossKV,
    cache: KVCache | StaticKVCache,
    compiled: bool = False,
) -> torch.Tensor:
    """Logits [B, vocab] (float32) of the last position after feeding ``ids`` (the new tokens)."""
    out = _decoder(model, compiled)(input_ids=ids, cross_kv=cross_kv, cache=cache, last_only=True)
    return out.logits[:, -1, :].float()
