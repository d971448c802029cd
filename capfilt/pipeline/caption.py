"""``capfilt caption``: synthetic captions for every image of the input shards (BLIP's captioner).

    capfilt caption demo --model runs/captioner --shards data/web --out data/web_captioned
    torchrun --nproc_per_node 4 -m capfilt caption demo --model ... --shards ... --out ...

Output shard i holds input shard i's samples with every field unchanged and the synthetic
captions appended to the json's ``captions`` (origin ``synthetic``, the captioner's id).
Ranks split the input shards (``shards[rank::world]``) and each caption's random draws depend only
on (seed, sample key, caption index) (:func:`~capfilt.model.decoding.row_seeds`), so the output is
the same whatever the world size, batch size or shard split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from capfilt.config import CaptionConfig, config_hash, to_dict
from capfilt.data.loader import ShardImages, loader_hint
from capfilt.data.reader import Sample, SkipCounter
from capfilt.data.sample import output_sample
from capfilt.data.shards import REMOTE_PREFIXES, expand_shards, shard_sizes
from capfilt.data.stage import LOADER_START, StageResult, check_output_folder, run_shard_stage
from capfilt.data.transforms import eval_transform_for
from capfilt.data.workers import start_worker_server
from capfilt.data.writer import STATS_SUFFIX, ShardWriter
from capfilt.model.decoding import row_seeds
from capfilt.model.generate import generate_captions
from capfilt.runs.resolve import check_heads_trained, load_identified_model, made_for
from capfilt.utils.device import autocast, default_device
from capfilt.utils.dist import init_distributed
from capfilt.utils.logging import get_logger
from capfilt.utils.timing import PhaseClock

log = get_logger("caption")


def _settings_of(cfg) -> dict[str, Any]:
    """The settings that change the output (not ``num_workers``): what the config hash covers.
    ``cuda_graphs`` only when on: off, the output is the eager loop's, as before the setting
    existed, so shards captioned then stay done."""
    settings = {k: v for k, v in to_dict(cfg).items() if k != "num_workers"}
    if not settings.get("cuda_graphs"):
        settings.pop("cuda_graphs", None)
    return settings


def caption_shards(
    model_path: str | Path, shards: list[str], out_dir: str | Path, cfg: CaptionConfig
) -> StageResult:
    """Caption every image of ``shards`` into ``out_dir``; resumable and rank-split."""
    start_worker_server(cfg.num_workers)  # its imports overlap the model's loading
    dist = init_distributed()
    device = default_device()
    urls = expand_shards(shards)
    check_output_folder(out_dir, "caption", len(urls), urls)  # before the model loads
    model, tokenizer, mcfg, meta, folder, captioner_id = load_identified_model(model_path, device)
    check_heads_trained(meta, folder, ("lm",), "captioning")
    unfit = made_for(meta, "captioning")
    if unfit is not None:
        log.warning("model %s was %s", folder, unfit)
    transform = eval_transform_for(meta, mcfg)
    chash = config_hash(
        {"stage": "caption", "model": captioner_id, "caption": _settings_of(cfg), "inputs": urls}
    )
    _warn_if_captioned_by(urls, captioner_id)

    shard_images = ShardImages(
        urls,
        transform,
        cfg.batch_size,
        cfg.num_workers,
        device,
        require_caption=False,
        min_side=transform.image_size,
    )

    clock = PhaseClock()  # where the main process's time goes: the stage's closing line says

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        counter = SkipCounter("caption")
        n_captions = 0
        batches = shard_images.batches(index, counter)
        for batch, images in clock.timed("images", batches, first_as=LOADER_START):
            with clock.phase("model"):
                seeds = row_seeds(cfg.seed, [s.key for s in batch], cfg.num_captions)
                with autocast(device):
                    captions = generate_captions(
                        model, tokenizer, images, cfg, cfg.num_captions, seeds
                    )
            with clock.phase("writing"):
                n_captions += _write_batch(writer, batch, captions, captioner_id)
        writer.add_skipped(counter)
        return {
            "input_shard": urls[index],
            "captioner": captioner_id,
            "synthetic_captions": n_captions,
        }

    sizes = shard_sizes(urls)
    known = None if any(s is None for s in sizes) else [int(s) for s in sizes]  # type: ignore[arg-type]
    with shard_images:
        return run_shard_stage(
            out_dir,
            len(urls),
            produce,
            stage="caption",
            config_hash=chash,
            samples_per_shard=known,
            dist=dist,
            desc="caption",
            inputs=urls,
            plan=shard_images.plan,
            clock=clock,
            timing_hints={"images": loader_hint("caption", cfg.num_workers)},
        )


def _warn_if_captioned_by(urls: list[str], captioner_id: str) -> None:
    """Say so when the input is this captioner's own output (its done-markers name it): its
    samples would get a second synthetic caption from the same model."""
    for url in urls[:1]:
        if url.startswith(REMOTE_PREFIXES):
            continue
        marker_path = Path(url).with_name(Path(url).name.removesuffix(".tar") + STATS_SUFFIX)
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and marker.get("captioner") == captioner_id:
            log.warning(
                "%s was captioned by this captioner (%s) already: each sample gets a second "
                "synthetic caption from it; caption the original shards to replace them",
                Path(url).parent,
                captioner_id,
            )


def _write_batch(
    writer: ShardWriter, batch: list[Sample], captions: list[list[str]], captioner_id: str
) -> int:
    """Write a batch's samples with their new captions; the number of captions written."""
    n_captions = 0
    for sample, texts in zip(batch, captions):
        entries = [{"text": t, "origin": "synthetic", "model": captioner_id} for t in texts if t]
        txt = sample.text if sample.text else (entries[0]["text"] if entries else "")
        writer.write(output_sample(sample, list(sample.captions) + entries, txt))
        writer.record(
            {
                "uid": sample.key,
                "status": "kept",
                "reason": "",
                "n_synthetic": len(entries),
                "synthetic": [e["text"] for e in entries],
            }
        )
        n_captions += len(entries)
    return n_captions
