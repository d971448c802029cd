"""Nucleus and greedy decoding with fixed shapes, each step replayed as one CUDA graph
(``caption.cuda_graphs``).

Why: a decoding step of a BLIP-base captioner is some 450 small kernels (operators other than
views, counted on a CPU by benchmarks/decode_step_ops.py), and on a GPU at batch 128 the host's
time launching them, not the GPU's time running them, sets the rate (docs/scaling.md). A
captured graph launches the whole step at once. Replaying it needs fixed shapes and fixed
addresses, so:

- the batch keeps its finished rows (fed [PAD], their outputs masked to [PAD]) instead of
  dropping them;
- self-attention reads a :class:`~capfilt.model.text.StaticKVCache`: all positions, masked;
- everything a step reads or writes, the step counter included, lives in buffers made once per
  (batch size, prompt length, settings) and kept with the decoder (:data:`KEEP` at most);
- a smaller batch (a shard's last) runs in a kept decoder for more rows, the rows it lacks marked
  finished from the start: no capture of its own for every shard whose last batch differs.

The step itself is the eager loop's (:func:`~capfilt.model.decoding.choose_tokens`, then the decoder
on the chosen tokens), so captions equal :func:`~capfilt.model.generate.sample_tokens`' up to float
rounding. With ``graph=False`` the same buffers run the step eagerly: how the tests compare the two
loops on a CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch

from capfilt.config import CaptionConfig
from capfilt.model.decoding import CHECK_EVERY, choose_tokens, decoder_step, trim_padding
from capfilt.model.text import CrossKV, StaticKVCache
from capfilt.utils.device import to_device

KEEP = 2
"""Captured decoders kept per model (a smaller batch runs in one for more rows). Each holds
its buffers (a copy of the batch's image keys/values among them: ~1.9 GB for 256 images at
BLIP-base, 224 px, bf16) and its graph's memory; another shape evicts the least recently used."""

WARMUP_STEPS = 2
"""Eager steps on a side stream before capture (PyTorch's recipe: lazy initialisation of cuBLAS
and the caching allocator must not happen inside a capture)."""


def _capture_autocast(device: torch.device):
    """The caller's autocast, without its cast cache: a captured cast must read the fp32 weights at
    replay, not a cached copy freed when the caller's autocast exits."""
    if not torch.is_autocast_enabled(device.type):
        return nullcontext()
    return torch.autocast(
        device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False
    )


