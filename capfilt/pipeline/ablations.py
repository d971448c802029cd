"""Ablations of the CapFilt loop: what the captioner and the filter are each worth, and what
training on only the clean web texts would give (BLIP Table 1 compares the same C, F and C+F
rows).

Each ablation is one more pretrain from scratch with the recipe the baseline and CapFilt use (so,
with a fixed ``train.samples_per_epoch``, the same number of steps: equal compute), on the human
shards plus a web set derived from shards the loop already wrote, with no model run:

- ``oracle``: the web texts that are truly clean (``truth.clean`` of the built-in benchmark's web
  shards) → ``data/web_oracle``;
- ``filter-only``: the filter's kept shards without their synthetic captions
  → ``data/web_filter_only``;
- ``captioner-only``: the caption stage's shards as they are (every web text and every
  synthetic caption kept).

Stages (after ``pretrain-capfilt``, before ``evaluate``, under the run's manifest; see
:data:`ABLATION_STAGES`): ``oracle-data``, ``pretrain-oracle``, ``filter-only-data``,
``pretrain-filter-only``, ``pretrain-captioner-only``. The evaluation adds the retrieval of every
ablation run present; the summary the gap CapFilt closes (:func:`capfilt.pipeline.summary.gap_closed`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from capfilt.config import ConfigError, Recipe, config_hash
from capfilt.data.reader import Sample, SkipCounter, read_samples
from capfilt.data.sample import output_sample
from capfilt.data.shards import count_samples, expand_shards
from capfilt.data.stage import StageResult, run_shard_stage
from capfilt.data.writer import ShardWriter
from capfilt.pipeline.bootstrap import (
    ABLATIONS,
    BootstrapInputs,
    BootstrapLayout,
    Step,
    repretrain_sources,
    train_stage,
)
from capfilt.pipeline.filter import normalize_origin
from capfilt.utils.logging import get_logger

log = get_logger("ablations")

ABLATION_STAGES = (
    "oracle-data",
    "pretrain-oracle",
    "filter-only-data",
    "pretrain-filter-only",
    "pretrain-captioner-only",
)
"""The ablation stages, in the order they run."""

KeepText = Callable[[Sample, dict[str, Any]], bool]


def subset_shards(
    shards: list[str], out_dir: str | Path, keep: KeepText, *, stage: str, rule: str
) -> StageResult:
    """Copy every sample of ``shards`` to ``out_dir`` with only the texts ``keep(sample, entry)``
    accepts; a sample with none left is dropped. Output shard i comes from input shard i (rank
    split, resumable, like every shard stage); ``rule`` names the rule in the config hash."""
    urls = expand_shards(shards)
    chash = config_hash({"stage": stage, "rule": rule, "inputs": urls})

    def produce(index: int, writer: ShardWriter) -> dict[str, Any]:
        counter = SkipCounter(stage)
        texts = 0
        for sample in read_samples([urls[index]], counter, require_caption=False):
            kept = [entry for entry in sample.captions if keep(sample, entry)]
            row = {"uid": sample.key, "n_texts": len(sample.captions), "n_kept": len(kept)}
            if not kept:
                writer.drop("no_text_kept", row)
                continue
            writer.write(output_sample(sample, kept, kept[0]["text"]))
            writer.record({**row, "status": "kept", "reason": ""})
            texts += len(kept)
        writer.add_skipped(counter)
        return {"input_shard": urls[index], "rule": rule, "texts": texts}

    return run_shard_stage(
        out_dir, len(urls), produce, stage=stage, config_hash=chash, desc=stage, inputs=urls
    )


def keep_truly_clean(sample: Sample, entry: dict[str, Any]) -> bool:
    """The oracle's rule: a web text whose stored truth says it is clean (the built-in benchmark
    gives each web sample ``truth.clean`` for its text)."""
    truth = sample.meta.get("truth")
    if not isinstance(truth, dict) or not isinstance(truth.get("clean"), bool):
        raise ConfigError(
            f"sample {sample.key} has no truth.clean: the oracle needs web shards whose truth is "
            "known (the built-in benchmark's)"
        )
    return normalize_origin(entry.get("origin")) == "web" and truth["clean"]


def keep_not_synthetic(sample: Sample, entry: dict[str, Any]) -> bool:
    """The filter-only rule on the filter's kept shards: every kept text but the synthetic ones."""
    return normalize_origin(entry.get("origin")) != "synthetic"


def _derive(shards: list[str], out: Path, keep: KeepText, stage: str, rule: str) -> dict:
    if count_samples(expand_shards(shards)) == 0:  # None (sizes unknown): derive and see
        # nothing to derive from (the filter kept no image): the pretrain falls back to human
        out.mkdir(parents=True, exist_ok=True)
        log.warning("%s: %s holds no sample; %s is left empty", stage, ", ".join(shards), out)
        return {"stats": {"count": 0}, "partial": False, "failed": []}
    result = subset_shards(shards, out, keep, stage=stage, rule=rule)
    return {"stats": result.stats, "partial": result.partial, "failed": list(result.failed)}


def ablation_steps(
    recipe: Recipe,
    inputs: BootstrapInputs,
    layout: BootstrapLayout,
    names: tuple[str, ...] = ABLATIONS,
    oracle_needs: tuple[str, ...] = (),
) -> list[Step]:
    """The steps of the ablations ``names`` (round 1's caption and filter outputs), for
    :func:`~capfilt.pipeline.bootstrap.run_bootstrap`'s ``post_steps``. ``oracle_needs``: the
    steps that write ``inputs.web`` (the demo's synth)."""
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        raise ConfigError(
            f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join(ABLATIONS)}"
        )
    if not inputs.human:
        raise ConfigError("ablations pretrain on the human shards too: give them (--human)")
    human, web = list(inputs.human), list(inputs.web)
    captioned, filtered = layout.captioned(1), layout.filtered(1)
    steps: list[Step] = []

    def pretrain(name: str, web_set: Path, needs: list[str]) -> Step:
        out = layout.ablation(name)
        return Step(
            f"pretrain-{name}", f"pretrain-{name}", 1, out, [*human, str(web_set)],
            lambda: train_stage("pretrain", recipe, repretrain_sources(human, web_set), out),
            needs,
        )  # fmt: skip

    if "oracle" in names:
        oracle = layout.ablation_data("oracle")
        steps.append(
            Step(
                "oracle-data", "oracle-data", 1, oracle, web,
                lambda: _derive(web, oracle, keep_truly_clean, "oracle-data", "truth.clean"),
                list(oracle_needs),
            )
        )  # fmt: skip
        steps.append(pretrain("oracle", oracle, ["oracle-data"]))
    if "filter-only" in names:
        filter_only = layout.ablation_data("filter-only")
        steps.append(
            Step(
                "filter-only-data", "filter-only-data", 1, filter_only, [str(filtered)],
                lambda: _derive(
                    [str(filtered)], filter_only, keep_not_synthetic, "filter-only-data",
                    "not-synthetic",
                ),
                ["filter"],
            )
        )  # fmt: skip
        steps.append(pretrain("filter-only", filter_only, ["filter-only-data"]))
    if "captioner-only" in names:
        steps.append(pretrain("captioner-only", captioned, ["caption"]))
    return steps
