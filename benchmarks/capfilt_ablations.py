"""CapFilt against its ablations and the oracle, over seeds and two worlds of the built-in benchmark.

    python benchmarks/capfilt_ablations.py --out abl                       # demo recipe, 3 seeds, 2 worlds
    python benchmarks/capfilt_ablations.py --out abl --seeds 1 --worlds main
    python benchmarks/capfilt_ablations.py --out abl --recipe my.yaml --set train.lr=5e-4

For each world and seed this runs ``capfilt demo --ablations`` (:func:`capfilt.pipeline.demo.run_demo`)
into ``OUT/<world>/seed<N>/``: baseline, CapFilt, the oracle (human + only the truly clean web
texts), filter only and captioner only, all pretrained for the same number of steps where the
recipe fixes ``train.samples_per_epoch`` (the demo recipe does). Seed N sets ``seed=N`` (training)
and the world's synth seed. A run folder that exists is resumed, so an interrupted benchmark
continues where it stopped; after a recipe change, ``--restart-from STAGE`` redoes that stage and
the later ones in every run (``--restart-from evaluate`` re-scores finished runs after an
``eval.*`` change, in a few minutes).

Worlds (the synth settings; everything else is the recipe's):

- ``main``: the recipe's world as it is, synth seed N (the demo's: terse web texts,
  ``synth.web_terse_rate`` 1.0; ``--set synth.web_terse_rate=0`` gives both worlds full-caption
  web texts);
- ``second``: synth seed 1000 + N, ``noise_rate`` 0.5 and ``noise_mix`` swap 0.2 / attribute 0.5
  / generic 0.3 (the demo's: 0.4 and 0.4 / 0.4 / 0.2): more noise, and more of the kind the filter
  finds hardest (one wrong attribute), less of the easiest (another image's caption).

``--set`` overrides apply to every run after the world's settings (so a ``--set synth.…`` makes
the worlds alike in that field).

Printed and written to ``OUT/ablations.json`` (or ``--json``): per run, mean R@1 (mean of text
and image R@1) and the mean of all R@K of each pretrain, gap closed = (CapFilt − baseline) /
(oracle − baseline) on both, CapFilt − filter only, the filter's F1 on web noise, the share of
synthetic captions true of their scene, the ITM re-rank's gain over ITC alone (mean R@1) and the
demo's time; per world, each figure's mean ± sample
standard deviation over the seeds (and min, max), and gap closed of the seed means.

On the demo recipe each run takes about 12½ minutes plus 4 per ablation on 2 CPU cores: the
default 6 runs take about 75 minutes, two at a time (24-25 minutes a run; two processes, e.g.
``--worlds main --seeds 0,1`` and ``--worlds main --seeds 2,``, each with its own ``--json`` and
``--set runtime.threads=1``; a last call over all seeds and worlds finds every run done and
writes the whole table).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from capfilt.cli.common import print_stage_event
from capfilt.config import load_recipe
from capfilt.pipeline.summary import (
    GAP_FIGURES,
    RUNS,
    dig,
    figure_of,
    gap_closed,
    gap_ratio,
    number,
    run_retrieval,
)

WORLDS: dict[str, dict[str, Any]] = {
    "main": {"synth_seed_offset": 0, "overrides": []},
    "second": {
        "synth_seed_offset": 1000,
        "overrides": [
            "synth.noise_rate=0.5",
            "synth.noise_mix={swap: 0.2, attribute: 0.5, generic: 0.3}",
        ],
    },
}
"""The worlds a benchmark can run: synth seed = seed + offset, and the synth overrides."""

FIGURES = ("r1_mean", "r_mean", "itc.r1_mean")
"""The retrieval figures reported per pretrain (mean R@1, mean of all R@K, mean R@1 of ITC alone)."""


def seed_list(text: str) -> list[int]:
    """``--seeds``: ``N`` → seeds 0..N-1; ``A,B,...`` (a trailing comma for one) → those seeds."""
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a count or a comma list of seeds: {text!r}"
        ) from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"at least one seed, none negative: {text!r}")
    return seeds


def run_overrides(world: str, seed: int, user: list[str]) -> list[str]:
    """The recipe overrides of one run: seeds, the world's synth settings, then the user's."""
    spec = WORLDS[world]
    return [
        f"seed={seed}",
        f"synth.seed={seed + spec['synth_seed_offset']}",
        *spec["overrides"],
        *user,
    ]


def run_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of one demo summary (None where a part is missing)."""
    pretrains = {
        name: {key: figure_of(run_retrieval(summary, name), key) for key in FIGURES}
        for name, _, _ in RUNS
    }
    cap, filt = pretrains["capfilt"]["r1_mean"], pretrains["filter-only"]["r1_mean"]
    rerank_gain = {
        name: None
        if f["r1_mean"] is None or f["itc.r1_mean"] is None
        else f["r1_mean"] - f["itc.r1_mean"]
        for name, f in pretrains.items()
    }
    return {
        "pretrains": pretrains,
        "rerank_minus_itc_r1": rerank_gain,
        "gap_closed": gap_closed(summary),
        "capfilt_minus_filter_only_r1": None if cap is None or filt is None else cap - filt,
        "filter_threshold": number(dig(summary, "filter", "threshold")),
        "filter_f1": number(dig(summary, "filter", "f1")),
        "filter_auc": number(dig(summary, "filter", "auc")),
        "caption_truth_rate": number(dig(summary, "captions", "truth_rate")),
        "total_seconds": number(summary.get("total_seconds")),
    }


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for fewer than two values), min and max of the
    values present; ``n`` counts them (a gap closed is absent where the oracle did not beat the
    baseline)."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {
        "n": len(xs),
        "mean": statistics.fmean(xs),
        "sd": statistics.stdev(xs) if len(xs) > 1 else None,
        "min": min(xs),
        "max": max(xs),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure spread over the runs of one world, and gap closed of the seed means."""
    figs = [r["figures"] for r in runs]
    pretrains = {
        name: {key: spread([f["pretrains"][name][key] for f in figs]) for key in FIGURES}
        for name, _, _ in RUNS
    }
    out: dict[str, Any] = {
        "n_runs": len(runs),
        "pretrains": pretrains,
        "gap_closed": {key: spread([f["gap_closed"][key] for f in figs]) for key, _ in GAP_FIGURES},
        # every pretrain of every seed: does the ITM re-rank add to the ITC ranking?
        "rerank_minus_itc_r1": spread(
            [v for f in figs for v in f.get("rerank_minus_itc_r1", {}).values()]
        ),
        "gap_closed_of_means": {
            key: gap_ratio(
                pretrains["baseline"][key]["mean"],
                pretrains["capfilt"][key]["mean"],
                pretrains["oracle"][key]["mean"],
            )
            for key, _ in GAP_FIGURES
        },
    }
    for key in (
        "capfilt_minus_filter_only_r1",
        "filter_f1",
        "caption_truth_rate",
        "total_seconds",
    ):
        out[key] = spread([f[key] for f in figs])
    return out


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pm(s: dict[str, Any], runs: int, digits: int = 2, scale: float = 1.0) -> str:
    """mean ± sd, with the count where some runs lack the figure."""
    if s["mean"] is None:
        return "—"
    text = f"{s['mean'] * scale:.{digits}f}"
    if s["sd"] is not None:
        text += f" ± {s['sd'] * scale:.{digits}f}"
    return text + (f" (n = {s['n']} of {runs})" if s["n"] < runs else "")


def format_runs(runs: list[dict[str, Any]]) -> str:
    """One line per run: each pretrain's mean R@1, gap closed, filter F1, caption truth, time."""
    names = [label for _, label, _ in RUNS]
    head = [
        "world",
        "seed",
        *(f"{n} R@1" for n in names),
        "gap R@1",
        "gap R@K",
        "F1",
        "true",
        "time",
    ]
    lines = [" | ".join(head)]
    for r in runs:
        f = r["figures"]
        cells = [
            r["world"],
            str(r["seed"]),
            *(_num(f["pretrains"][name]["r1_mean"]) for name, _, _ in RUNS),
            _num(f["gap_closed"]["r1_mean"]),
            _num(f["gap_closed"]["r_mean"]),
            _num(f["filter_f1"]),
            _num(None if f["caption_truth_rate"] is None else 100 * f["caption_truth_rate"], 1)
            + "%",
            _num(f["total_seconds"], 0) + " s",
        ]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def format_aggregate(world: str, agg: dict[str, Any]) -> str:
    """A world's figures as mean ± sd over its seeds."""
    n = agg["n_runs"]
    lines = [f"world {world}: mean ± sd over {n} run(s)"]
    for name, label, data in RUNS:
        p = agg["pretrains"][name]
        lines.append(
            f"  {label:<15} ({data}): mean R@1 {_pm(p['r1_mean'], n)}, mean of all R@K {_pm(p['r_mean'], n)}"
        )
    for key, label in GAP_FIGURES:
        lines.append(
            f"  gap closed, {label}: {_pm(agg['gap_closed'][key], n)} per seed; "
            f"of the seed means {_num(agg['gap_closed_of_means'][key])}"
        )
    lines.append(
        f"  CapFilt − filter only, mean R@1: {_pm(agg['capfilt_minus_filter_only_r1'], n)}"
    )
    gain = agg["rerank_minus_itc_r1"]
    lines.append(
        f"  ITM re-rank − ITC alone, mean R@1, over {gain['n']} pretrains: "
        f"{_pm(gain, gain['n'])} (min {_num(gain['min'])}, max {_num(gain['max'])})"
    )
    lines.append(f"  filter F1 on web noise: {_pm(agg['filter_f1'], n, 3)}")
    lines.append(f"  synthetic captions true: {_pm(agg['caption_truth_rate'], n, 1, 100)} %")
    lines.append(f"  demo time: {_pm(agg['total_seconds'], n, 0)} s")
    return "\n".join(lines)