class StaticDecoder:
    """Buffers and the one-step body of nucleus / greedy decoding for ``batch`` rows."""

    @torch.inference_mode()
    def __init__(
        self,
        model,
        settings: CaptionConfig,
        batch: int,
        prompt_len: int,
        cross_kv: CrossKV,
        graph: bool,
    ):
        k0 = cross_kv[0][0]
        device, dtype = k0.device, k0.dtype
        self.model, self.settings, self.prompt_len = model, settings, prompt_len
        self.pad, self.sep = model.special["pad"], model.special["sep"]
        cfg = model.text_decoder.config
        heads = cfg.num_attention_heads
        positions = prompt_len + settings.max_length
        shape = (cfg.num_hidden_layers, batch, heads, positions, cfg.hidden_size // heads)
        # self-attention keys/values come out of the same autocast as the images' (same dtype)
        self.cache = StaticKVCache(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        self.cross = [
            (k.new_empty(batch, *k.shape[1:]), v.new_empty(batch, *v.shape[1:]))
            for k, v in cross_kv
        ]
        self.start = torch.full((batch, prompt_len), self.pad, dtype=torch.long, device=device)
        self.seqs = torch.full((batch, positions), self.pad, dtype=torch.long, device=device)
        self.out = torch.full(
            (batch, settings.max_length), self.pad, dtype=torch.long, device=device
        )
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def _reset(self, start: torch.Tensor, cross_kv: CrossKV, seeds: torch.Tensor) -> None:
        """Load a batch of up to the decoder's rows into the buffers and run its prompt (eagerly:
        once per batch). Rows beyond the batch's repeat its first row's inputs and count as
        finished from the start: their outputs stay [PAD] and they never hold up the loop."""
        n = start.shape[0]
        for (k, v), (sk, sv) in zip(cross_kv, self.cross, strict=True):
            sk[:n].copy_(k)
            sv[:n].copy_(v)
            sk[n:].copy_(k[:1].expand_as(sk[n:]))
            sv[n:].copy_(v[:1].expand_as(sv[n:]))
        self.start[:n].copy_(start)
        self.start[n:].copy_(start[:1].expand_as(self.start[n:]))
        self.seeds.zero_()
        self.seeds[:n].copy_(seeds)
        self.seqs.fill_(self.pad)
        self.seqs[:, : self.prompt_len] = self.start
        self.out.fill_(self.pad)
        self.finished.zero_()
        self.finished[n:] = True
        self.step.zero_()
        self.cache.length.zero_()
        logits = decoder_step(self.model, self.start, self.cross, self.cache, self.settings.compile)
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)

    def _choose(self) -> torch.Tensor:
        """Choose and record the tokens [B, 1] of step ``self.step``."""
        token = choose_tokens(
            self.model, self.logits, self.seqs, self.settings, self.seeds, self.step
        )
        token = token.masked_fill(self.finished, self.pad).unsqueeze(1)
        self.out.index_copy_(1, self.step.view(1), token)
        self.seqs.index_copy_(1, (self.step + self.prompt_len).view(1), token)
        self.finished |= token.squeeze(1) == self.sep
        return token

    def _body(self) -> None:
        """One step, in place: choose the tokens of step ``self.step``, record them, feed them to
        the decoder for the next step's logits."""
        token = self._choose()
        logits = decoder_step(self.model, token, self.cross, self.cache, self.settings.compile)
        self.logits.copy_(logits)
        self.step += 1

    def _capture(self) -> None:
        device = self.seqs.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.device(device), torch.cuda.stream(side), _capture_autocast(device):
            # no further than the loop goes (its last step feeds nothing)
            for _ in range(min(WARMUP_STEPS, self.settings.max_length - 1)):
                self._body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # on the batch's device's side stream (torch's default capture stream belongs to whichever
        # device was current first); thread-local: other threads may call CUDA meanwhile
        capture = torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local")
        with torch.cuda.device(device), capture, _capture_autocast(device):
            self._body()
        self.graph = graph

    @torch.inference_mode()
    def run(self, start: torch.Tensor, cross_kv: CrossKV, seeds: torch.Tensor) -> torch.Tensor:
        """The generated ids [n, T] of one batch of n rows, at most the decoder's ([PAD] after
        [SEP]), as ``sample_tokens`` gives."""
        max_len = self.settings.max_length
        if self.use_graph and self.graph is None and max_len > 1:  # 1 step: nothing to replay
            self._reset(start, cross_kv, seeds)
            try:
                self._capture()  # its warm-up steps move the buffers on: the batch is loaded again
            except RuntimeError as err:
                raise RuntimeError(
                    f"capturing a decoding step as a CUDA graph failed: {err} "
                    "(--set caption.cuda_graphs=false decodes without graphs)"
                ) from err
        self._reset(start, cross_kv, seeds)
        for t in range(max_len):
            if t + 1 == max_len:
                self._choose()  # the last tokens: nothing to feed (nor a position past the last)
            elif self.graph is not None:
                self.graph.replay()
            else:
                self._body()
            if (t + 1) % CHECK_EVERY == 0 and t + 1 < max_len and bool(self.finished.all()):
                break
        return trim_padding(self.out[: start.shape[0]], self.pad).clone()


def _key(settings: CaptionConfig, start: torch.Tensor, cross_kv: CrossKV, graph: bool) -> tuple:
    """What a decoder is made for, but the batch size."""
    k0 = cross_kv[0][0]
    fields = ("method", "top_p", "temperature", "repetition_penalty", "min_length", "max_length")
    return (
        start.shape[1],
        tuple(k0.shape[1:]),
        k0.dtype,
        str(k0.device),
        graph,
        settings.compile,
        *(getattr(settings, f) for f in fields),
    )


def sample_tokens_static(
    model,
    start: torch.Tensor,
    settings: CaptionConfig,
    seeds: torch.Tensor,
    cross_kv: CrossKV,
    graph: bool = True,
) -> torch.Tensor:
    """:func:`~capfilt.model.generate.sample_tokens` with fixed shapes: generated ids [B, T].

    ``graph``: capture the step as a CUDA graph and replay it (CUDA tensors only); else run the
    same step eagerly. Decoders are made (and captured) per batch size and settings on first use
    and kept with the model's text decoder, outside its state dict; a batch runs in the smallest
    kept one that holds it.
    """
    if settings.method not in ("nucleus", "greedy"):
        raise ValueError(f"fixed-shape decoding is for nucleus and greedy, not {settings.method!r}")
    if graph and not start.is_cuda:
        raise ValueError("CUDA graphs need the model and the batch on a CUDA device")
    if settings.max_length <= 0:
        return start.new_zeros(start.shape[0], 0)
    kept = model.text_decoder.__dict__.setdefault("_static_decoders", OrderedDict())
    base, n = _key(settings, start, cross_kv, graph), start.shape[0]
    # the kept decoder with the fewest rows that hold this batch, else one made for it
    fits = [key for key in kept if key[0] == base and key[1] >= n]
    key = min(fits, key=lambda k: k[1]) if fits else (base, n)
    decoder = kept.pop(key, None)
    if decoder is None:
        decoder = StaticDecoder(model, settings, n, start.shape[1], cross_kv, graph)
    kept[key] = decoder  # most recently used last
    while len(kept) > KEEP:
        kept.popitem(last=False)
    return decoder.run(start, cross_kv, to_device(seeds, start.device))
