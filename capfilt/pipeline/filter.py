"""``capfilt filter``: keep the web and synthetic texts the filter accepts (BLIP's filter).

    capfilt filter demo --model runs/filter --shards data/web_captioned --out data/web_filtered --threshold 0.5

Every web and synthetic text of an image is scored against it with ``softmax(itm)[1]`` (one
image-encoder pass per image, all its texts in one batch) and its ITC cosine. The keep rule
(``filter.*`` of the recipe, :class:`KeepRule`) is BLIP's ITM probability above a threshold, the
ITC cosine above a threshold (CLIP-score style), or both; either with fixed thresholds or with
thresholds set so that a fraction of the run's texts stays (a quantile over every shard's
scores: the shards are scored first, then decided). Human texts are kept as they are; a text
without an origin is judged as web alt-text, and an origin the filter does not know is judged
like web (it keeps its name in the parquet and the summary). An image survives when any text
survives. Per shard, the parquet has one row per *text* (score, cosine, origin, decision), so a
rule can be re-applied later without the model (:func:`rethreshold_shards`). A
``summary.json`` gives the rule, kept fractions and score histograms.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from capfilt.config import ConfigError, FilterConfig, config_hash, to_dict
from capfilt.config.schema import DataConfig
from capfilt.data.loader import ShardImages, loader_hint
from capfilt.data.reader import Sample, SkipCounter, read_samples
from capfilt.data.sample import output_sample
from capfilt.data.shards import expand_shards, shard_sizes
from capfilt.data.stage import LOADER_START, StageResult, check_output_folder, run_shard_stage
from capfilt.data.text import clean_caption
from capfilt.data.transforms import eval_transform_for
from capfilt.data.workers import start_worker_server
from capfilt.data.writer import ShardWriter, drop_skipped_rows, parquet_path, stats_path
from capfilt.eval.filter_metrics import HIST_BINS, score_histogram
from capfilt.model import length_chunks, tokenize
from capfilt.runs.resolve import check_heads_trained, load_identified_model, made_for
from capfilt.utils.device import autocast, default_device, to_device
from capfilt.utils.dist import barrier, current_dist_info, init_distributed
from capfilt.utils.files import atomic_write_json
from capfilt.utils.iters import batched
from capfilt.utils.logging import get_logger
from capfilt.utils.timing import PhaseClock

log = get_logger("filter")

HUMAN = "human"
"""The origin that passes unjudged (BLIP filters web and synthetic texts only, never the human
annotations); every other origin is judged."""
DEFAULT_ORIGIN = "web"
"""Origin given to a text that has none: text of unknown provenance is judged as alt-text."""


def normalize_origin(value: Any) -> str:
    """A caption's origin as the filter files it: lower case, trimmed; missing or empty → web."""
    text = str(value).strip().lower() if value is not None else ""
    return text or DEFAULT_ORIGIN


@dataclass(frozen=True)
class KeepRule:
    """The filter's decision for one text: a judged text stays when its ITM probability is above
    ``itm`` (when set) and its ITC cosine is above ``itc`` (when set)."""

    itm: float | None
    itc: float | None

    def keeps(self, entry: dict[str, Any]) -> bool:
        if normalize_origin(entry.get("origin")) == HUMAN:
            return True
        if self.itm is not None and not entry["itm_score"] > self.itm:
            return False
        return self.itc is None or entry["itc_cosine"] > self.itc

    def as_dict(self) -> dict[str, float | None]:
        return {"itm_threshold": self.itm, "itc_threshold": self.itc}


def fixed_rule(cfg: FilterConfig) -> KeepRule:
    """The rule of ``cfg``'s fixed thresholds (``keep_fraction`` left aside)."""
    return KeepRule(
        itm=cfg.threshold if cfg.rule in ("itm", "both") else None,
        itc=cfg.itc_threshold if cfg.rule in ("itc", "both") else None,
    )


