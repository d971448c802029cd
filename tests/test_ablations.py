"""``capfilt demo --ablations``: the oracle, filter-only and captioner-only pretrains on the tiny
recipe (their data read back against the stored truth and the filter's decisions), equal
steps, resume, gap closed against a hand computation, and the tables that show them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from capfilt.config import load_recipe
from capfilt.data.reader import read_samples
from capfilt.data.shards import expand_shards
from capfilt.pipeline.ablations import ABLATION_STAGES
from capfilt.pipeline.demo import run_demo
from capfilt.pipeline.summary import (
    ablation_rows,
    gap_closed,
    gap_figures,
    gap_ratio,
    retrieval_rows,
)

FAST = [
    "synth.n_human=16",
    "synth.n_web=32",
    "synth.n_test=8",
    "synth.shard_size=8",
    "train.epochs=1",
    "train.samples_per_epoch=32",  # every pretrain takes the same 4 steps, whatever its data
    "finetune.captioner.epochs=1",
    "finetune.filter.epochs=1",
    "caption.max_length=8",
    "caption.min_length=2",
    "eval.k=4",
    # half the texts kept: an untrained filter at a fixed threshold keeps all or nothing, and
    # the filter-only set must hold both kept and rejected web texts to tell anything
    "filter.keep_fraction=0.5",
]
"""Overrides of the tiny recipe: seconds per stage."""


def _ran(events) -> list[str]:
    return [e.key for e in events if e.status == "done"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    """A demo without ablations, then with all but one ablation, then with all of them."""
    out = tmp_path_factory.mktemp("ablate") / "demo"
    recipe = load_recipe("tiny", FAST)
    runs = {}
    for name, kw in (
        ("plain", {}),
        ("some", {"ablations": True, "skip": ("pretrain-captioner-only",)}),
        ("all", {"ablations": True}),
        ("again", {"ablations": True}),
    ):
        events = []
        summary = run_demo(recipe, out, on_stage=events.append, **kw)
        runs[name] = {"events": events, "summary": summary}
    return out, runs


def _samples(folder: Path) -> dict[str, list[dict]]:
    """Each sample's captions, by key."""
    return {
        s.key: list(s.captions)
        for s in read_samples(expand_shards(str(folder)), require_caption=False)
    }


def _truth(folder: Path) -> dict[str, dict]:
    return {
        s.key: s.meta["truth"]
        for s in read_samples(expand_shards(str(folder)), require_caption=False)
    }


def test_ablations_run_after_the_loop_and_resume_skips_the_finished_ones(demo):
    out, runs = demo
    assert not any(k in ABLATION_STAGES for k in _ran(runs["plain"]["events"]))
    assert "ablations" not in runs["plain"]["summary"]
    # added to a finished demo: only the ablation stages (but the skipped one) and the evaluation
    assert _ran(runs["some"]["events"]) == [
        "oracle-data",
        "pretrain-oracle",
        "filter-only-data",
        "pretrain-filter-only",
        "evaluate",
    ]
    skipped = [e.key for e in runs["some"]["events"] if e.status == "skipped"]
    assert skipped == ["pretrain-captioner-only"]
    # the next run does only what is left; the one after that nothing
    assert _ran(runs["all"]["events"]) == ["pretrain-captioner-only", "evaluate"]
    assert {e.status for e in runs["again"]["events"]} == {"done-earlier"}

    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    summary = runs["all"]["summary"]
    for stage, output in (
        ("oracle-data", out / "data" / "web_oracle"),
        ("pretrain-oracle", out / "runs" / "pretrain_oracle"),
        ("filter-only-data", out / "data" / "web_filter_only"),
        ("pretrain-filter-only", out / "runs" / "pretrain_filter_only"),
        ("pretrain-captioner-only", out / "runs" / "pretrain_captioner_only"),
    ):
        assert manifest[stage]["status"] == "done"
        assert summary["outputs"][stage] == str(output.relative_to(out)) and output.is_dir()
        assert stage in summary["timings"]
    for name in ("oracle", "filter-only", "captioner-only"):
        assert 0 <= summary["ablations"][name]["retrieval"]["r_mean"] <= 100
        file = out / "eval" / f"{name.replace('-', '_')}_retrieval.json"
        assert json.loads(file.read_text()) == summary["ablations"][name]["retrieval"]


