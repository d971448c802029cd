"""Image–text retrieval evaluation in the BLIP / ALBEF scheme (docs/architecture.md §4).

    metrics = evaluate_retrieval("runs/pretrain", ["data/test"], k=256)

1. :func:`compute_features`: ITC features of every test image and every one of its captions
   (the sample's ``captions`` but synthetic ones, cleaned like training captions), plus the ViT
   tokens of each image (kept on the CPU) and the token ids of each text, for the ITM re-rank.
2. :func:`retrieval_scores`: S = image_feat @ text_feat.T (cosine). For each image the top-k texts
   by S are scored by the ITM encoder and get ``itm_logit[1] + S`` (the raw match logit, no
   softmax; BLIP's score, ``rerank_score="blip"``), ``itm_logit[1] − itm_logit[0] + S / temp``
   (``"log_odds"``: ITM log-odds + ITC logit) or ``log softmax(itm_logit)[1] + S / temp``
   (``"log_prob"``: ITM log-probability of a match + ITC logit); the same for each text over the
   images. ``k = 0``
   ranks by S alone; ``k >= N`` is the exhaustive re-rank. S is computed ``chunk_size`` rows at a
   time, and per query only the ranked head is stored (:class:`Ranking`), so memory is
   O(chunk · N + N · max(k, 10)), not O(N²).
   Under ``torchrun`` the queries are split into contiguous blocks over the ranks and the
   rankings all-gathered (as BLIP: every rank computes all features, the ITM work is split).
3. :func:`recall_at_k`: text retrieval (image→text; an image counts as retrieved when ANY of its
   captions is in the top K) and image retrieval (text→image) R@1/5/10 and their means, in percent.

BLIP fills every entry outside the re-ranked top-k with −100 (:meth:`Ranking.dense` reproduces
that matrix). Those entries tie, so BLIP's R@10 with k < 10 depends on the sort's tie order; here
they keep their ITC order behind the re-ranked head instead. For k >= 10 the metrics are the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from capfilt.config import RERANK_SCORES
from capfilt.data.loader import ShardImages
from capfilt.data.reader import Sample, SkipCounter
from capfilt.data.sample import reference_texts
from capfilt.data.shards import expand_shards
from capfilt.data.text import clean_caption
from capfilt.data.transforms import eval_transform_for
from capfilt.data.workers import start_worker_server
from capfilt.model import length_chunks, tokenize
from capfilt.utils.device import autocast, to_device
from capfilt.utils.dist import current_dist_info
from capfilt.utils.logging import get_logger
from capfilt.utils.progress import ProgressReporter

log = get_logger("eval.retrieval")

RECALL_KS = (1, 5, 10)
"""The K of the reported R@K."""

METRIC_KEYS = (
    "tr_r1",
    "tr_r5",
    "tr_r10",
    "ir_r1",
    "ir_r5",
    "ir_r10",
    "tr_mean",
    "ir_mean",
    "r_mean",
)
"""Keys of :func:`recall_at_k`'s result, in report order."""

NOT_RERANKED = -100.0
"""Score BLIP gives the entries outside the ITM-re-ranked top-k (below any cosine + ITM logit in practice)."""

DEFAULT_CHUNK = 256
"""Query rows per similarity block: a [256, N] float block is 100 MB at N = 100k candidates."""


