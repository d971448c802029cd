"""Tokenizers for the MED text stack: BERT-style uncased WordPiece plus BLIP's [DEC] and [ENC]."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from capfilt.config.schema import ModelConfig
from capfilt.model.wordpiece import learn_wordpiece_vocab

DEC_TOKEN = "[DEC]"
"""Decoder start token (the tokenizer's bos_token, as in BLIP)."""
ENC_TOKEN = "[ENC]"
"""First token of the image-grounded text encoder (an additional special token, as in BLIP)."""
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""BERT's special tokens; [PAD] gets id 0."""


def add_blip_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make sure [DEC] is the bos token and [ENC] an additional special token (no-op when present)."""
    if tokenizer.bos_token != DEC_TOKEN:
        tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    if ENC_TOKEN not in tokenizer.all_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tokenizer


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train an uncased BERT-style WordPiece tokenizer on ``texts`` (deterministic: same texts,
    same vocabulary; see :mod:`capfilt.model.wordpiece`).

    Ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the characters and learned pieces
    (``vocab_size`` in all, or fewer on a small corpus), then [DEC] and [ENC]; so
    ``len(tokenizer) <= vocab_size + 2`` unless the corpus has more distinct characters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    for text in texts:
        norm = normalizer.normalize_str(str(text))
        word_counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(norm))
    vocab = learn_wordpiece_vocab(word_counts, vocab_size, specials=BERT_SPECIALS)

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    return add_blip_tokens(tokenizer)


def load_tokenizer(path_or_hub_id: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (or a hub id, when online) and add [DEC]/[ENC] if missing."""
    from transformers import AutoTokenizer

    path = Path(path_or_hub_id)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"tokenizer: '{path_or_hub_id}' is a file; expected a tokenizer folder or a hub id"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_hub_id))
    except OSError as exc:
        raise ValueError(
            f"tokenizer: cannot load '{path_or_hub_id}' (not a tokenizer folder, and not reachable as a hub id): {exc}"
        ) from exc
    tokenizer = add_blip_tokens(tokenizer)
    check_tokenizer(tokenizer)
    return tokenizer


def build_tokenizer(
    cfg: ModelConfig, texts: Iterable[str] | None = None
) -> PreTrainedTokenizerBase:
    """``cfg.tokenizer`` set: load it; otherwise train WordPiece on ``texts`` (``cfg.vocab_size``)."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if texts is None:
        raise ValueError(
            "model.tokenizer is not set: training a tokenizer needs the training captions"
        )
    return train_wordpiece_tokenizer(texts, cfg.vocab_size)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of the tokens the model needs: pad, cls, sep, enc, dec."""
    ids = {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "enc": tokenizer.convert_tokens_to_ids(ENC_TOKEN),
        "dec": tokenizer.convert_tokens_to_ids(DEC_TOKEN),
    }
    missing = [
        k
        for k, v in ids.items()
        if v is None or (k in ("enc", "dec") and v == tokenizer.unk_token_id)
    ]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens: {', '.join(missing)}")
    return {k: int(v) for k, v in ids.items()}


def check_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """A MED tokenizer must put [CLS] first and [SEP] last and have pad/[ENC]/[DEC]."""
    ids = special_ids(tokenizer)
    probe = tokenizer("a")["input_ids"]
    if probe[0] != ids["cls"] or probe[-1] != ids["sep"]:
        raise ValueError("tokenizer must add [CLS] first and [SEP] last (a BERT-style tokenizer)")


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str] | str, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize a batch: [CLS] ... [SEP], truncated to ``max_len`` tokens (the [SEP] is kept),
    padded on the right to the longest. Returns (input_ids LongTensor [B, L], attention_mask LongTensor [B, L])."""
    if isinstance(texts, str):
        texts = [texts]
    enc = tokenizer(
        list(texts),
        padding="longest",
        padding_side="right",  # positions count from the first token, whatever the tokenizer's default
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


def length_chunks(attention_mask: torch.Tensor, rows: int) -> list[tuple[torch.Tensor, int]]:
    """Rows of a right-padded batch in order of length, ``rows`` at a time: (row ids, the chunk's
    longest length) per chunk. Fed as ``ids[r, :width]``, a chunk of texts of similar lengths
    carries little padding; the result per text is the same as in the whole padded batch (masked
    positions take no part), up to float rounding."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    return [
        (chunk, int(lengths[chunk].max()))
        for chunk in (order[start : start + rows] for start in range(0, order.numel(), rows))
    ]


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's tokens as they follow [DEC] at the start of a decoder input (no [CLS]/[SEP])."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []


def prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Tokens that the prompt takes at the start of a decoder input, the leading [DEC] included
    (BLIP: ``len(tokenizer(prompt).input_ids) - 1``), 0 without a prompt; pass it as ``prompt_len``."""
    return 1 + len(prompt_token_ids(tokenizer, prompt)) if prompt else 0


def tokenize_with_prompt(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_text_len: int, prompt: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tokenize` of ``prompt + text`` for each text, the prompt's tokens on top of
    ``max_text_len`` (BLIP: 35 tokens per text, 40 with "a picture of " for captioning): counted
    in, the prompt would cut the longest captions, and a captioner trained on them learns to stop
    mid-sentence."""
    if not prompt:
        return tokenize(tokenizer, texts, max_text_len)
    extra = len(prompt_token_ids(tokenizer, prompt))
    return tokenize(tokenizer, [prompt + t for t in texts], max_text_len + extra)


def pad_vocabulary(tokenizer: PreTrainedTokenizerFast, size: int) -> PreTrainedTokenizerFast:
    """Append ``[unusedN]`` tokens until ``len(tokenizer) == size`` (no-op when it is already as
    large). Offline benchmarks at BLIP-base size use it: the LM head's width (BERT's 30,522 ids),
    not the pieces a small corpus yields, sets the FLOPs of the captioner's last layer."""
    if size > len(tokenizer):
        tokenizer.add_tokens([f"[unused{i}]" for i in range(size - len(tokenizer))])
    return tokenizer