def fraction_threshold(scores: Any, fraction: float) -> float:
    """The threshold t for which ``score > t`` keeps the top ``round(fraction * n)`` scores
    (fewer on ties at t)."""
    ordered = sorted((float(v) for v in scores), reverse=True)
    if not ordered:
        return 0.0
    k = round(fraction * len(ordered))
    if k >= len(ordered):
        return ordered[-1] - 1.0
    return ordered[k]


def fraction_rule(cfg: FilterConfig, table: pd.DataFrame) -> KeepRule:
    """``cfg.keep_fraction`` turned into thresholds over the judged texts of the whole run's
    score table (one quantile per score the rule uses)."""
    judged = table[table["origin"].map(normalize_origin) != HUMAN]
    base = fixed_rule(cfg)
    fraction = cfg.keep_fraction or 1.0
    return KeepRule(
        itm=None if base.itm is None else fraction_threshold(judged["itm_score"], fraction),
        itc=None if base.itc is None else fraction_threshold(judged["itc_cosine"], fraction),
    )


class PendingScores:
    """Scores a device is computing, copied back to the host without blocking: :meth:`wait`
    returns them (ITM probabilities, ITC cosines or None) once there."""

    def __init__(self, scores: torch.Tensor, with_cosine: bool):
        self.with_cosine = with_cosine
        self._ready: torch.cuda.Event | None = None
        if scores.device.type == "cuda":
            self._host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            self._host.copy_(scores, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = scores.cpu()

    def wait(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[0], self._host[1] if self.with_cosine else None


@torch.no_grad()
def score_pairs(
    model,
    tokenizer,
    images: torch.Tensor,
    image_index: torch.Tensor,
    texts: list[str],
    max_len: int,
    with_cosine: bool = True,
    chunk_rows: int = 64,
) -> PendingScores:
    """Start scoring each (image[image_index[j]], texts[j]) pair: its ITM match probability and
    its ITC cosine (None without ``with_cosine``: its text-encoder pass skipped). On a GPU this
    returns once the work is queued, with no host sync; ``.wait()`` gives the scores.

    Each image is encoded, and its cross-attention keys/values projected, once for all its texts.
    The texts go through in order of length, ``chunk_rows`` at a time, each chunk padded to its
    own longest (:func:`~capfilt.model.length_chunks`): web texts and captions differ in length,
    and at the demo's lengths half of a batch padded to its longest text was padding."""
    device = images.device
    image_embeds = model.encode_image(images)
    if not texts:
        return PendingScores(torch.empty(2, 0), with_cosine)
    ids, mask = tokenize(tokenizer, texts, max_len)  # on the host: chunking them costs no sync
    chunks = length_chunks(mask, chunk_rows)
    # one pinned, non-blocking copy each (a copy from pageable memory waits for the GPU), then
    # every chunk is cut on the device
    order = to_device(torch.cat([rows for rows, _ in chunks]), device)
    ids, mask, image_index = (to_device(t, device) for t in (ids, mask, image_index))
    cross_kv = model.image_cross_kv(image_embeds)
    image_feat = model.image_features(image_embeds) if with_cosine else None
    scores = torch.empty(2 if with_cosine else 1, len(texts), dtype=torch.float32, device=device)
    start = 0
    for chunk, width in chunks:
        rows = order[start : start + len(chunk)]
        start += len(chunk)
        chunk_ids, chunk_mask = ids[rows, :width], mask[rows, :width]
        chunk_images = image_index[rows]
        logits = model.itm_logits(None, chunk_ids, chunk_mask, cross_kv, chunk_images)
        scores[0, rows] = logits.float().softmax(-1)[:, 1]
        if with_cosine:
            text_feat = model.encode_text_features(chunk_ids, chunk_mask)
            scores[1, rows] = (image_feat[chunk_images].float() * text_feat.float()).sum(-1)
    return PendingScores(scores, with_cosine)  # one copy back for both


def _settings_of(cfg) -> dict[str, Any]:
    """The settings that change the output (not ``num_workers``): what the config hash covers."""
    settings = {k: v for k, v in to_dict(cfg).items() if k != "num_workers"}
    return {**settings, "itc_cosine": cfg.computes_cosine}


def _truth_columns(sample: Sample, entry: dict[str, Any]) -> dict[str, Any]:
    """Ground truth of a benchmark sample, carried into the parquet for ``capfilt eval filter``."""
    truth = sample.meta.get("truth")
    if not isinstance(truth, dict):
        return {}
    row: dict[str, Any] = {"truth_json": json.dumps(truth, sort_keys=True)}
    if entry.get("origin") == "web":
        row["clean"] = truth.get("clean")
        row["noise"] = truth.get("noise")
        if "terse" in truth:
            row["terse"] = truth["terse"]
    return row


def is_kept(entry: dict[str, Any], rule: KeepRule | float) -> bool:
    """The filter's rule (a bare float is BLIP's ITM threshold); human texts always stay."""
    if not isinstance(rule, KeepRule):
        rule = KeepRule(itm=float(rule), itc=None)
    return rule.keeps(entry)


SCORES_DIR = "scores"
"""Sub-folder of a filter output where a ``keep_fraction`` run keeps its scoring pass (decided by
the fixed thresholds) before the whole run's quantiles are known."""


def rule_info(cfg: FilterConfig, rule: KeepRule) -> dict[str, Any]:
    """The rule as recorded in the stats, the samples and ``summary.json``."""
    return {
        "rule": cfg.rule,
        "keep_fraction": cfg.keep_fraction,
        "threshold": rule.itm,
        "itc_threshold": rule.itc,
    }


def filter_shards(
    model_path: str | Path,
    shards: list[str],
    out_dir: str | Path,
    cfg: FilterConfig,
    max_words: int = DataConfig.max_words,
) -> StageResult:
    """Score and filter every text of ``shards`` into ``out_dir``; resumable and rank-split.

    Each text is scored as training saw its captions: :func:`clean_caption` with the recipe's
    ``data.max_words`` (``max_words``); the output keeps it as given.
    With ``cfg.keep_fraction`` the shards are scored into ``out_dir/scores`` first, then the
    whole run's quantiles decide (:func:`rethreshold_shards`)."""
    if cfg.keep_fraction is not None:
        scored_dir = Path(out_dir) / SCORES_DIR
        unfixed = replace(cfg, keep_fraction=None)
        scored = filter_shards(model_path, shards, scored_dir, unfixed, max_words)
        barrier()  # every rank's scores are needed for the quantile
        if scored.partial:
            return scored
        return rethreshold_shards(scored_dir, shards, out_dir, cfg)
    start_worker_server(cfg.num_workers)  # its imports overlap the model's loading
    init_distributed()
    device = default_device()
    urls = expand_shards(shards)
    check_output_folder(out_dir, "filter", len(urls), urls)  # before the model loads
    model, tokenizer, mcfg, meta, folder, filter_id = load_identified_model(model_path, device)
    check_heads_trained(
        meta, folder, ("itm", "itc") if cfg.computes_cosine else ("itm",), "filtering"
    )
    unfit = made_for(meta, "filtering")  # e.g. a captioner: ITM never fine-tuned
    if unfit is not None:
        log.warning("model %s was %s", folder, unfit)
    transform = eval_transform_for(meta, mcfg)
    chash = config_hash(
        {
            "stage": "filter",
            "model": filter_id,
            "filter": _settings_of(cfg),
            # how texts are scored (shards scored from raw texts, before, are scored again)
            "texts": {"clean_caption": max_words},
            "inputs": urls,
        }
    )
    rule = fixed_rule(cfg)
    info = {"model": filter_id, **rule_info(cfg, rule)}

    shard_images = ShardImages(
        urls, transform, cfg.batch_size, cfg.num_workers, device, min_side=transform.image_size
    )

    clock = PhaseClock()  # where the main process's time goes: the stage's closing line says

    def write(writer: ShardWriter, batch, pairs, pending: PendingScores) -> None:
        with clock.phase("model"):  # on a GPU: waiting for the device
            scores = pending.wait()
        with clock.phase("writing"):
            _write_batch(writer, batch, _scored(batch, pairs, scores), rule, info)

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        counter = SkipCounter("filter")
        # One batch in flight: batch k is queued on the device before batch k - 1's rows and
        # samples are written, so on a GPU the host's share (writing, the next batch's hand-over)
        # overlaps the device's instead of following it. On a CPU the order alone changes.
        previous = None
        batches = shard_images.batches(index, counter)
        for batch, images in clock.timed("images", batches, first_as=LOADER_START):
            with clock.phase("model"):
                pairs = [(i, c) for i, s in enumerate(batch) for c in s.captions]
                # on the host: the scoring copies it to the GPU without blocking
                image_index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
                with autocast(device):
                    pending = score_pairs(
                        model,
                        tokenizer,
                        images,
                        image_index,
                        # as training and retrieval see texts (docs/architecture.md §5); the
                        # output keeps each text as it was given
                        [clean_caption(c["text"], max_words) for _, c in pairs],
                        mcfg.max_text_len,
                        with_cosine=cfg.computes_cosine,
                        chunk_rows=cfg.batch_size,
                    )
            if previous is not None:
                write(writer, *previous)
            previous = batch, pairs, pending
        if previous is not None:
            write(writer, *previous)
        writer.add_skipped(counter)
        return {"input_shard": urls[index], "filter": filter_id, **rule_info(cfg, rule)}

    with shard_images:
        return _run(
            out_dir,
            urls,
            produce,
            chash,
            rule_info(cfg, rule),
            inputs=urls,
            plan=shard_images.plan,
            clock=clock,
            timing_hints={"images": loader_hint("filter", cfg.num_workers)},
        )


def _scored(
    batch: list[Sample],
    pairs: list[tuple[int, dict]],
    scores: tuple[torch.Tensor, torch.Tensor | None],
) -> list[list[dict]]:
    """Each image's captions with their ``scores`` (:meth:`PendingScores.wait`'s ITM
    probabilities and ITC cosines; ``pairs``: (image, caption) in the order scored)."""
    itm, cosine = scores
    cosines = [None] * len(pairs) if cosine is None else [round(c, 6) for c in cosine.tolist()]
    scored: list[list[dict]] = [[] for _ in batch]
    for (i, caption), score, cos in zip(pairs, itm.tolist(), cosines):
        scored[i].append(
            {
                **caption,
                "origin": normalize_origin(caption.get("origin")),
                "itm_score": round(score, 6),
                "itc_cosine": cos,
            }
        )
    return scored


def _write_batch(
    writer: ShardWriter, batch: list[Sample], scored: list[list[dict]], rule: KeepRule, info: dict
) -> None:
    for sample, entries in zip(batch, scored):
        decisions = [rule.keeps(entry) for entry in entries]
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


def _run(
    out_dir,
    urls: list[str],
    produce: Callable,
    chash: str,
    rule: dict,
    inputs: list,
    plan: Callable[[list[int]], None] | None = None,
    clock: PhaseClock | None = None,
    timing_hints: dict[str, str] | None = None,
) -> StageResult:
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
        inputs=inputs,
        plan=plan,
        clock=clock,
        timing_hints=timing_hints,
    )
    if current_dist_info().is_main:
        summary = summarize(Path(out_dir), n_shards=len(urls))
        atomic_write_json(Path(out_dir) / "summary.json", {"rule": rule, **summary})
    return result


def rethreshold_shards(
    scores_from: str | Path,
    shards: list[str],
    out_dir: str | Path,
    rule: FilterConfig | float,
) -> StageResult:
    """Re-decide from the scores of an earlier ``capfilt filter`` run, without the model.

    ``scores_from`` is that run's output folder (its per-shard parquet); ``shards`` are the same
    input shards it read (the images come from there). ``rule`` is a filter config (any rule;
    with ``keep_fraction`` the quantiles are taken over every shard's scores) or a bare ITM
    threshold.
    """
    cfg = rule if isinstance(rule, FilterConfig) else FilterConfig(threshold=float(rule))
    cfg.validate()
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
    import pyarrow.parquet as pq

    columns = set(pq.read_schema(tables[0]).names) if tables else set()
    if tables and not {"itm_score", "text_index"} <= columns and "uid" in columns:
        raise ConfigError(
            f"{scores_from} is not the output of a filter run (its parquet has no ITM scores): "
            "--scores-from takes a capfilt filter --out folder"
        )
    if cfg.rule != "itm":
        lacking = [str(p) for p in tables.values() if not _has_cosines(p)]
        if lacking:
            raise ConfigError(
                f"rule {cfg.rule} needs the ITC cosine, and {lacking[0]} has none (scored with "
                "rule itm and filter.itc_cosine not true): re-score with the model and --set "
                "filter.itc_cosine=true, or use rule itm"
            )
    if cfg.keep_fraction is not None:
        frames = [
            t for t in (drop_skipped_rows(pd.read_parquet(p)) for p in tables.values()) if len(t)
        ]
        whole = pd.concat(frames, ignore_index=True) if frames else None
        keep = fraction_rule(cfg, whole) if whole is not None else fixed_rule(cfg)
    else:
        keep = fixed_rule(cfg)
    first = stats_path(scores_from, 0)
    previous = json.loads(first.read_text()) if first.is_file() else {}
    info = {
        "model": previous.get("filter", "unknown"),
        **rule_info(cfg, keep),
        "rescored_from": str(scores_from),
    }
    chash = config_hash(
        {
            "stage": "filter-rethreshold",
            "rule": rule_info(cfg, keep),
            "scores_from": str(scores_from.resolve()),
            "inputs": urls,
        }
    )

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        table = drop_skipped_rows(pd.read_parquet(tables[index]))
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
                        {
                            **c,
                            "origin": normalize_origin(c.get("origin")),
                            "itm_score": float(r.itm_score),
                            "itc_cosine": _cosine(r.itc_cosine),
                        }
                        for c, r in zip(sample.captions, rows.itertuples())
                    ]
                )
            _write_batch(writer, batch, scored, keep, info)
        writer.add_skipped(counter)
        return {"input_shard": urls[index], "filter": info["model"], **rule_info(cfg, keep)}

    return _run(
        out_dir,
        urls,
        produce,
        chash,
        rule_info(cfg, keep),
        inputs=[[u, str(tables[i])] for i, u in enumerate(urls)],
    )


