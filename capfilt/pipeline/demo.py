"""``capfilt demo``: the whole CapFilt loop on the built-in benchmark, baseline vs CapFilt.

    capfilt demo --out demo-out                 # recipes/demo.yaml, ~10 min on 2 CPU cores
    capfilt demo tiny --out /tmp/d              # seconds, for a smoke test

Stages, in order, each recorded in ``OUT/stages/NAME.json`` when done (a re-run skips it;
an interrupted stage resumes from its own checkpoints/done-markers):

1. ``synth``              built-in benchmark → data/{human,web,test}
2. ``pretrain-baseline``  MED on human + noisy web → runs/pretrain_baseline
3. ``finetune-captioner`` LM on human → runs/captioner
4. ``finetune-filter``    ITC + ITM on human → runs/filter
5. ``caption``            synthetic captions for web → data/web_captioned
6. ``filter``             web + synthetic texts scored and filtered → data/web_filtered
7. ``pretrain-capfilt``   a new MED from scratch on human + filtered → runs/pretrain_capfilt
8. ``evaluate``           retrieval of both models on test/, filter and caption metrics
   → eval/*.json, summary.json

``capfilt demo`` then writes ``report.html`` from the folder (:mod:`capfilt.report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capfilt.config import Recipe, config_hash, dump_yaml, to_dict
from capfilt.utils.files import atomic_write_bytes, atomic_write_json
from capfilt.utils.logging import get_logger

log = get_logger("demo")

STAGES = (  # in pipeline order
    "synth",
    "pretrain-baseline",
    "finetune-captioner",
    "finetune-filter",
    "caption",
    "filter",
    "pretrain-capfilt",
    "evaluate",
)


@dataclass
class DemoLayout:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        return self.data / name

    def run(self, name: str) -> Path:
        return self.root / "runs" / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def _stage_marker(layout: DemoLayout, stage: str) -> Path:
    return layout.stages / f"{stage}.json"


def _train(
    stage: str, recipe: Recipe, shards: list[Path], out: Path, init: Path | None = None
) -> None:
    from capfilt.train.trainer import TrainJob, train

    train(
        TrainJob(
            stage=stage,
            recipe=recipe,
            shards=[str(s) for s in shards],
            out=out,
            init=init,
            resume="auto",
        )
    )


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


def filter_metrics(filtered: Path, threshold: float) -> dict[str, Any]:
    """The filter's precision/recall/F1 on web noise (and more) from the filter stage's parquet."""
    from capfilt.eval.filter_metrics import filter_report, load_score_tables

    table = load_score_tables(filtered).rename(columns={"itm_score": "score"})
    return filter_report(table, threshold)


def _retrieval(model_dir: Path, test: Path, recipe: Recipe) -> dict[str, Any]:
    from capfilt.eval.retrieval import evaluate_retrieval

    return evaluate_retrieval(
        model_dir,
        str(test),
        k=recipe.eval.k,
        batch_size=recipe.eval.batch_size,
        max_words=recipe.data.max_words,
    )


def run_demo(
    recipe: Recipe,
    out: Path,
    skip: tuple[str, ...] = (),
    on_stage: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary written to ``OUT/summary.json``."""
    layout = DemoLayout(out)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.stages.mkdir(exist_ok=True)
    recipe_file = layout.root / "recipe.yaml"
    recipe_hash = config_hash(recipe)
    if recipe_file.is_file():
        previous = (
            json.loads((layout.root / "recipe.json").read_text())
            if (layout.root / "recipe.json").is_file()
            else {}
        )
        if previous.get("hash") != recipe_hash:
            raise ValueError(
                f"{layout.root} holds a demo run with another recipe; use a new --out (or the same recipe to resume)"
            )
    else:
        atomic_write_bytes(recipe_file, dump_yaml(recipe).encode())
        atomic_write_json(
            layout.root / "recipe.json", {"hash": recipe_hash, "recipe": to_dict(recipe)}
        )

    human, web, test = layout.split("human"), layout.split("web"), layout.split("test")
    captioned, filtered = layout.split("web_captioned"), layout.split("web_filtered")
    baseline, captioner, filt, capfilt_run = (
        layout.run(n) for n in ("pretrain_baseline", "captioner", "filter", "pretrain_capfilt")
    )

    def do_synth() -> dict:
        from capfilt.data.synth import write_synth

        return write_synth(layout.data, recipe.synth)

    def do_caption() -> dict:
        from capfilt.pipeline.caption import caption_shards

        return caption_shards(captioner, [str(web)], captioned, recipe.caption).stats

    def do_filter() -> dict:
        from capfilt.pipeline.filter import filter_shards

        return filter_shards(filt, [str(captioned)], filtered, recipe.filter).stats

    def do_evaluate() -> dict:
        layout.eval.mkdir(exist_ok=True)
        results: dict[str, Any] = {}
        for name, run in (("baseline", baseline), ("capfilt", capfilt_run)):
            if (run / "model").is_dir():
                results[name] = {"retrieval": _retrieval(run / "model", test, recipe)}
                atomic_write_json(
                    layout.eval / f"{name}_retrieval.json", results[name]["retrieval"]
                )
        if filtered.is_dir():
            results["filter"] = filter_metrics(filtered, recipe.filter.threshold)
            atomic_write_json(layout.eval / "filter.json", results["filter"])
        if captioned.is_dir():
            results["captions"] = caption_truth(captioned)
            atomic_write_json(layout.eval / "captions.json", results["captions"])
        return results

    actions: dict[str, Callable[[], Any]] = {
        "synth": do_synth,
        "pretrain-baseline": lambda: _train("pretrain", recipe, [human, web], baseline),
        "finetune-captioner": lambda: _train(
            "captioner", recipe, [human], captioner, init=baseline
        ),
        "finetune-filter": lambda: _train("filter", recipe, [human], filt, init=baseline),
        "caption": do_caption,
        "filter": do_filter,
        "pretrain-capfilt": lambda: _train("pretrain", recipe, [human, filtered], capfilt_run),
        "evaluate": do_evaluate,
    }
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    for stage in STAGES:
        marker = _stage_marker(layout, stage)
        if stage in skip:
            log.info("demo: skipping %s (--skip)", stage)
            continue
        if marker.is_file() and stage != "evaluate":
            timings[stage] = json.loads(marker.read_text()).get("seconds", 0.0)
            log.info("demo: %s already done", stage)
            continue
        if on_stage:
            on_stage(stage, "start")
        log.info("demo: %s ...", stage)
        start = time.monotonic()
        value = actions[stage]()
        timings[stage] = round(time.monotonic() - start, 1)
        atomic_write_json(marker, {"stage": stage, "seconds": timings[stage]})
        if stage == "evaluate":
            results = value
        if on_stage:
            on_stage(stage, "done")
    summary = {
        "recipe": recipe.name,
        "seed": recipe.seed,
        "synth_seed": recipe.synth.seed,
        "baseline": results.get("baseline", {}),
        "capfilt": results.get("capfilt", {}),
        "filter": results.get("filter", {}),
        "captions": results.get("captions", {}),
        "timings": timings,
        "total_seconds": round(sum(timings.values()), 1),
    }
    atomic_write_json(layout.summary, summary)
    return summary
