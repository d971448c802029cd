"""Evaluations of the CapFilt stages: the captioner on test shards, the filter from its score tables.

capfilt eval caption --model runs/captioner --shards data/test
capfilt eval filter --scores data/web_filtered
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from capfilt.config import CaptionConfig
from capfilt.data.reader import Sample, SkipCounter, read_samples
from capfilt.data.sample import reference_texts
from capfilt.data.shards import expand_shards
from capfilt.data.transforms import eval_transform_for
from capfilt.eval.caption_metrics import (
    CAPTION_METRICS_MISSING,
    caption_metrics_available,
    score_captions,
)
from capfilt.eval.filter_metrics import filter_report, load_score_tables, with_truth
from capfilt.model.decoding import row_seeds
from capfilt.model.generate import generate_captions
from capfilt.runs.resolve import check_heads_trained, load_stage_model
from capfilt.utils.device import autocast, default_device
from capfilt.utils.dist import all_gather_objects, init_distributed
from capfilt.utils.iters import batched
from capfilt.utils.logging import get_logger

log = get_logger("eval")


def _scene_of(meta: dict[str, Any]) -> dict | None:
    truth = meta.get("truth")
    return truth.get("scene") if isinstance(truth, dict) else None


METHOD_FIGURES = ("truth_rate", "bleu4", "cider")
"""What ``by_method`` keeps of each decoder's result."""


def evaluate_captioner(
    model_path: str | Path,
    shards: list[str],
    cfg: CaptionConfig,
    metrics: tuple[str, ...] = ("bleu", "cider", "rouge"),
    max_images: int | None = None,
    also: Sequence[str] = (),
    metrics_required: bool = True,
) -> dict[str, Any]:
    """Caption every test image once and score against its reference captions (BLEU, CIDEr-D, ...).

    On the built-in benchmark (samples carrying ``truth.scene``) it also reports the fraction of
    captions that are true of their scene, by the exact checker. ``also``: other decoding methods
    (``caption.method`` values) run on the same images by the same loaded model; with any,
    ``by_method`` maps ``cfg.method`` and each of them to its :data:`METHOD_FIGURES`.
    ``metrics_required=False`` (a run's closing evaluation): without pycocoevalcap the metrics are
    left out, said in ``notes``, instead of failing what was asked besides them.
    """
    from capfilt.data.synth import check_caption

    dist = init_distributed()
    device = default_device()
    model, tokenizer, mcfg, meta, folder = load_stage_model(model_path, device)
    check_heads_trained(meta, folder, ("lm",), "captioning")
    transform = eval_transform_for(meta, mcfg)
    settings = {cfg.method: cfg}
    settings.update({m: replace(cfg, method=m) for m in also if m != cfg.method})
    counter = SkipCounter("eval-caption")
    urls = expand_shards(shards)
    # under torchrun each rank captions its share of the shards (row seeds come from the sample
    # keys, so a caption does not depend on which rank or batch made it); a cap on the images
    # counts from the first shard, so then every rank captions those
    split = dist.distributed and max_images is None
    mine = list(range(dist.rank, len(urls), dist.world_size)) if split else list(range(len(urls)))
    shard_of = {urls[i]: i for i in mine}
    rows: list[tuple[int, str, list[str], dict[str, str], dict[str, bool | None]]] = []
    """(shard index, key, references, caption per method, true of its scene per method)."""
    synthetic = 0

    def with_references(samples: Iterable[Sample]) -> Iterator[tuple[Sample, list[str]]]:
        nonlocal synthetic
        for sample in samples:
            refs = reference_texts(sample.captions)
            synthetic += len(sample.captions) - len(refs)
            if refs:
                yield sample, refs
            else:  # captioned where nothing else described it: nothing to score against
                counter.skip("only_synthetic_captions", sample.url, key=sample.key)

    # decoded as the caption stage decodes: the same pixels, so the same captions
    mine_urls = [urls[i] for i in mine]
    samples = with_references(read_samples(mine_urls, counter, min_side=transform.image_size))
    for index, batch in enumerate(batched(samples, cfg.batch_size)):
        if max_images is not None and index * cfg.batch_size >= max_images:
            break
        images = torch.stack([transform(s.image) for s, _ in batch]).to(device)
        seeds = row_seeds(cfg.seed, [s.key for s, _ in batch])
        made: list[dict[str, str]] = [{} for _ in batch]
        for method, method_cfg in settings.items():
            with autocast(device):
                captions = generate_captions(model, tokenizer, images, method_cfg, 1, seeds)
            for row, (caption,) in zip(made, captions):
                row[method] = caption
        for (sample, refs), by_method in zip(batch, made):
            scene = _scene_of(sample.meta)
            verdicts = {
                m: None if scene is None else bool(check_caption(c, scene)["true"])
                for m, c in by_method.items()
            }
            rows.append((shard_of[sample.url], sample.key, refs, by_method, verdicts))
    skipped = counter.as_dict()
    if split:  # every rank's rows in shard order: the order one process reads them in
        shares = all_gather_objects((rows, skipped, synthetic))
        rows = sorted((r for share, _, _ in shares for r in share), key=lambda r: r[0])
        skipped = dict(sorted(sum((Counter(s) for _, s, _ in shares), Counter()).items()))
        synthetic = sum(n for _, _, n in shares)
    if synthetic and dist.is_main:
        log.warning("eval caption: %d synthetic caption(s) left out of the references", synthetic)
    predictions: dict[str, dict[str, str]] = {m: {} for m in settings}
    references: dict[str, list[str]] = {}
    found: dict[str, list[bool]] = {m: [] for m in settings}
    for _, key, refs, by_method, verdicts in rows:
        references[key] = refs
        for method, caption in by_method.items():
            predictions[method][key] = caption
            if verdicts[method] is not None:
                found[method].append(verdicts[method])
    if not references:
        raise ValueError("no test images with captions found in the given shards")
    results = {}
    scored = metrics_required or caption_metrics_available()
    for method in settings:
        if scored:
            result = score_captions(predictions[method], references, metrics=metrics)
        else:
            n = len(predictions[method])
            result = {"n_images": n, "notes": [CAPTION_METRICS_MISSING]}
        result["method"] = method
        true = found[method]
        result["truth_rate"] = sum(true) / len(true) if true else None
        results[method] = result
    result = results[cfg.method]
    result["skipped"] = skipped
    result["examples"] = [
        {"uid": k, "caption": v, "references": references[k][:2]}
        for k, v in list(predictions[cfg.method].items())[:10]
    ]
    if also:
        result["by_method"] = {m: {k: r.get(k) for k in METHOD_FIGURES} for m, r in results.items()}
    return result