def _cosine(value: Any) -> float | None:
    """A stored ITC cosine as a float; None where the run did not compute it."""
    return None if value is None or pd.isna(value) else float(value)


def _has_cosines(parquet: Path) -> bool:
    """Whether every scored text of a filter parquet has its ITC cosine."""
    table = drop_skipped_rows(pd.read_parquet(parquet))
    if not len(table):
        return True
    return "itc_cosine" in table.columns and bool(
        pd.to_numeric(table["itc_cosine"], errors="coerce").notna().all()
    )


def _mean_or_none(values: pd.Series) -> float | None:
    """Mean of the numeric values; None where there are none (JSON has no NaN)."""
    numbers = pd.to_numeric(values, errors="coerce").dropna()
    return float(numbers.mean()) if len(numbers) else None


def summarize(out_dir: Path, n_shards: int | None = None) -> dict[str, Any]:
    """Kept fractions of web vs synthetic texts and ITM score histograms (kept / rejected) per origin."""
    if n_shards is None:
        names = sorted(out_dir.glob("*.parquet"))
    else:
        names = [p for p in (parquet_path(out_dir, i) for i in range(n_shards)) if p.is_file()]
    if not names:
        return {"texts": 0}
    table = drop_skipped_rows(pd.concat([pd.read_parquet(p) for p in names], ignore_index=True))
    if not len(table) or "uid" not in table.columns:
        return {"texts": 0}
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
            "mean_cosine": _mean_or_none(rows["itc_cosine"]),
            "histogram_kept": score_histogram(rows.loc[rows["kept"], "itm_score"]),
            "histogram_rejected": score_histogram(rows.loc[~rows["kept"], "itm_score"]),
        }
    return summary