# --------------------------------------------------------------------------- features
@dataclass
class RetrievalFeatures:
    """Everything retrieval needs about a test set, on the CPU.

    ``image_embeds``, ``text_ids`` and ``text_mask`` are only needed for the ITM re-rank (k > 0);
    hand-built features for an ITC-only evaluation may leave them ``None``.
    """

    image_feat: torch.Tensor
    """[N_img, E] normalised ITC image features (float32)."""
    text_feat: torch.Tensor
    """[N_txt, E] normalised ITC text features (float32)."""
    txt2img: torch.Tensor
    """[N_txt] long: index of the image each text describes."""
    image_embeds: torch.Tensor | None = None
    """[N_img, tokens, vision_width] ViT output ([CLS] first); float16 when computed on a GPU."""
    text_ids: torch.Tensor | None = None
    """[N_txt, L] token ids ([CLS] ... [SEP]), padded with the pad id."""
    text_mask: torch.Tensor | None = None
    """[N_txt, L] attention mask of ``text_ids``."""
    image_keys: list[str] = field(default_factory=list)
    """Sample key of each image."""
    texts: list[str] = field(default_factory=list)
    """The cleaned caption of each text."""

    def __post_init__(self) -> None:
        self.txt2img = torch.as_tensor(self.txt2img, dtype=torch.long)
        if self.txt2img.shape != (self.text_feat.shape[0],):
            raise ValueError(
                f"txt2img: expected {self.text_feat.shape[0]} entries, got {tuple(self.txt2img.shape)}"
            )
        if self.n_texts and (
            int(self.txt2img.min()) < 0 or int(self.txt2img.max()) >= self.n_images
        ):
            raise ValueError("txt2img: image index out of range")

    @property
    def n_images(self) -> int:
        return int(self.image_feat.shape[0])

    @property
    def n_texts(self) -> int:
        return int(self.text_feat.shape[0])

    @property
    def img2txt(self) -> list[list[int]]:
        """Text indices of each image."""
        out: list[list[int]] = [[] for _ in range(self.n_images)]
        for t, i in enumerate(self.txt2img.tolist()):
            out[i].append(t)
        return out


def _is_shard_spec(data: Any) -> bool:
    if isinstance(data, str | Path):
        return True
    return (
        isinstance(data, list | tuple)
        and bool(data)
        and all(isinstance(x, str | Path) for x in data)
    )


