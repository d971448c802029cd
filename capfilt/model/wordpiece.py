"""Deterministic WordPiece vocabulary learning (BPE-style merges, ``##`` continuation pieces).

The ``tokenizers`` library's WordPieceTrainer is not deterministic: its alphabet order and its
choice among merges of equal count follow Rust hash-map iteration, so two trainings on the same
captions give different vocabularies (and models that cannot be compared or resumed). This
learner does the same job with every tie broken by string order: same texts, same vocabulary.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

PREFIX = "##"
"""Continuation prefix of word-internal pieces (BERT's)."""


def _merge_symbol(a: str, b: str) -> str:
    return a + (b[len(PREFIX) :] if b.startswith(PREFIX) else b)


def learn_wordpiece_vocab(
    word_counts: Counter[str] | dict[str, int],
    vocab_size: int,
    specials: Iterable[str] = (),
    min_frequency: int = 2,
) -> list[str]:
    """Vocabulary (in id order) for ``word_counts`` (normalised, pre-tokenised words).

    Starts from the specials and every character (first characters plain, others ``##``-prefixed,
    sorted), then repeatedly adds the merge of the most frequent adjacent symbol pair (ties: the
    lexicographically smallest pair) until ``vocab_size`` tokens or no pair occurs
    ``min_frequency`` times. The alphabet is always kept whole, even beyond ``vocab_size``, so
    that no seen character maps to [UNK].
    """
    vocab: list[str] = list(dict.fromkeys(specials))
    words = sorted((w, c) for w, c in word_counts.items() if w and c > 0)
    symbols = [[w[0]] + [PREFIX + ch for ch in w[1:]] for w, _ in words]
    counts = [c for _, c in words]
    known = set(vocab)
    for sym in sorted({s for seq in symbols for s in seq}):
        if sym not in known:
            vocab.append(sym)
            known.add(sym)

    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(symbols):
        for pair in zip(seq, seq[1:], strict=False):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue  # stale entry: the count changed since it was pushed
        if -neg < min_frequency:
            break
        new = _merge_symbol(*pair)
        if new not in known:
            vocab.append(new)
            known.add(new)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            seq, c = symbols[i], counts[i]
            for p in zip(seq, seq[1:], strict=False):
                pair_count[p] -= c
                touched.add(p)
            merged, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == pair:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(seq[j])
                    j += 1
            symbols[i] = merged
            for p in zip(merged, merged[1:], strict=False):
                pair_count[p] += c
                where[p].add(i)
                touched.add(p)
        pair_count.pop(pair, None)
        for p in sorted(touched):
            c = pair_count.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
            elif c <= 0:
                pair_count.pop(p, None)
    return vocab