def _print_stage(event: Any) -> None:
    """``capfilt demo``'s line for each stage that finished (or was skipped), not its starts."""
    if event.status != "start":
        print_stage_event(event)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs and the JSON")
    parser.add_argument("--recipe", default="demo", help="recipe name or YAML path (default demo)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="recipe override for every run (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", type=seed_list, default=seed_list("3"), metavar="N|A,B,...",
        help="N: seeds 0..N-1 (default 3); or a comma list: 0,2 (and 2, for seed 2 alone)",
    )  # fmt: skip
    parser.add_argument(
        "--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS),
        help="worlds to run (default: all)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="default OUT/ablations.json")
    parser.add_argument(
        "--restart-from", default=None, metavar="STAGE",
        help="redo this stage and every later one in each run (e.g. evaluate after changing eval.*)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from capfilt.pipeline.demo import run_demo
    from capfilt.report import write_report
    from capfilt.utils.files import atomic_write_json

    started = time.monotonic()
    runs = []
    for world in args.worlds:
        for seed in args.seeds:
            overrides = run_overrides(world, seed, args.overrides)
            recipe = load_recipe(args.recipe, overrides)
            out = args.out / world / f"seed{seed}"
            print(f"== {world} seed {seed} → {out}", flush=True)
            summary = run_demo(
                recipe, out, ablations=True, on_stage=_print_stage, restart_from=args.restart_from
            )
            write_report(out)
            runs.append(
                {
                    "world": world,
                    "seed": seed,
                    "out": str(out),
                    "overrides": overrides,
                    "figures": run_figures(summary),
                }
            )
    result = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "worlds": {w: WORLDS[w] for w in args.worlds},
        "runs": runs,
        "aggregate": {w: aggregate([r for r in runs if r["world"] == w]) for w in args.worlds},
        "seconds": round(time.monotonic() - started, 1),
    }
    path = args.json or args.out / "ablations.json"
    atomic_write_json(path, result)
    print(format_runs(runs))
    for world in args.worlds:
        print(format_aggregate(world, result["aggregate"][world]))
    print(f"written: {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
