"""``capfilt filter``: keep the web and synthetic texts the ITM head accepts (BLIP's filter).

    capfilt filter demo --model runs/filter --shards data/web_captioned --out data/web_filtered --threshold 0.5

Every web and synthetic text of an image is scored against it with ``softmax(itm)[1]`` (one
image-encoder pass per image, all its texts in one batch) and its ITC cosine. A text is kept
when its score is above the threshold; human texts are kept as they are. An image survives
when any text survives. Per shard, the parquet has one row per *text* (score, cosine, origin,
decision), so ``--threshold`` can be re-applied later without the model
(:func:`rethreshold_shards`). A ``summary.json`` gives kept fractions and score histograms.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from capfilt.config import ConfigError, FilterConfig, config_hash, to_dict
from capfilt.data.loader import image_batches
from capfilt.data.reader import Sample, SkipCounter, read_samples
from capfilt.data.sample import output_sample
from capfilt.data.shards import expand_shards, shard_sizes
from capfilt.data.stage import StageResult, run_shard_stage
from capfilt.data.transforms import eval_transform_for
from capfilt.data.writer import ShardWriter, parquet_path, stats_path
from capfilt.eval.filter_metrics import HIST_BINS, score_histogram
from capfilt.model import tokenize
from capfilt.runs.resolve import load_stage_model, model_fingerprint
from capfilt.utils.device import autocast, default_device
from capfilt.utils.dist import current_dist_info, init_distributed
from capfilt.utils.files import atomic_write_json
from capfilt.utils.iters import batched
from capfilt.utils.logging import get_logger

log = get_logger("filter")

FILTERED_ORIGINS = ("web", "synthetic")
"""Origins the filter judges; human-annotated texts pass untouched (BLIP filters web and synthetic only)."""


@torch.no_grad()
def score_pairs(
    model,
    tokenizer,
    images: torch.Tensor,
    image_index: torch.Tensor,
    texts: list[str],
    max_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM match probability and ITC cosine of each (image[image_index[j]], texts[j]) pair.

    Each image is encoded, and its cross-attention keys/values projected, once for all its texts."""
    image_embeds = model.encode_image(images)
    image_feat = model.image_features(image_embeds)
    ids, mask = tokenize(tokenizer, texts, max_len)
    ids, mask = ids.to(images.device), mask.to(images.device)
    cross_kv = model.image_cross_kv(image_embeds)
    itm = model.itm_logits(None, ids, mask, cross_kv, image_index).float().softmax(-1)[:, 1]
    text_feat = model.text_features(model.encode_text(ids, mask, first_only=True))
    cosine = (image_feat[image_index].float() * text_feat.float()).sum(-1)
    return itm.cpu(), cosine.cpu()


def _settings_of(cfg) -> dict[str, Any]:
    """The settings that change the output (not ``num_workers``): what the config hash covers."""
    return {k: v for k, v in to_dict(cfg).items() if k != "num_workers"}


def _truth_columns(sample: Sample, entry: dict[str, Any]) -> dict[str, Any]:
    """Ground truth of a benchmark sample, carried into the parquet for ``capfilt eval filter``."""
    truth = sample.meta.get("truth")
    if not isinstance(truth, dict):
        return {}
    row: dict[str, Any] = {"truth_json": json.dumps(truth, sort_keys=True)}
    if entry.get("origin") == "web":
        row["clean"] = truth.get("clean")
        row["noise"] = truth.get("noise")
    return row


def is_kept(entry: dict[str, Any], threshold: float) -> bool:
    """The filter's rule: web and synthetic texts need ``score > threshold``; others always stay."""
    return entry.get("origin") not in FILTERED_ORIGINS or entry["itm_score"] > threshold


def filter_shards(
    model_path: str | Path, shards: list[str], out_dir: str | Path, cfg: FilterConfig
) -> StageResult:
    """Score and filter every text of ``shards`` into ``out_dir``; resumable and rank-split."""
    init_distributed()
    device = default_device()
    urls = expand_shards(shards)
    model, tokenizer, mcfg, meta, folder = load_stage_model(model_path, device)
    filter_id = f"{meta.get('stage', 'model')}-{model_fingerprint(folder)}"
    transform = eval_transform_for(meta, mcfg)
    chash = config_hash(
        {"stage": "filter", "model": filter_id, "filter": _settings_of(cfg), "inputs": urls}
    )
    info = {"model": filter_id, "threshold": cfg.threshold}

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        counter = SkipCounter("filter")
        for batch, images in image_batches(
            urls[index], transform, cfg.batch_size, counter, cfg.num_workers, device
        ):
            pairs = [(i, c) for i, s in enumerate(batch) for c in s.captions]
            image_index = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
            with autocast(device):
                itm, cosine = score_pairs(
                    model,
                    tokenizer,
                    images,
                    image_index,
                    [c["text"] for _, c in pairs],
                    mcfg.max_text_len,
                )
            scored: list[list[dict]] = [[] for _ in batch]
            for (i, caption), score, cos in zip(pairs, itm.tolist(), cosine.tolist()):
                scored[i].append(
                    {**caption, "itm_score": round(score, 6), "itc_cosine": round(cos, 6)}
                )
            _write_batch(writer, batch, scored, cfg.threshold, info)
        writer.add_skipped(counter.counts)
        return {"input_shard": urls[index], "filter": filter_id, "threshold": cfg.threshold}

    return _run(out_dir, urls, produce, chash)