def test_oracle_keeps_exactly_the_truly_clean_web_texts(demo):
    out, _ = demo
    truth, web = _truth(out / "data" / "web"), _samples(out / "data" / "web")
    clean = {key for key, t in truth.items() if t["clean"]}
    assert 0 < len(clean) < len(truth)  # the tiny world has both, so the check can fail
    oracle = _samples(out / "data" / "web_oracle")
    assert set(oracle) == clean
    for key, captions in oracle.items():
        assert captions == web[key]  # the clean web text itself, nothing added


def test_filter_only_is_the_filters_kept_web_texts_without_synthetic_captions(demo):
    out, _ = demo
    kept = _samples(out / "data" / "web_filtered")
    assert any(c["origin"] == "synthetic" for cs in kept.values() for c in cs)
    expected = {
        key: [c for c in cs if c["origin"] == "web"]
        for key, cs in kept.items()
        if any(c["origin"] == "web" for c in cs)
    }
    assert expected and len(expected) < 32  # the filter rejected some web texts
    assert _samples(out / "data" / "web_filter_only") == expected


def test_captioner_only_keeps_every_web_text_and_synthetic_caption(demo):
    out, _ = demo
    config = yaml.safe_load((out / "runs" / "pretrain_captioner_only" / "config.yaml").read_text())
    captioned = out / "data" / "web_captioned"
    assert config["shards"] == [str(out / "data" / "human"), str(captioned)]
    web, texts = _samples(out / "data" / "web"), _samples(captioned)
    assert set(texts) == set(web)
    for key, captions in texts.items():
        assert captions[: len(web[key])] == web[key]
        assert [c["origin"] for c in captions[len(web[key]) :]] == ["synthetic"]


def test_every_pretrain_takes_the_same_steps(demo):
    out, _ = demo
    names = ("baseline", "capfilt", "oracle", "filter_only", "captioner_only")
    last = {}
    for name in names:
        lines = (out / "runs" / f"pretrain_{name}" / "metrics.jsonl").read_text().splitlines()
        last[name] = max(json.loads(line)["step"] for line in lines if line.strip())
    assert set(last.values()) == {4}, last


def test_gap_closed_by_hand():
    def run(tr1, ir1, r_mean):
        return {"retrieval": {"tr_r1": tr1, "ir_r1": ir1, "r_mean": r_mean}}

    summary = {
        "baseline": run(4.0, 6.0, 20.0),  # mean R@1 5
        "capfilt": run(8.0, 10.0, 29.0),  # mean R@1 9
        "ablations": {"oracle": run(12.0, 14.0, 32.0)},  # mean R@1 13
    }
    gaps = gap_closed(summary)
    assert gaps["r1_mean"] == pytest.approx((9 - 5) / (13 - 5))
    assert gaps["r_mean"] == pytest.approx((29 - 20) / (32 - 20))
    assert [f.text for f in gap_figures(summary)] == ["0.50", "0.75"]
    # CapFilt above the oracle: above 1
    assert gap_ratio(5.0, 15.0, 13.0) == pytest.approx(1.25)
    # no gain to close, or no oracle: no figure
    assert gap_ratio(5.0, 9.0, 5.0) is None and gap_ratio(5.0, 9.0, None) is None
    summary["ablations"]["oracle"] = run(3.0, 3.0, 20.0)
    assert gap_closed(summary) == {"r1_mean": None, "r_mean": None}
    assert all("oracle not above baseline" in f.text for f in gap_figures(summary))
    del summary["ablations"]
    assert [f.text for f in gap_figures(summary)] == ["—", "—"]
    assert [r.name for r in ablation_rows(summary)] == ["baseline", "capfilt"]


