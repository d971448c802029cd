"""``capfilt caption``: synthetic captions for every image of the input shards (SPEC §3 step 3).

    capfilt caption demo --model runs/captioner --shards data/web --out data/web_captioned
    torchrun --nproc_per_node 4 -m capfilt caption demo --model ... --shards ... --out ...

Output shard i holds input shard i's samples with every field unchanged and the synthetic
captions appended to the json's ``captions`` (origin ``synthetic``, the captioner's id).
Ranks split the input shards (``shards[rank::world]``) and the sampling seed depends only on
(seed, shard, batch), so the output is the same whatever the world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from capfilt.config import CaptionConfig, config_hash, to_dict
from capfilt.data.reader import SkipCounter, read_samples
from capfilt.data.shards import expand_shards, shard_sizes
from capfilt.data.stage import StageResult, run_shard_stage
from capfilt.data.transforms import EvalTransform
from capfilt.data.writer import ShardWriter
from capfilt.model.generate import GenerationSettings, generate_captions
from capfilt.pipeline.common import batched, inference_autocast, load_stage_model, model_fingerprint
from capfilt.utils.dist import default_device, init_distributed
from capfilt.utils.logging import get_logger

log = get_logger("caption")


def caption_shards(model_path: str | Path, shards: list[str], out_dir: str | Path, cfg: CaptionConfig) -> StageResult:
    """Caption every image of ``shards`` into ``out_dir``; resumable and rank-split."""
    dist = init_distributed()
    device = default_device()
    urls = expand_shards(shards)
    model, tokenizer, mcfg, meta, folder = load_stage_model(model_path, device)
    if meta.get("stage") not in ("captioner", "pretrain", "imported"):
        log.warning("model %s was made by stage '%s', not a captioner", folder, meta.get("stage"))
    captioner_id = f"{meta.get('stage', 'model')}-{model_fingerprint(folder)}"
    settings = GenerationSettings.from_config(cfg)
    transform = EvalTransform(mcfg.image_size)
    chash = config_hash({"stage": "caption", "model": captioner_id, "caption": to_dict(cfg), "inputs": urls})

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        counter = SkipCounter("caption")
        samples = read_samples([urls[index]], counter, require_caption=False)
        n_captions = 0
        for batch_index, batch in enumerate(batched(samples, cfg.batch_size)):
            images = torch.stack([transform(s.image) for s in batch]).to(device)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index * 10_007 + batch_index)
            with inference_autocast(device):
                captions = generate_captions(model, tokenizer, images, settings, cfg.num_captions, generator)
            for sample, texts in zip(batch, captions):
                entries = [{"text": t, "origin": "synthetic", "model": captioner_id} for t in texts if t]
                meta_out = dict(sample.meta)
                meta_out.setdefault("uid", sample.key)
                meta_out["captions"] = list(sample.captions) + entries
                out = {"__key__": sample.key, sample.image_ext: sample.image_bytes, "json": meta_out, **sample.extra}
                out["txt"] = sample.text if sample.text else (entries[0]["text"] if entries else "")
                writer.write(out)
                writer.record({"uid": sample.key, "status": "kept", "reason": "", "n_synthetic": len(entries), "synthetic": [e["text"] for e in entries]})
                n_captions += len(entries)
        for reason, count in counter.counts.items():
            writer.skipped[reason] += count
        return {"input_shard": urls[index], "captioner": captioner_id, "synthetic_captions": n_captions}

    sizes = shard_sizes(urls)
    known = None if any(s is None for s in sizes) else [int(s) for s in sizes]  # type: ignore[arg-type]
    return run_shard_stage(out_dir, len(urls), produce, stage="caption", config_hash=chash, samples_per_shard=known, dist=dist, desc="caption")
