"""``benchmarks/capfilt_ablations.py``: run as a user runs it on the tiny recipe, its worlds'
settings, and its figures and spreads against a hand computation."""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from capfilt.config import load_recipe
from tests.conftest import subprocess_env
from tests.test_ablations import FAST as ABLATION_FAST

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "capfilt_ablations.py"
# the ablation tests' seconds-per-stage overrides, with 2 steps per pretrain instead of 4
FAST = [*ABLATION_FAST, "train.samples_per_epoch=16"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("capfilt_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_second_world_changes_seed_noise_rate_and_mix_and_user_overrides_win(bench):
    main = load_recipe("tiny", bench.run_overrides("main", 2, []))
    second = load_recipe("tiny", bench.run_overrides("second", 2, []))
    assert (main.seed, main.synth.seed) == (2, 2)
    assert (second.seed, second.synth.seed) == (2, 1002)
    assert main.synth.noise_rate == 0.4 and second.synth.noise_rate == 0.5
    assert main.synth.noise_mix != second.synth.noise_mix
    assert second.synth.noise_mix == {"swap": 0.2, "attribute": 0.5, "generic": 0.3}
    mine = load_recipe("tiny", bench.run_overrides("second", 0, ["synth.noise_rate=0.3"]))
    assert mine.synth.noise_rate == 0.3


def test_seeds_are_a_count_or_a_list(bench):
    assert bench.seed_list("3") == [0, 1, 2]
    assert bench.seed_list("2,") == [2] and bench.seed_list("0,2") == [0, 2]
    for bad in ("0", "x", "1,-1", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.seed_list(bad)


def _summary(base, cap, oracle, filt, capt, f1, truth):
    def run(r1, r_mean, itc=True):
        retrieval = {"tr_r1": r1 - 1, "ir_r1": r1 + 1, "r_mean": r_mean}
        if itc:  # ITC alone: mean R@1 two below the re-rank's
            retrieval["itc"] = {"tr_r1": r1 - 3, "ir_r1": r1 - 1}
        return {"retrieval": retrieval}

    return {
        "baseline": run(*base),
        "capfilt": run(*cap),
        "ablations": {
            "oracle": run(*oracle),
            "filter-only": run(*filt),
            "captioner-only": run(*capt, itc=False),  # evaluated without a re-rank
        },
        "filter": {"f1": f1, "threshold": 0.5},
        "captions": {"truth_rate": truth},
        "total_seconds": 100.0,
    }


def test_figures_and_spreads_by_hand(bench):
    a = _summary((5, 20), (9, 29), (13, 32), (8, 27), (6, 22), 0.8, 0.5)
    b = _summary((4, 18), (10, 26), (8, 30), (7, 25), (5, 21), 0.9, 0.7)
    c = _summary((6, 21), (7, 24), (5, 25), (7, 23), (6, 22), 0.7, 0.6)  # oracle below baseline
    runs = [{"figures": bench.run_figures(s)} for s in (a, b, c)]
    fa = runs[0]["figures"]
    assert fa["pretrains"]["oracle"] == {"r1_mean": 13, "r_mean": 32, "itc.r1_mean": 11}
    assert fa["rerank_minus_itc_r1"] == {
        "baseline": 2, "oracle": 2, "filter-only": 2, "captioner-only": None, "capfilt": 2,
    }  # fmt: skip
    assert fa["gap_closed"] == {"r1_mean": pytest.approx(0.5), "r_mean": pytest.approx(0.75)}
    assert fa["capfilt_minus_filter_only_r1"] == 1
    assert runs[2]["figures"]["gap_closed"]["r1_mean"] is None

    agg = bench.aggregate(runs)
    assert agg["n_runs"] == 3
    cap = agg["pretrains"]["capfilt"]["r1_mean"]
    assert cap["mean"] == pytest.approx((9 + 10 + 7) / 3)
    assert cap["sd"] == pytest.approx(statistics.stdev([9, 10, 7]))
    assert (cap["min"], cap["max"], cap["n"]) == (7, 10, 3)
    # per-seed gap closed: seed c has none (its oracle is not above its baseline)
    gap = agg["gap_closed"]["r1_mean"]
    assert gap["n"] == 2 and gap["mean"] == pytest.approx((0.5 + 1.5) / 2)
    # gap closed of the seed means: (26/3 − 5) / (26/3 − 5) = 1
    assert agg["gap_closed_of_means"]["r1_mean"] == pytest.approx(
        ((9 + 10 + 7) / 3 - 5) / ((13 + 8 + 5) / 3 - 5)
    )
    assert agg["filter_f1"]["mean"] == pytest.approx(0.8)
    assert agg["capfilt_minus_filter_only_r1"]["mean"] == pytest.approx((1 + 3 + 0) / 3)
    gain = agg["rerank_minus_itc_r1"]  # 4 pretrains with an ITC figure in each of 3 runs
    assert (gain["n"], gain["mean"], gain["sd"]) == (12, pytest.approx(2), pytest.approx(0))
    text = bench.format_aggregate("main", agg)
    assert "gap closed, mean R@1: 1.00 ± 0.71 (n = 2 of 3)" in text
    assert "synthetic captions true: 60.0 ± 10.0 %" in text
    assert "ITM re-rank − ITC alone, mean R@1, over 12 pretrains: 2.00 ± 0.00" in text


def test_the_script_runs_as_a_user_runs_it(tmp_path):
    out = tmp_path / "bench"
    args = [sys.executable, str(SCRIPT), "--out", str(out), "--recipe", "tiny", "--seeds", "1"]
    for item in FAST:
        args += ["--set", item]
    # both scripts on the CPU: rerank_headroom's figures are compared with the demo's own
    # evaluation to the digit, and a GPU's (bf16) can pick another first candidate than the CPU's
    cpu_only = subprocess_env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(args, capture_output=True, text=True, env=cpu_only, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "ablations.json").read_text())
    assert [(r["world"], r["seed"]) for r in result["runs"]] == [("main", 0), ("second", 0)]
    for run in result["runs"]:
        folder = Path(run["out"])
        summary = json.loads((folder / "summary.json").read_text())
        assert set(summary["ablations"]) == {"oracle", "filter-only", "captioner-only"}
        assert run["figures"]["pretrains"]["oracle"]["r_mean"] == pytest.approx(
            summary["ablations"]["oracle"]["retrieval"]["r_mean"]
        )
        assert (folder / "report.html").is_file()
    synth = json.loads((out / "second" / "seed0" / "data" / "synth.json").read_text())["config"]
    assert synth["seed"] == 1000 and synth["noise_rate"] == 0.5
    assert set(result["aggregate"]) == {"main", "second"}
    assert "world second: mean ± sd over 1 run(s)" in proc.stdout
    assert "pretrain-oracle: done in" in proc.stdout

    # benchmarks/rerank_headroom.py on one of those demo folders: its ITC and re-rank columns
    # are the demo's own evaluation (the tiny recipe re-ranks with BLIP's score)
    folder = out / "main" / "seed0"
    headroom = ROOT / "benchmarks" / "rerank_headroom.py"
    args = [sys.executable, str(headroom), str(folder), "--json", str(tmp_path / "h.json")]
    proc = subprocess.run(args, capture_output=True, text=True, env=cpu_only, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "h.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    assert set(figures["models"]) == {
        f"pretrain_{name}"
        for name in ("baseline", "capfilt", "oracle", "filter_only", "captioner_only")
    }
    for name in ("baseline", "capfilt"):
        retrieval, got = summary[name]["retrieval"], figures["models"][f"pretrain_{name}"]
        assert got["blip"] == pytest.approx((retrieval["tr_r1"] + retrieval["ir_r1"]) / 2)
        itc = retrieval["itc"]
        assert got["itc"] == pytest.approx((itc["tr_r1"] + itc["ir_r1"]) / 2)
        assert 0 <= got["truth"] <= 100 and 0 <= got["tr_first_false"] <= 100
    bad = subprocess.run(
        [sys.executable, str(headroom), str(folder), "--runs", "nope"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert bad.returncode != 0 and "no model folder" in bad.stderr