def test_itc_alone_figures_by_hand():
    summary = {
        "baseline": {
            "retrieval": {"tr_r1": 4.0, "ir_r1": 6.0, "itc": {"tr_r1": 6.0, "ir_r1": 9.0}}
        },
        "capfilt": {"retrieval": {"tr_r1": 8.0, "ir_r1": 10.0}},  # evaluated at k = 0: no "itc"
    }
    rows = {r.key: r for r in retrieval_rows(summary)}
    assert (rows["r1_mean"].baseline, rows["r1_mean"].capfilt, rows["r1_mean"].delta) == (
        "5.0",
        "9.0",
        "+4.0",
    )
    assert (rows["itc.r1_mean"].baseline, rows["itc.r1_mean"].capfilt) == ("7.5", "—")
    base_row = ablation_rows(summary)[0]
    assert base_row.name == "baseline" and base_row.cells[-1] == "7.5"


def test_summary_gap_closed_matches_the_eval_files(demo):
    out, runs = demo
    summary = json.loads((out / "summary.json").read_text())

    def figures(name):
        r = json.loads((out / "eval" / f"{name}_retrieval.json").read_text())
        return (r["tr_r1"] + r["ir_r1"]) / 2, r["r_mean"]

    (b1, bm), (c1, cm), (o1, om) = (figures(n) for n in ("baseline", "capfilt", "oracle"))
    for key, (b, c, o) in (("r1_mean", (b1, c1, o1)), ("r_mean", (bm, cm, om))):
        expected = (c - b) / (o - b) if o > b else None
        assert summary["gap_closed"][key] == pytest.approx(expected)


def test_cli_table_and_report_show_every_run(demo):
    from capfilt.cli.main import app

    out, _ = demo
    args = ["demo", "tiny", "--out", str(out), "--ablations"]
    for item in FAST:
        args += ["--set", item]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pretrain-oracle: done earlier" in result.output
    for label in ("oracle", "filter only", "captioner only", "Gap closed, mean R@1", "ITC alone"):
        assert label in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["baseline"]["retrieval"]["itc"]) >= {"tr_r1", "ir_r1", "r_mean"}
    html = (out / "report.html").read_text()
    assert 'id="ablation-table"' in html
    for name in ("baseline", "oracle", "filter-only", "captioner-only", "capfilt"):
        assert f'<tr data-key="{name}">' in html
    assert 'data-key="gap_closed.r1_mean"' in html


def test_a_demo_folder_copied_elsewhere_resumes_without_rerunning(demo, tmp_path):
    # the demo's own shards are inputs of its stages: the manifest names them relative to the
    # run folder, so a copy (another disk, another user's scratch) is the same run
    import shutil

    out, runs = demo
    copy = tmp_path / "moved" / "demo"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert all(p.startswith("<run>/") for p in manifest["inputs"]["web"]), manifest["inputs"]
    events = []
    summary = run_demo(load_recipe("tiny", FAST), copy, on_stage=events.append, ablations=True)
    assert _ran(events) == []
    assert summary["ablations"] == runs["again"]["summary"]["ablations"]


def test_demo_restart_from_evaluate_reevaluates_with_a_changed_eval_setting(demo, tmp_path):
    import shutil

    from capfilt.cli.main import app

    out, runs = demo
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    args = ["demo", "tiny", "--out", str(copy), "--ablations"]
    for item in [*FAST, "eval.rerank_score=log_odds"]:
        args += ["--set", item]
    refused = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert refused.exit_code == 2, refused.output
    assert "--restart-from" in refused.output
    result = CliRunner().invoke(app, [*args, "--restart-from", "evaluate"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pretrain-capfilt: done earlier" in result.output  # nothing trained again
    assert "evaluate: done" in result.output
    summary = json.loads((copy / "summary.json").read_text())
    before = runs["again"]["summary"]
    for name in ("baseline", "capfilt"):
        again, old = summary[name]["retrieval"], before[name]["retrieval"]
        assert (again["rerank_score"], old["rerank_score"]) == ("log_odds", "blip")
        assert again["itc"] == old["itc"]  # same models, same ITC ranking
    bad = CliRunner().invoke(app, [*args, "--restart-from", "nonsense"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "nonsense" in bad.output