def _write_batch(
    writer: ShardWriter, batch: list[Sample], scored: list[list[dict]], threshold: float, info: dict
) -> None:
    for sample, entries in zip(batch, scored):
        decisions = [is_kept(entry, threshold) for entry in entries]
        kept = [e for e, keep in zip(entries, decisions) if keep]
        rejected = [e for e, keep in zip(entries, decisions) if not keep]
        for position, (entry, keep) in enumerate(zip(entries, decisions)):
            writer.record(
                {
                    "uid": sample.key,
                    "text_index": position,
                    "origin": entry.get("origin"),
                    "text": entry["text"],
                    "itm_score": entry["itm_score"],
                    "itc_cosine": entry.get("itc_cosine"),
                    "kept": keep,
                    **_truth_columns(sample, entry),
                }
            )
        if kept:
            writer.write(
                output_sample(sample, kept, kept[0]["text"], filter={**info, "rejected": rejected})
            )
        else:
            writer.drop("no_text_kept")


def _run(out_dir, urls: list[str], produce: Callable, chash: str) -> StageResult:
    sizes = shard_sizes(urls)
    known = None if any(s is None for s in sizes) else [int(s) for s in sizes]  # type: ignore[arg-type]
    result = run_shard_stage(
        out_dir,
        len(urls),
        produce,
        stage="filter",
        config_hash=chash,
        samples_per_shard=known,
        desc="filter",
    )
    if current_dist_info().is_main:
        atomic_write_json(
            Path(out_dir) / "summary.json", summarize(Path(out_dir), n_shards=len(urls))
        )
    return result


def rethreshold_shards(
    scores_from: str | Path, shards: list[str], out_dir: str | Path, threshold: float
) -> StageResult:
    """Re-apply a threshold to the scores of an earlier ``capfilt filter`` run, without the model.

    ``scores_from`` is that run's output folder (its per-shard parquet); ``shards`` are the same
    input shards it read (the images come from there).
    """
    scores_from = Path(scores_from)
    urls = expand_shards(shards)
    tables = {}
    for index in range(len(urls)):
        path = parquet_path(scores_from, index)
        if not path.is_file():
            raise ConfigError(
                f"{path} missing: --scores-from must be the output of a filter run over the same --shards"
            )
        tables[index] = path
    first = stats_path(scores_from, 0)
    previous = json.loads(first.read_text()) if first.is_file() else {}
    info = {
        "model": previous.get("filter", "unknown"),
        "threshold": threshold,
        "rescored_from": str(scores_from),
    }
    chash = config_hash(
        {
            "stage": "filter-rethreshold",
            "threshold": threshold,
            "scores_from": str(scores_from.resolve()),
            "inputs": urls,
        }
    )

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        table = pd.read_parquet(tables[index])
        # a shard whose every input sample was bad has a parquet without rows (and columns)
        by_uid = (
            {uid: rows.sort_values("text_index") for uid, rows in table.groupby("uid", sort=False)}
            if len(table)
            else {}
        )
        counter = SkipCounter("filter")
        for batch in batched(read_samples([urls[index]], counter), 256):
            scored = []
            for sample in batch:
                rows = by_uid.get(sample.key)
                if rows is None or len(rows) != len(sample.captions):
                    raise ConfigError(
                        f"scores for {sample.key} do not match its captions: was --scores-from made from these shards?"
                    )
                scored.append(
                    [
                        {**c, "itm_score": float(r.itm_score), "itc_cosine": float(r.itc_cosine)}
                        for c, r in zip(sample.captions, rows.itertuples())
                    ]
                )
            _write_batch(writer, batch, scored, threshold, info)
        writer.add_skipped(counter.counts)
        return {"input_shard": urls[index], "filter": info["model"], "threshold": threshold}

    return _run(out_dir, urls, produce, chash)


def summarize(out_dir: Path, n_shards: int | None = None) -> dict[str, Any]:
    """Kept fractions of web vs synthetic texts and ITM score histograms (kept / rejected) per origin."""
    if n_shards is None:
        names = sorted(out_dir.glob("*.parquet"))
    else:
        names = [p for p in (parquet_path(out_dir, i) for i in range(n_shards)) if p.is_file()]
    if not names:
        return {"texts": 0}
    table = pd.concat([pd.read_parquet(p) for p in names], ignore_index=True)
    summary: dict[str, Any] = {
        "texts": int(len(table)),
        "images": int(table["uid"].nunique()),
        "images_kept": int(table.groupby("uid")["kept"].any().sum()),
        "histogram_bins": [round(i / HIST_BINS, 2) for i in range(HIST_BINS + 1)],
        "origins": {},
    }
    for origin, rows in table.groupby("origin"):
        summary["origins"][origin] = {
            "texts": int(len(rows)),
            "kept": int(rows["kept"].sum()),
            "kept_fraction": float(rows["kept"].mean()),
            "mean_score": float(rows["itm_score"].mean()),
            "histogram_kept": score_histogram(rows.loc[rows["kept"], "itm_score"]),
            "histogram_rejected": score_histogram(rows.loc[~rows["kept"], "itm_score"]),
        }
    return summary
