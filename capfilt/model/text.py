"""The MED text stack (BERT with optional cross-attention), attention through
``torch.nn.functional.scaled_dot_product_attention`` (docs/architecture.md §1).

Module and parameter names are those of transformers' ``BlipTextModel`` / ``BlipTextLMHeadModel``
(``embeddings.word_embeddings``, ``encoder.layer.{i}.attention.self.query``, ``crossattention``,
``intermediate``, ``output``, ``cls.predictions.*``), so state dicts move between capfilt,
BLIP's checkpoints and transformers unchanged, and the computation is the same up to float
rounding.

Two things transformers' classes do not offer, for inference:

- :meth:`TextModel.cross_kv`: the cross-attention keys/values of a batch of images, computed once
  and passed to every later forward pass (all texts of an image in the filter and the retrieval
  re-rank; every decoding step of a caption). ``image_index`` maps text rows to image rows, so an
  image scored against many texts has its keys/values projected once.
- :class:`KVCache`: a preallocated self-attention cache for decoding; rows can be dropped
  (:meth:`KVCache.select`) when their captions are finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

INIT_STD = 0.02
"""Std of the normal init of linear and embedding weights (BERT's ``initializer_range``)."""


@dataclass(frozen=True)
class TextConfig:
    """Dimensions of the text stack (names as BERT's config)."""

    vocab_size: int
    hidden_size: int
    encoder_hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float
    layer_norm_eps: float
    pad_token_id: int
    cross_attention: bool


@dataclass
class TextOutput:
    """What the text models return: hidden states of the last layer, and LM logits for the decoder."""

    last_hidden_state: torch.Tensor
    logits: torch.Tensor | None = None


CrossKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, cross-attention (keys, values) [B_img, heads, N_img, head_dim]."""


class KVCache:
    """Preallocated self-attention keys/values of a decoder: [layers, B, heads, max_len, head_dim].

    Allocated at the first write (so it takes the dtype autocast gives the projections); ``length``
    is the number of positions filled, the same for every row (finished rows are fed [PAD]).
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(
        self, layer: int, n_layers: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of ``layer`` and return its keys/values so far."""
        if self.k is None:
            b, h, _, d = k.shape
            shape = (n_layers, b, h, self.max_len, d)
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (finished captions leave the batch)."""
        if self.k is not None:
            self.k = self.k[:, rows]
            self.v = self.v[:, rows]


class StaticKVCache:
    """A self-attention cache whose shapes never change, for decoding steps replayed as CUDA graphs.

    ``k``/``v`` [layers, B, heads, max_len, head_dim] are given (zero-filled: positions not yet
    written are masked out, and masked weights times non-finite garbage would still be NaN);
    ``length`` is a 0-dim device tensor advanced in place, so a captured step needs no input from
    the host. Every step attends over all ``max_len`` positions with a mask of those written so
    far: the same attention as :class:`KVCache`'s up to float rounding.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.max_len = k.shape[3]
        self.length = torch.zeros((), dtype=torch.long, device=k.device)

    def write(
        self, layer: int, n_layers: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions of ``layer``; return all ``max_len`` of its keys/values."""
        where = self.length + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, where, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, where, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def mask(self, new: int) -> torch.Tensor:
        """[new, max_len] bool: new position i sees the cached positions up to its own."""
        query = self.length + torch.arange(new, device=self.k.device)
        return torch.arange(self.max_len, device=self.k.device)[None, :] <= query[:, None]


class TextSelfAttention(nn.Module):
    """``query``/``key``/``value`` projections (keys/values from ``kv_width`` inputs)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, hidden] -> [B, heads, L, head_dim]."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.key(x)), self.heads(self.value(x))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        p = self.dropout_p if self.training else 0.0
        if q.shape[2] == 1 and mask is None and q.device.type == "cpu" and not self.training:
            # a decoding step's one query: the CPU flash kernel, made for long queries, is slower
            # here than two matmuls; GPUs keep SDPA's fused kernels
            weights = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
            out = torch.matmul(weights.softmax(-1), v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
            )
        b, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim)


class TextSelfOutput(nn.Module):
    """``dense`` + dropout + residual ``LayerNorm`` after attention."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class TextAttention(nn.Module):
    """``self`` (projections) + ``output`` (BERT's attention block)."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = TextSelfAttention(cfg, kv_width)
        self.output = TextSelfOutput(cfg)


class TextIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TextOutputBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class TextLayer(nn.Module):
    """Self-attention, optional cross-attention to image tokens, feed-forward."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = TextAttention(cfg, cfg.hidden_size)
        if cfg.cross_attention:
            self.crossattention = TextAttention(cfg, cfg.encoder_hidden_size)
        self.intermediate = TextIntermediate(cfg)
        self.output = TextOutputBlock(cfg)
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden: torch.Tensor,
        self_mask: torch.Tensor | None,
        causal: bool,
        cross: tuple[torch.Tensor, torch.Tensor] | None,
        image_index: torch.Tensor | None,
        cache: KVCache | StaticKVCache | None,
        index: int,
        n_layers: int,
        first_only: bool = False,
    ) -> torch.Tensor:
        att = self.attention.self
        keys_from = hidden
        if first_only:  # only token 0's output is wanted: it alone queries (all tokens are keys)
            hidden = hidden[:, :1]
        q = att.heads(att.query(hidden))
        k, v = att.project_kv(keys_from)
        if isinstance(cache, StaticKVCache):  # fixed shapes: a mask says what is written
            self_mask, causal = cache.mask(q.shape[2]), False
            k, v = cache.write(index, n_layers, k, v)
        elif cache is not None:
            # decoding: the new positions attend to everything cached before them, causally within
            # a multi-token prefix, which must start the cache (is_causal aligns query and key 0)
            # (branches, not a boolean expression: under torch.compile the lengths can be symbolic
            # and SDPA's is_causal takes a plain bool)
            if q.shape[2] > 1:
                if cache.length:
                    raise ValueError("several new tokens can only be fed to an empty cache")
            else:
                causal = False
            k, v = cache.write(index, n_layers, k, v)
        hidden = self.attention.output(att.attend(q, k, v, self_mask, causal), hidden)
        if cross is not None:
            ca = self.crossattention.self
            ck, cv = cross
            if image_index is not None:
                ck, cv = ck.index_select(0, image_index), cv.index_select(0, image_index)
            q = ca.heads(ca.query(hidden))
            hidden = self.crossattention.output(ca.attend(q, ck, cv, None, False), hidden)
        return self.output(self.intermediate(hidden), hidden)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.num_hidden_layers))


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (no token types, as BLIP)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id
        )
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """``start``: the first position (a 0-dim tensor while decoding with a static cache)."""
        length, device = input_ids.shape[1], input_ids.device
        if isinstance(start, torch.Tensor):  # read on the device: a captured step cannot sync
            pos = torch.arange(length, device=device) + start
        else:  # one kernel on the training and eager-decoding path, not two
            pos = torch.arange(start, start + length, device=device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


def init_bert(module: nn.Module) -> None:
    """BERT's init: N(0, 0.02) weights, zero biases, unit LayerNorms, zero padding row."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, INIT_STD)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, INIT_STD)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


class TextModel(nn.Module):
    """BERT encoder; with ``cfg.cross_attention`` each layer can cross-attend to image tokens."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoder(cfg)
        init_bert(self)

    def cross_kv(self, image_embeds: torch.Tensor) -> CrossKV:
        """Cross-attention keys/values of ``image_embeds`` [B_img, N, vision_width], every layer."""
        out = []
        for layer in self.encoder.layer:
            k, v = layer.crossattention.self.project_kv(image_embeds)
            # contiguous once here rather than copied by every decoding step that reads them
            out.append((k.contiguous(), v.contiguous()))
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        is_decoder: bool = False,
        cross_kv: CrossKV | None = None,
        image_index: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
        first_only: bool = False,
    ) -> TextOutput:
        """Hidden states [B, L, hidden] ([B, 1, hidden] with ``first_only``).

        - ``attention_mask`` [B, L] (1 = token, 0 = padding); None or ignored with ``cache``
          (decoding feeds no padding).
        - ``is_decoder``: causal self-attention.
        - ``encoder_hidden_states`` (image tokens) or ``cross_kv`` (from :meth:`cross_kv`): the
          image to cross-attend to; none: no cross-attention (the unimodal encoder).
        - ``image_index`` [B]: text row -> image row of ``cross_kv`` (default: row i to row i).
        - ``cache``: decoding with a self-attention cache; ``input_ids`` are the new positions.
        - ``first_only``: only the first token's final state ([CLS] / [ENC], all the ITC and ITM
          heads read): the last layer computes that row alone, the same numbers as the full pass.
        """
        if first_only and is_decoder:
            raise ValueError("first_only is for the bidirectional encoder")
        if encoder_hidden_states is not None and cross_kv is None:
            cross_kv = self.cross_kv(encoder_hidden_states)
        start = cache.length if cache is not None else 0
        hidden = self.embeddings(input_ids, start)
        mask = None
        if attention_mask is not None and cache is None:
            keep = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
            if is_decoder:
                length = input_ids.shape[1]
                causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
                keep = keep & causal
            mask = keep
        causal = is_decoder and mask is None
        layers = self.encoder.layer
        for i, layer in enumerate(layers):
            cross = cross_kv[i] if cross_kv is not None else None
            last = first_only and i == len(layers) - 1
            args = (hidden, mask, causal, cross, image_index, cache, i, len(layers), last)
            if layer.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden = layer(*args)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return TextOutput(hidden)


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class LMPrediction(nn.Module):
    """``transform`` then ``decoder`` (tied to the word embeddings by the MED); ``bias`` is the
    decoder's bias (both names appear in the state dict, as in BERT)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = self.decoder.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class LMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = LMPrediction(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class TextLMHeadModel(nn.Module):
    """The decoder: ``bert`` (a causal :class:`TextModel`) + ``cls`` (LM head)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.bert = TextModel(cfg)
        self.cls = LMHead(cfg)
        init_bert(self.cls)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_kv: CrossKV | None = None,
        image_index: torch.Tensor | None = None,
        cache: KVCache | StaticKVCache | None = None,
        last_only: bool = False,
    ) -> TextOutput:
        """Causal decoder; ``logits`` [B, L, vocab] ([B, 1, vocab] with ``last_only``)."""
        hidden = self.bert(
            input_ids,
            attention_mask,
            encoder_hidden_states,
            is_decoder=True,
            cross_kv=cross_kv,
            image_index=image_index,
            cache=cache,
        ).last_hidden_state
        if last_only:
            hidden = hidden[:, -1:]
        return TextOutput(hidden, self.cls(hidden))
