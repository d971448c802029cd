"""``capfilt demo``: the whole CapFilt loop on the built-in benchmark, baseline vs CapFilt.

    capfilt demo --out demo-out                 # capfilt/recipes/demo.yaml, ~10 min on 2 CPU cores
    capfilt demo tiny --out /tmp/d              # seconds, for a smoke test

The demo is the ``synth`` stage (built-in benchmark → data/{human,web,test}) followed by
``capfilt bootstrap`` on those shards (:mod:`capfilt.pipeline.bootstrap`: the same stages, the
same manifest, markers in ``OUT/stages/``, the same resume), whose evaluation gets two extras
only the benchmark can give: the filter's precision/recall against the stored noise truth (the
truth columns ride in the filter's parquet) and the share of synthetic captions true of their
scene (``captions``).

With ``ablations`` (``capfilt demo --ablations``) three more pretrains run before the evaluation
(:mod:`capfilt.pipeline.ablations`): the oracle (human + only the truly clean web texts), filter
only and captioner only; the summary then gives the gap CapFilt closes between the baseline and
the oracle. Each is one more pretrain of the baseline's length, so they are off by default.

``capfilt demo`` then writes ``report.html`` from the folder (:mod:`capfilt.report`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from capfilt.config import Recipe
from capfilt.pipeline.ablations import ABLATION_STAGES, ablation_steps
from capfilt.pipeline.bootstrap import STAGES as BOOTSTRAP_STAGES
from capfilt.pipeline.bootstrap import (
    BootstrapInputs,
    BootstrapLayout,
    StageEvent,
    Step,
    filter_metrics,
    run_bootstrap,
)
from capfilt.utils.logging import get_logger

log = get_logger("demo")

STAGES = ("synth", *BOOTSTRAP_STAGES[:-1], *ABLATION_STAGES, BOOTSTRAP_STAGES[-1])
"""The demo's stages, in pipeline order (the ablation stages run with ``ablations`` only)."""

__all__ = ["STAGES", "caption_truth", "filter_metrics", "run_demo"]


def caption_truth(captioned: Path) -> dict[str, Any]:
    """Fraction of synthetic captions that are true of their scene (exact check against the stored truth)."""
    from capfilt.data.reader import read_samples
    from capfilt.data.shards import expand_shards
    from capfilt.data.synth import check_caption

    n = true = complete = parsed = 0
    examples = []
    for sample in read_samples(expand_shards(str(captioned)), require_caption=False):
        scene = (sample.meta.get("truth") or {}).get("scene")
        if scene is None:
            continue
        for entry in sample.captions:
            if entry.get("origin") != "synthetic":
                continue
            verdict = check_caption(entry["text"], scene)
            n += 1
            true += bool(verdict["true"])
            complete += bool(verdict["true"] and verdict.get("complete"))
            parsed += bool(verdict.get("parsed"))
            if len(examples) < 20:
                examples.append(
                    {"uid": sample.key, "caption": entry["text"], "true": bool(verdict["true"])}
                )

    def rate(count: int) -> float | None:
        return count / n if n else None

    return {
        "n": n,
        "truth_rate": rate(true),
        "complete_rate": rate(complete),
        "parse_rate": rate(parsed),
        "examples": examples,
    }


def run_demo(
    recipe: Recipe,
    out: Path,
    skip: tuple[str, ...] = (),
    on_stage: Callable[[StageEvent], None] | None = None,
    ablations: bool = False,
    restart_from: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage, the ablations too with ``ablations``; returns the summary
    written to ``OUT/summary.json``. ``restart_from``: redo that stage and every later one (a
    changed recipe is refused without it)."""
    layout = BootstrapLayout(Path(out))

    def do_synth() -> dict:
        from capfilt.data.synth import write_synth

        return write_synth(layout.data, recipe.synth)

    inputs = BootstrapInputs(
        human=[str(layout.split("human"))],
        web=[str(layout.split("web"))],
        test=[str(layout.split("test"))],
    )
    synth = Step("synth", "synth", 1, layout.data, [], do_synth)
    post = ablation_steps(recipe, inputs, layout, oracle_needs=("synth",)) if ablations else []
    return run_bootstrap(
        recipe,
        inputs,
        layout.root,
        skip=skip,
        restart_from=restart_from,
        on_stage=on_stage,
        pre_steps=[synth],
        post_steps=post,
        round_extra=lambda r, lay: {"captions": caption_truth(lay.captioned(r))},
        summary_extra={"synth_seed": recipe.synth.seed},
    )