def synthetic_truth(table: pd.DataFrame) -> pd.Series:
    """For synthetic captions of benchmark images: is the caption true of the stored scene."""
    from capfilt.data.synth import caption_is_true

    def judge(row) -> bool | None:
        if row.get("origin") != "synthetic" or not isinstance(row.get("truth_json"), str):
            return None
        scene = json.loads(row["truth_json"]).get("scene")
        return None if scene is None else bool(caption_is_true(row["text"], scene))

    return table.apply(judge, axis=1)


def evaluate_filter(
    scores: str | Path,
    threshold: float,
    redecide: bool = False,
    rule: dict[str, Any] | None = None,
    truth: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Filter metrics from the per-text parquet of ``capfilt filter`` (a file or a folder).

    ``truth``: hand labels (``filter_metrics.load_truth``) judging the web texts in place of any
    truth the table stores.

    ``rule``: the filter's rule (``filter_metrics.keep_rule``; None: ITM above ``threshold``).
    ``redecide``: judge by the rule instead of the decisions the filter stored (a threshold
    asked for explicitly).

    Web texts: precision/recall/F1 of rejecting noisy texts, ROC AUC, sweep, per noise kind
    (needs the benchmark's truth). Synthetic captions on the benchmark: the same figures with
    "noisy" = not true of the scene (exact checker), under ``synthetic``.
    """
    table = load_score_tables(scores).rename(columns={"itm_score": "score"})
    if redecide:
        table = table.drop(columns=["kept"], errors="ignore")
    if truth is not None:
        table = with_truth(table, truth)
    report = filter_report(table, threshold, rule=rule)
    if "truth_json" in table.columns:
        synthetic = table[table["origin"] == "synthetic"].copy()
        if len(synthetic):
            truth = synthetic_truth(synthetic)
            synthetic = synthetic[truth.notna()].copy()
            synthetic["clean"] = truth[truth.notna()].astype(bool)
            synthetic["noise"] = synthetic["clean"].map({True: "none", False: "false_caption"})
            synthetic["origin"] = "web"  # scored with the same rules as web texts
            if len(synthetic):
                sub = filter_report(synthetic, threshold, rule=rule)
                report["synthetic"] = {
                    k: sub.get(k)
                    for k in ("precision", "recall", "f1", "auc", "n_truth", "n_noisy")
                }
                report["synthetic"]["true_fraction"] = float(synthetic["clean"].mean())
    return report
