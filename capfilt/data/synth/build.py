"""Write the built-in benchmark: ``human/``, ``web/`` and ``test/`` shard folders plus ``synth.json``.

- ``human/``: clean images with ``captions_per_human`` distinct human captions each (COCO-like);
- ``web/``: one text per image, wrong with probability ``noise_rate`` (swap / attribute /
  generic, drawn from ``noise_mix``), like alt-text crawled from the web; a text that describes
  a scene (clean, swap or attribute) is terse (colours and shapes only) with probability
  ``web_terse_rate``, else a full caption;
- ``test/``: clean held-out images with ``captions_per_test`` reference captions each.

Every sample's json carries ``truth`` (the scene, whether its text is clean, the noise kind; for
``web/``, whether the text is terse) for
evaluation; no training stage reads it. Shard i of a split draws from its own generator keyed by
(seed, split, i), so shards are independent and a resumed run writes byte-identical files.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from capfilt.config.core import config_hash, to_dict
from capfilt.config.schema import NOISE_KINDS, SynthConfig
from capfilt.data.sample import build_sample, caption_entry, make_key
from capfilt.data.stage import run_shard_stage
from capfilt.data.synth.captions import describe, describe_distinct, noisy_text, terse
from capfilt.data.synth.render import render_jpeg
from capfilt.data.synth.world import Rng, sample_scene
from capfilt.data.writer import ShardWriter, shard_name, stats_path
from capfilt.utils.dist import barrier, current_dist_info
from capfilt.utils.files import atomic_write_json
from capfilt.utils.logging import get_logger

log = get_logger("synth")

SPLITS = ("human", "web", "test")
SPLIT_IDS = {"human": 1, "web": 2, "test": 3}
"""Part of every shard's RNG key, so the splits never share a random stream."""

GENERATOR_VERSION = 2
"""Bump when the world's output changes for the same config, so old shards are regenerated."""

_SHARD_FILE = re.compile(r"^(\d{8})(\.tar|\.parquet|_stats\.json)$")


def _split_size(cfg: SynthConfig, split: str) -> int:
    return {"human": cfg.n_human, "web": cfg.n_web, "test": cfg.n_test}[split]


def _shard_sizes(n: int, shard_size: int) -> list[int]:
    return [min(shard_size, n - start) for start in range(0, n, shard_size)]


def _produce(cfg: SynthConfig, split: str):
    """The ``produce(index, writer)`` function of one split."""
    n_total = _split_size(cfg, split)
    source = f"synth-{split}"
    kinds = [k for k in NOISE_KINDS if cfg.noise_mix.get(k, 0) > 0]
    weights = [cfg.noise_mix[k] for k in kinds]

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        rng = Rng(cfg.seed, SPLIT_IDS[split], index)
        noise: Counter[str] = Counter()
        n_captions = n_terse = 0
        start = index * cfg.shard_size
        for item in range(start, min(start + cfg.shard_size, n_total)):
            scene = sample_scene(rng, cfg.max_objects)
            if split == "web":
                kind = "none"
                if kinds and rng.chance(cfg.noise_rate):
                    kind = rng.weighted(kinds, weights)
                # drawn only when asked for, so worlds without terse texts stay as they were;
                # generic junk is neither
                is_terse = (
                    kind != "generic" and cfg.web_terse_rate > 0 and rng.chance(cfg.web_terse_rate)
                )
                if kind == "none":
                    text = terse(scene, rng) if is_terse else describe(scene, rng)
                else:
                    text = noisy_text(kind, scene, rng, cfg.max_objects, terse_text=is_terse)
                n_terse += is_terse
                captions = [caption_entry(text, "web")]
            else:
                kind = "none"
                per_image = cfg.captions_per_human if split == "human" else cfg.captions_per_test
                captions = [
                    caption_entry(t, "human") for t in describe_distinct(scene, rng, per_image)
                ]
            noise[kind] += 1
            n_captions += len(captions)
            key = make_key(source, f"{item:07d}")
            truth = {"scene": scene.to_dict(), "clean": kind == "none", "noise": kind}
            if split == "web":
                truth["terse"] = is_terse
            image = render_jpeg(scene, cfg.image_size, cfg.jpeg_quality)
            writer.write(build_sample(key, image, captions, source=source, truth=truth))
            writer.record(
                {
                    "uid": key,
                    "split": split,
                    "n_objects": len(scene.objects),
                    "n_captions": len(captions),
                    "clean": kind == "none",
                    "noise": kind,
                    "status": "kept",
                    "reason": "",
                }
            )
        return {"noise": dict(sorted(noise.items())), "captions": n_captions, "terse": n_terse}

    return produce


def _remove_stale_shards(out_dir: Path, n_shards: int) -> None:
    """Delete shard files numbered past this config's last shard (left by a larger earlier run),
    so that a folder spec never picks them up."""
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        match = _SHARD_FILE.match(path.name)
        if match and int(match.group(1)) >= n_shards:
            log.info("removing stale shard file %s", path)
            path.unlink()


def _split_summary(out_dir: Path, n_shards: int) -> dict[str, Any]:
    noise: Counter[str] = Counter()
    count = captions = terse_texts = 0
    for index in range(n_shards):
        try:
            stats = json.loads(stats_path(out_dir, index).read_text())
        except (OSError, ValueError):
            continue
        count += stats.get("count", 0)
        captions += stats.get("captions", 0)
        terse_texts += stats.get("terse", 0)
        noise.update(stats.get("noise", {}))
    return {
        "count": count,
        "captions": captions,
        "shards": n_shards,
        "noise": dict(sorted(noise.items())),
        "terse": terse_texts,
    }


def write_synth(out_dir: str | Path, cfg: SynthConfig) -> dict[str, Any]:
    """Write (or resume) the benchmark under ``out_dir``; returns and saves the summary.

    Summary: ``splits`` (per split: count, captions, shards, noise counts, failed shards),
    ``partial`` (some shard failed; re-run to retry). ``out_dir/synth.json`` holds the config and
    this summary.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    dist = current_dist_info()
    summary: dict[str, Any] = {"splits": {}, "partial": False}
    for split in SPLITS:
        split_dir = out_dir / split
        sizes = _shard_sizes(_split_size(cfg, split), cfg.shard_size)
        if dist.is_main:
            _remove_stale_shards(split_dir, len(sizes))
        barrier()  # gone before any rank looks at the folder (run_shard_stage refuses stale shards)
        result = run_shard_stage(
            split_dir,
            len(sizes),
            _produce(cfg, split),
            stage=f"synth-{split}",
            config_hash=config_hash({"synth": cfg, "split": split, "version": GENERATOR_VERSION}),
            samples_per_shard=sizes,
            dist=dist,
            desc=f"synth {split}",
        )
        info = _split_summary(split_dir, len(sizes))
        info["failed"] = {shard_name(i): reason for i, reason in sorted(result.failed.items())}
        summary["splits"][split] = info
        summary["partial"] = summary["partial"] or result.partial
    if dist.is_main:
        atomic_write_json(
            out_dir / "synth.json",
            {"config": to_dict(cfg), "version": GENERATOR_VERSION, "summary": summary},
        )
    return summary