def _iter_images(
    data: Any,
    counter: SkipCounter,
    transform,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[tuple[Sample, torch.Tensor]]:
    """(sample, transformed image) of ``data`` in order; shards are decoded in ``num_workers``
    DataLoader processes (:class:`~capfilt.data.loader.ShardImages`), their batches normalised on
    ``device`` (pinned, non-blocking copies of uint8 pixels on a GPU)."""
    if not _is_shard_spec(data):
        for sample in data:
            yield sample, transform(sample.image.convert("RGB"))
        return
    specs = [str(data)] if isinstance(data, str | Path) else [str(x) for x in data]
    urls = expand_shards(specs)
    # decoded as the caption and filter stages decode (a large JPEG at a reduced scale first):
    # the model sees the same pixels here as there
    min_side = transform.image_size
    with ShardImages(
        urls, transform, batch_size, num_workers, device, min_side=min_side
    ) as shard_images:
        for index in range(len(urls)):
            for samples, images in shard_images.batches(index, counter):
                yield from zip(samples, images)


@torch.inference_mode()
def compute_features(
    model,
    tokenizer,
    data: str | Path | list[str] | Iterable[Sample],
    batch_size: int = 64,
    max_words: int | None = 30,
    device: torch.device | str | None = None,
    cache_dtype: torch.dtype | None = None,
    show_progress: bool = False,
    meta: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> RetrievalFeatures:
    """ITC features of every image of ``data`` (shard specs or decoded samples) and of every caption.

    Each image's texts are the entries of its ``captions`` (COCO-style test sets carry ~5) but
    synthetic ones (:func:`reference_texts`), cleaned with :func:`clean_caption` as in training.
    ``cache_dtype`` of the kept ViT tokens: default float16 on a GPU (its forward runs in bf16
    anyway; halves host memory), float32 on the CPU.
    ``meta``: the model folder's meta, whose saved preprocessing the images get.
    ``num_workers``: DataLoader processes decoding shard images (0 = in this process).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cache_dtype is None:
        cache_dtype = torch.float16 if device.type == "cuda" else torch.float32
    was_training = model.training
    model.eval()  # dropout off: retrieval scores must be deterministic
    transform = eval_transform_for(meta, model.cfg)
    max_len = model.cfg.max_text_len
    # every rank reads every image (the features are all-ranks'): rank 0 says what it skipped
    main = current_dist_info().is_main
    counter = SkipCounter("eval.retrieval", quiet=not main)

    image_keys: list[str] = []
    texts: list[str] = []
    txt2img: list[int] = []
    image_feats, image_embeds, text_feats, text_ids, text_masks = [], [], [], [], []
    pending_images: list[torch.Tensor] = []
    n_text_done = synthetic = 0

    def flush_images() -> None:
        images = to_device(torch.stack(pending_images), device)  # shard images: already there
        pending_images.clear()
        with autocast(device):
            embeds = model.encode_image(images)
            feat = model.image_features(embeds)
        image_embeds.append(embeds.to(cache_dtype).cpu())  # cast on the GPU: half the bytes back
        image_feats.append(feat.float().cpu())

    def flush_texts(end: int) -> None:
        nonlocal n_text_done
        batch = texts[n_text_done:end]
        ids, mask = tokenize(tokenizer, batch, max_len)
        with autocast(device):
            feat = model.encode_text_features(to_device(ids, device), to_device(mask, device))
        text_feats.append(feat.float().cpu())
        text_ids.append(ids)
        text_masks.append(mask)
        n_text_done = end

    with ProgressReporter(
        "retrieval features", unit="images", enabled=show_progress and main
    ) as progress:
        for sample, image in _iter_images(
            data, counter, transform, batch_size, num_workers, device
        ):
            refs = reference_texts(sample.captions)
            synthetic += len(sample.captions) - len(refs)
            captions = refs if sample.captions else [sample.text]
            if not captions:
                counter.skip("only_synthetic_captions", sample.url, key=sample.key)
                continue
            index = len(image_keys)
            image_keys.append(sample.key)
            pending_images.append(image)
            for caption in captions:
                texts.append(clean_caption(caption, max_words))
                txt2img.append(index)
            if len(pending_images) == batch_size:
                flush_images()
                progress.advance(batch_size)
            while len(texts) - n_text_done >= batch_size:
                flush_texts(n_text_done + batch_size)
        if pending_images:
            progress.advance(len(pending_images))
            flush_images()
        if len(texts) > n_text_done:
            flush_texts(len(texts))
    model.train(was_training)

    if synthetic and main:
        log.warning("retrieval: %d synthetic caption(s) left out of the texts", synthetic)
    if counter.total and main:
        log.warning("retrieval: skipped %d sample(s): %s", counter.total, counter.as_dict())
    if not image_keys:
        raise ValueError("no readable image-text samples in the retrieval data")

    pad_id = int(getattr(model, "special", {}).get("pad", tokenizer.pad_token_id or 0))
    length = max(ids.shape[1] for ids in text_ids)
    ids_all = torch.cat([F.pad(ids, (0, length - ids.shape[1]), value=pad_id) for ids in text_ids])
    mask_all = torch.cat([F.pad(mask, (0, length - mask.shape[1]), value=0) for mask in text_masks])
    return RetrievalFeatures(
        image_feat=torch.cat(image_feats),
        text_feat=torch.cat(text_feats),
        txt2img=torch.tensor(txt2img, dtype=torch.long),
        image_embeds=torch.cat(image_embeds),
        text_ids=ids_all,
        text_mask=mask_all,
        image_keys=image_keys,
        texts=texts,
    )


# --------------------------------------------------------------------------- rankings
@dataclass
class Ranking:
    """The ranked head of every query's candidate list.

    Row q lists candidate indices in final rank order: the ``k`` ITM-re-ranked candidates first
    (by ITM logit + cosine), then the following ones in cosine order. ``scores`` holds the final
    score of the re-ranked entries and the cosine of the rest.
    """

    indices: torch.Tensor
    """[N_query, m] long."""
    scores: torch.Tensor
    """[N_query, m] float32."""
    n_candidates: int
    """Columns of the full score matrix (m <= n_candidates)."""
    k: int
    """Leading entries of each row that were re-ranked by ITM (0 = cosine only)."""

    @classmethod
    def from_dense(cls, scores: torch.Tensor) -> Ranking:
        """Full ranking of a [N_query, N_cand] score matrix (ties: lower index first)."""
        scores = scores.float()
        order = torch.sort(scores, dim=1, descending=True, stable=True)
        return cls(order.indices, order.values, int(scores.shape[1]), int(scores.shape[1]))

    @property
    def complete(self) -> bool:
        return self.indices.shape[1] == self.n_candidates

    def dense(self) -> torch.Tensor:
        """The [N_query, N_cand] score matrix of BLIP: ITM logit + cosine where re-ranked, −100 elsewhere
        (the cosine everywhere when k = 0). Needs a complete ranking (``retrieval_scores(full=True)``)
        when k = 0; otherwise the head suffices."""
        n_query = self.indices.shape[0]
        if self.k == 0:
            if not self.complete:
                raise ValueError(
                    "dense(): a k = 0 ranking must be complete (retrieval_scores(..., full=True))"
                )
            head = self.indices.shape[1]
        else:
            head = min(self.k, self.indices.shape[1])
        out = torch.full((n_query, self.n_candidates), NOT_RERANKED, dtype=torch.float32)
        out.scatter_(1, self.indices[:, :head], self.scores[:, :head])
        return out


@dataclass
class RetrievalScores:
    """Image→text and text→image rankings of a test set."""

    i2t: Ranking
    t2i: Ranking
    k: int
    """The requested k (the effective one is min(k, candidates))."""
    itm_pairs: int = 0
    """(image, text) pairs scored by ITM, summed over ranks (each rank scores a pair once)."""
    itc_i2t: Ranking | None = None
    """With k > 0: the cosine ranking the re-rank started from (k = 0: ``i2t`` is that ranking)."""
    itc_t2i: Ranking | None = None
    """With k > 0: the same for ``t2i``."""

    def rankings(self) -> list[tuple[Ranking, str]]:
        """Every ranking held, with its direction (``i2t`` / ``t2i``)."""
        pairs = [(self.i2t, "i2t"), (self.t2i, "t2i"), (self.itc_i2t, "i2t"), (self.itc_t2i, "t2i")]
        return [(r, d) for r, d in pairs if r is not None]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(score_i2t [N_img, N_txt], score_t2i [N_txt, N_img]) as in BLIP."""
        return self.i2t.dense(), self.t2i.dense()


def _itc_head(
    query: torch.Tensor, cand: torch.Tensor, m: int, chunk_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-m candidates of each query by cosine, computed ``chunk_size`` query rows at a time.

    Returns (cosines, indices), each [N_query, m], sorted descending. A stable sort (not topk)
    so ties break by lower index, exactly as :meth:`Ranking.from_dense` does.
    """
    cand = cand.to(device, torch.float32)
    values, indices = [], []
    for start in range(0, query.shape[0], chunk_size):
        block = query[start : start + chunk_size].to(device, torch.float32) @ cand.t()
        order = torch.sort(block, dim=1, descending=True, stable=True)
        values.append(order.values[:, :m].cpu())
        indices.append(order.indices[:, :m].cpu())
    if not values:
        return torch.empty(0, m), torch.empty(0, m, dtype=torch.long)
    return torch.cat(values), torch.cat(indices)


@torch.inference_mode()
def itm_pair_logits(
    model,
    feats: RetrievalFeatures,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: ProgressReporter | None = None,
) -> torch.Tensor:
    """ITM logits [P, 2] (index 1 = match) of each (image_index[p], text_index[p]) pair, float32
    on CPU; :func:`itm_score` turns them into a re-rank score's ITM term."""
    if feats.image_embeds is None or feats.text_ids is None or feats.text_mask is None:
        raise ValueError(
            "k > 0 needs image_embeds, text_ids and text_mask in the features (compute_features)"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(image_index.numel(), 2, dtype=torch.float32)
    # images go through in blocks of batch_size: their cross-attention keys/values are projected
    # once and shared by all their pairs (~2k per image at top-k); within a block, pairs are scored
    # in order of text length, so batches of similar lengths carry little padding
    order = torch.argsort(image_index, stable=True)
    sorted_images = image_index[order]
    blocks = torch.unique_consecutive(sorted_images)
    for b_start in range(0, blocks.numel(), batch_size):
        block = blocks[b_start : b_start + batch_size]
        lo = int(torch.searchsorted(sorted_images, block[0]))
        hi = int(torch.searchsorted(sorted_images, block[-1], right=True))
        pairs = order[lo:hi]
        local = torch.searchsorted(block, image_index[pairs])  # image row within the block
        pairs_txt = text_index[pairs]
        # copies to the GPU pinned and without blocking (one from pageable memory waits for the
        # GPU); the block's logits stay there and come back in one copy
        embeds = to_device(feats.image_embeds[block], device).float()
        local = to_device(local, device)
        logits_all = torch.empty(pairs.numel(), 2, dtype=torch.float32, device=device)
        with autocast(device):
            cross_kv = model.image_cross_kv(embeds)
        for rows, width in length_chunks(feats.text_mask[pairs_txt], batch_size):
            txt = pairs_txt[rows]
            ids = to_device(feats.text_ids[txt, :width], device)
            mask = to_device(feats.text_mask[txt, :width], device)
            rows = to_device(rows, device)
            with autocast(device):
                logits = model.itm_logits(None, ids, mask, cross_kv, local[rows])
            logits_all[rows] = logits.float()
        out[pairs] = logits_all.cpu()
        if progress is not None:
            progress.advance(pairs.numel())
    model.train(was_training)
    return out


def itm_score(logits: torch.Tensor, score: str) -> torch.Tensor:
    """A re-rank score's ITM term from ITM logits [P, 2], by ``score`` (a
    :data:`~capfilt.config.RERANK_SCORES` name): ``blip`` the match logit (no softmax),
    ``log_odds`` the match minus the no-match logit (log p(match) / p(no match)), ``log_prob``
    log p(match)."""
    if score == "log_odds":
        return logits[:, 1] - logits[:, 0]
    if score == "log_prob":
        return logits.log_softmax(-1)[:, 1]
    return logits[:, 1]


def _rerank_head(
    cos: torch.Tensor, idx: torch.Tensor, itm: torch.Tensor, k: int, cos_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the first k cosines by ``itm + cos * cos_scale`` and re-sort those k entries; the
    tail keeps its cosine order."""
    if k == 0:
        return cos, idx
    final = itm.view(cos.shape[0], k) + cos[:, :k] * cos_scale
    order = torch.sort(final, dim=1, descending=True, stable=True).indices
    scores = torch.cat([torch.gather(final, 1, order), cos[:, k:]], 1)
    indices = torch.cat([torch.gather(idx[:, :k], 1, order), idx[:, k:]], 1)
    return scores, indices


def score_rows(
    model,
    feats: RetrievalFeatures,
    k: int,
    image_rows: range,
    text_rows: range,
    batch_size: int = 64,
    chunk_size: int = DEFAULT_CHUNK,
    device: torch.device | str | None = None,
    full: bool = False,
    show_progress: bool = False,
    rerank_score: str = "blip",
) -> RetrievalScores:
    """Rankings of the image queries ``image_rows`` (over all texts) and text queries ``text_rows``
    (over all images); the per-rank part of :func:`retrieval_scores`.

    A pair picked in both directions (always, when exhaustive) is scored by ITM once.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if rerank_score not in RERANK_SCORES:
        raise ValueError(
            f"rerank_score must be one of {', '.join(RERANK_SCORES)}, got {rerank_score!r}"
        )
    if device is None:
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
    device = torch.device(device)
    n_img, n_txt = feats.n_images, feats.n_texts
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    m_i2t = n_txt if full else min(n_txt, max(k_i2t, max(RECALL_KS)))
    m_t2i = n_img if full else min(n_img, max(k_t2i, max(RECALL_KS)))

    img_q = feats.image_feat[image_rows.start : image_rows.stop]
    txt_q = feats.text_feat[text_rows.start : text_rows.stop]
    cos_i2t, idx_i2t = _itc_head(img_q, feats.text_feat, m_i2t, chunk_size, device)
    cos_t2i, idx_t2i = _itc_head(txt_q, feats.image_feat, m_t2i, chunk_size, device)

    n_pairs = 0
    itm_i2t = itm_t2i = torch.empty(0)
    cos_scale = 1.0
    if k > 0:
        if model is None:
            raise ValueError("k > 0 needs a model for the ITM re-rank")
        if rerank_score != "blip":  # cosine / temperature: the logit ITC was trained with
            cos_scale = 1.0 / float(model.temp.detach())
        # pair code = image * N_txt + text, shared by both directions so each pair is scored once
        rows_img = torch.arange(image_rows.start, image_rows.stop).repeat_interleave(k_i2t)
        code_i2t = rows_img * n_txt + idx_i2t[:, :k_i2t].reshape(-1)
        rows_txt = torch.arange(text_rows.start, text_rows.stop).repeat_interleave(k_t2i)
        code_t2i = idx_t2i[:, :k_t2i].reshape(-1) * n_txt + rows_txt
        unique, inverse = torch.unique(torch.cat([code_i2t, code_t2i]), return_inverse=True)
        n_pairs = int(unique.numel())
        with ProgressReporter(
            "retrieval itm",
            total=n_pairs,
            unit="pairs",
            enabled=show_progress and current_dist_info().is_main,
        ) as progress:
            logits = itm_score(
                itm_pair_logits(
                    model, feats, unique // n_txt, unique % n_txt, batch_size, device, progress
                ),
                rerank_score,
            )
        itm_i2t, itm_t2i = logits[inverse[: code_i2t.numel()]], logits[inverse[code_i2t.numel() :]]

    s_i2t, i_i2t = _rerank_head(cos_i2t, idx_i2t, itm_i2t, k_i2t, cos_scale)
    s_t2i, i_t2i = _rerank_head(cos_t2i, idx_t2i, itm_t2i, k_t2i, cos_scale)
    scores = RetrievalScores(
        i2t=Ranking(i_i2t, s_i2t, n_txt, k_i2t),
        t2i=Ranking(i_t2i, s_t2i, n_img, k_t2i),
        k=k,
        itm_pairs=n_pairs,
    )
    if k > 0:  # the cosine heads before the re-rank (_rerank_head returns new tensors)
        scores.itc_i2t = Ranking(idx_i2t, cos_i2t, n_txt, 0)
        scores.itc_t2i = Ranking(idx_t2i, cos_t2i, n_img, 0)
    return scores


def row_block(n: int, rank: int, world: int) -> range:
    """Contiguous block of ``n`` rows handled by ``rank`` (equal blocks of ceil(n / world), last shorter)."""
    size = -(-n // world)
    return range(min(n, rank * size), min(n, (rank + 1) * size))


def _gather_rows(t: torch.Tensor, n: int, world: int, device: torch.device) -> torch.Tensor:
    """All-gather per-rank row blocks (see :func:`row_block`) into the full [n, ...] tensor."""
    if world == 1:
        return t
    from capfilt.model.distributed import all_gather_no_grad

    size = -(-n // world)
    padded = (
        F.pad(t, (0, 0, 0, size - t.shape[0])) if t.shape[0] < size else t
    )  # all_gather needs equal shapes
    # NCCL only gathers device tensors; gloo is happy with CPU ones
    return all_gather_no_grad(padded.to(device))[
        :n
    ].cpu()  # rank r's block sits at rows [r*size, (r+1)*size)


def retrieval_scores(
    model,
    feats: RetrievalFeatures,
    k: int,
    batch_size: int = 64,
    chunk_size: int = DEFAULT_CHUNK,
    device: torch.device | str | None = None,
    full: bool = False,
    show_progress: bool = False,
    rerank_score: str = "blip",
) -> RetrievalScores:
    """Rank all texts for each image and all images for each text (docs/architecture.md §4; see module doc).

    - ``k``: candidates per query re-ranked with ITM logit + cosine; 0 = cosine only; ``k >= N``
      re-ranks everything. ``model`` may be None when k = 0.
    - ``rerank_score``: ``blip`` (ITM match logit + cosine), ``log_odds`` (ITM log-odds +
      cosine / the model's ITC temperature) or ``log_prob`` (ITM log p(match) + cosine / temp).
    - ``batch_size``: (image, text) pairs per ITM forward pass.
    - ``chunk_size``: query rows per cosine block (memory: chunk_size × N floats).
    - ``full``: keep every query's whole ranking (needed for :meth:`RetrievalScores.dense`);
      otherwise only the first max(k, 10) entries, all that R@1/5/10 need.

    Under ``torch.distributed`` each rank ranks a contiguous block of the queries and the result
    is all-gathered, so every rank returns the same full rankings.
    """
    from capfilt.utils.dist import rank_and_world

    rank, world = rank_and_world()  # (0, 1) unless a process group is initialised
    if device is None:
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
    device = torch.device(device)
    part = score_rows(
        model, feats, k,
        image_rows=row_block(feats.n_images, rank, world),
        text_rows=row_block(feats.n_texts, rank, world),
        batch_size=batch_size, chunk_size=chunk_size, device=device, full=full, show_progress=show_progress,
        rerank_score=rerank_score,
    )  # fmt: skip
    if world == 1:
        return part
    import torch.distributed as torch_dist

    for ranking, direction in part.rankings():
        n = feats.n_images if direction == "i2t" else feats.n_texts
        ranking.indices = _gather_rows(ranking.indices, n, world, device)
        ranking.scores = _gather_rows(ranking.scores, n, world, device)
    pairs = torch.tensor([part.itm_pairs], dtype=torch.long, device=device)
    torch_dist.all_reduce(pairs)
    part.itm_pairs = int(pairs.item())
    return part


# --------------------------------------------------------------------------- metrics
def _first_hit(hit: torch.Tensor) -> torch.Tensor:
    """0-based rank of the first True of each row; a large value where the row has none."""
    rank = hit.int().argmax(1)  # argmax returns the first maximum
    return torch.where(hit.any(1), rank, torch.full_like(rank, torch.iinfo(torch.int32).max))


def recall_at_k(
    i2t: Ranking | torch.Tensor, t2i: Ranking | torch.Tensor, txt2img: torch.Tensor | list[int]
) -> dict[str, float]:
    """TR/IR R@1/5/10 and means, in percent.

    ``i2t``/``t2i``: rankings, or dense score matrices [N_img, N_txt] / [N_txt, N_img] (higher =
    better; ties broken by lower index). ``txt2img``: the image of each text. An image is correctly
    retrieved at K when any of its texts ranks in its top K; a text when its own image does.
    """
    i2t = i2t if isinstance(i2t, Ranking) else Ranking.from_dense(i2t)
    t2i = t2i if isinstance(t2i, Ranking) else Ranking.from_dense(t2i)
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    n_img, n_txt = i2t.indices.shape[0], t2i.indices.shape[0]
    if txt2img.numel() != n_txt or i2t.n_candidates != n_txt or t2i.n_candidates != n_img:
        raise ValueError(
            f"shapes disagree: i2t {n_img}x{i2t.n_candidates}, t2i {n_txt}x{t2i.n_candidates}, txt2img {txt2img.numel()}"
        )
    tr_rank = _first_hit(txt2img[i2t.indices] == torch.arange(n_img).unsqueeze(1))
    ir_rank = _first_hit(t2i.indices == txt2img.unsqueeze(1))
    out: dict[str, float] = {}
    for name, rank in (("tr", tr_rank), ("ir", ir_rank)):
        for kk in RECALL_KS:
            out[f"{name}_r{kk}"] = (
                # counted, then divided once: 1 of 39 as 2.564102564102564, not a float32
                # mean's 2.5641025975346565
                100.0 * int((rank < kk).sum()) / rank.numel() if rank.numel() else 0.0
            )
        out[f"{name}_mean"] = sum(out[f"{name}_r{kk}"] for kk in RECALL_KS) / len(RECALL_KS)
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return {key: out[key] for key in METRIC_KEYS}


# --------------------------------------------------------------------------- entry point
def evaluate_retrieval(
    model,
    shards: str | Path | list[str] | Iterable[Sample],
    k: int = 256,
    batch_size: int = 64,
    max_words: int | None = 30,
    device: torch.device | str | None = None,
    tokenizer=None,
    chunk_size: int = DEFAULT_CHUNK,
    show_progress: bool = False,
    meta: dict[str, Any] | None = None,
    num_workers: int = 0,
    rerank_score: str = "blip",
) -> dict[str, Any]:
    """Retrieval metrics of a model on test shards (each image with all its captions).

    ``model``: a model folder / run folder path, or a MED (then give its ``tokenizer``, and its
    folder's ``meta`` for the saved preprocessing).
    Returns the :data:`METRIC_KEYS` metrics plus ``n_images``, ``n_texts``, ``k``,
    ``rerank_score``, ``itm_pairs`` and ``seconds`` (features + ranking, model loading excluded);
    with k > 0 also ``itc``: the :data:`METRIC_KEYS` of the ITC ranking alone (the same features,
    no re-rank: what the re-rank adds is the difference).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if isinstance(model, str | Path):
        from capfilt.runs.resolve import check_heads_trained, load_stage_model
        from capfilt.utils.device import default_device
        from capfilt.utils.dist import init_distributed

        if _is_shard_spec(shards):
            start_worker_server(num_workers)  # its imports overlap the model's loading
        init_distributed(str(device) if device is not None else None)
        device = torch.device(device) if device is not None else default_device()
        model, tokenizer, _, meta, folder = load_stage_model(model, device)
        check_heads_trained(meta, folder, ("itc", "itm") if k else ("itc",), "retrieval")
    elif tokenizer is None:
        raise ValueError("evaluate_retrieval: pass the tokenizer with a model object")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    start = time.perf_counter()
    feats = compute_features(
        model,
        tokenizer,
        shards,
        batch_size,
        max_words,
        device,
        show_progress=show_progress,
        meta=meta,
        num_workers=num_workers,
    )
    scores = retrieval_scores(
        model, feats, k, batch_size, chunk_size, device, show_progress=show_progress,
        rerank_score=rerank_score,
    )  # fmt: skip
    metrics: dict[str, Any] = recall_at_k(scores.i2t, scores.t2i, feats.txt2img)
    metrics.update(
        n_images=feats.n_images,
        n_texts=feats.n_texts,
        k=k,
        rerank_score=rerank_score,
        itm_pairs=scores.itm_pairs,
        seconds=round(time.perf_counter() - start, 3),
    )
    if scores.itc_i2t is not None and scores.itc_t2i is not None:
        metrics["itc"] = recall_at_k(scores.itc_i2t, scores.itc_t2i, feats.txt2img)
    return metrics
