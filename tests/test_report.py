"""``capfilt report``: the HTML page of a demo run, built from a fake run folder.

The fake run uses the real benchmark images (``write_synth`` with the tiny recipe), adds
synthetic captions like the captioner would, and invents ITM scores that separate clean from
noisy texts, so every section of the page has something real to show.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from capfilt.config import load_recipe
from capfilt.data.reader import read_samples
from capfilt.data.sample import build_sample, caption_entry
from capfilt.data.shards import expand_shards
from capfilt.data.synth import describe, noisy_text, write_synth
from capfilt.data.synth.world import Rng, Scene
from capfilt.data.writer import ShardWriter, parquet_path
from capfilt.report import render_report, write_report
from capfilt.report.charts import Series, histogram_chart, line_chart, nice_ticks

EVIL = "<script>alert('x')</script> & a red circle"
BASELINE = {
    "tr_r1": 41.2,
    "tr_r5": 70.0,
    "tr_r10": 80.5,
    "ir_r1": 30.1,
    "ir_r5": 61.0,
    "ir_r10": 74.4,
    "tr_mean": 63.9,
    "ir_mean": 55.17,
    "r_mean": 59.53,
}
CAPFILT = {
    "tr_r1": 45.6,
    "tr_r5": 73.1,
    "tr_r10": 82.0,
    "ir_r1": 33.3,
    "ir_r5": 63.2,
    "ir_r10": 75.0,
    "tr_mean": 66.9,
    "ir_mean": 57.17,
    "r_mean": 62.03,
}
SUMMARY = {
    "recipe": "demo",
    "seed": 0,
    "baseline": {"retrieval": BASELINE},
    "capfilt": {"retrieval": CAPFILT},
    "filter": {  # as capfilt.eval.filter_metrics.filter_report writes it
        "threshold": 0.5,
        "precision": 0.8125,
        "recall": 0.7391,
        "f1": 0.7741,
        "auc": 0.9012,
        "origins": {
            "web": {"n": 128, "kept": 82, "kept_fraction": 0.6406},
            "synthetic": {"n": 256, "kept": 226, "kept_fraction": 0.8828},
        },
        "rejection_by_noise": {
            "swap": {"n": 11, "rejected_fraction": 0.91},
            "attribute": {"n": 20, "rejected_fraction": 0.55},
            "generic": {"n": 30, "rejected_fraction": 0.97},
            "none": {"n": 67, "rejected_fraction": 0.08},
        },
        "clean_rejection_by_detail": {
            "terse": {"n": 30, "rejected_fraction": 0.1333},
            "full": {"n": 37, "rejected_fraction": 0.0270},
        },
        "sweep": [
            {
                "threshold": t,
                "precision": 0.5 + 0.4 * t,
                "recall": 1 - t,
                "f1": 0.6,
                "web_kept_fraction": 1 - 0.6 * t,
                "synthetic_kept_fraction": 1 - 0.3 * t,
            }
            for t in (0.1, 0.3, 0.5, 0.7, 0.9)
        ],
    },
    "captions": {"truth_rate": 0.734, "n": 256},
    "captioner": {
        "cider": 1.37,
        "truth_rate": 0.43,
        "by_method": {
            "nucleus": {"truth_rate": 0.43, "bleu4": 35.7, "cider": 1.37},
            "greedy": {"truth_rate": 0.538, "bleu4": 44.0, "cider": 1.6},
            "beam": {"truth_rate": None, "bleu4": 39.8, "cider": 1.507},
        },
    },
    "data": {"human": {"images": 96, "texts": 480}, "web": {"images": 128}},
    "timings": {"synth": 1.5, "pretrain-baseline": 95.0, "caption": 12.25},
}


def _metrics(path: Path, steps: int, with_lm: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(10, 10 * steps + 1, 10):
        itc, itm = 4.0 * math.exp(-step / 80) + 0.5, 0.7 * math.exp(-step / 150) + 0.1
        lm = 5.0 * math.exp(-step / 60) + 1.0 if with_lm else 0.0
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "loss": itc + itm + lm,
                    "loss_itc": itc,
                    "loss_itm": itm,
                    "loss_lm": lm,
                    "lr": 1e-3,
                    "epoch": 0,
                }
            )
        )
    lines.append('{"step": 999, "loss": 1.0')  # a line cut by a running job: skipped, not fatal
    path.write_text("\n".join(lines) + "\n")


def make_fake_run(root: Path, *, seed: int = 0) -> Path:
    """A demo-like run folder: summary, metrics, captioned shards and the filter's per-text parquet."""
    # only the web split is used: keep the others minimal
    synth_cfg = dataclasses.replace(load_recipe("tiny").synth, n_human=4, n_test=4)
    write_synth(root / "data", synth_cfg)
    captioned, filtered = root / "data" / "web_captioned", root / "data" / "web_filtered"
    rng, np_rng = Rng(seed, "fake-captioner"), np.random.default_rng(seed)
    for index, url in enumerate(expand_shards(str(root / "data" / "web"))):
        rows = []
        with ShardWriter(captioned, index, stage="caption", config_hash="fake") as writer:
            for n, sample in enumerate(read_samples([url])):
                truth = sample.meta["truth"]
                scene = Scene.from_dict(truth["scene"])
                web_text = EVIL if index == 0 and n == 0 else sample.text
                syn = [
                    describe(scene, rng),
                    describe(scene, rng)
                    if rng.chance(0.6)
                    else noisy_text("attribute", scene, rng),
                ]
                captions = [caption_entry(web_text, "web")] + [
                    caption_entry(t, "synthetic") for t in syn
                ]
                writer.write(
                    build_sample(
                        sample.key, sample.image_bytes, captions, source="synth-web", truth=truth
                    )
                )
                for position, cap in enumerate(captions):
                    good = truth["clean"] if cap["origin"] == "web" else position == 1
                    score = float(np.clip(np_rng.beta(5, 2) if good else np_rng.beta(2, 5), 0, 1))
                    row = {
                        "uid": sample.key,
                        "text_index": position,
                        "origin": cap["origin"],
                        "text": cap["text"],
                        "itm_score": score,
                        "itc_cosine": score - 0.5,
                        "kept": score > 0.5,
                        "truth_json": json.dumps(truth),
                    }
                    if cap["origin"] == "web":
                        row.update(clean=truth["clean"], noise=truth["noise"])
                    rows.append(row)
            writer.commit()
        filtered.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(parquet_path(filtered, index), index=False)
    for name in ("pretrain_baseline", "captioner", "filter", "pretrain_capfilt"):
        _metrics(root / "runs" / name / "metrics.jsonl", 30, with_lm=name != "filter")
    (root / "summary.json").write_text(json.dumps(SUMMARY))
    return root


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("run"))


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.scripts += tag == "script"

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Collector:
    parser = _Collector()
    parser.feed(html)
    parser.close()
    return parser


def _cell(html: str, table_id: str, key: str) -> list[str]:
    """The cell texts of the row ``data-key=key`` in table ``table_id``."""
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', html, re.S).group(0)
    row = re.search(rf'<tr[^>]*data-key="{re.escape(key)}"[^>]*>(.*?)</tr>', table, re.S).group(1)
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]


def test_full_report(fake_run: Path):
    out = write_report(fake_run)
    assert out == fake_run / "report.html"
    html = out.read_text(encoding="utf-8")
    parsed = _parse(html)
    tags = [t for t, _ in parsed.tags]

    # both tables, with the summary's numbers and the difference
    assert _cell(html, "retrieval-table", "tr_r1") == ["Text retrieval R@1", "41.2", "45.6", "+4.4"]
    assert _cell(html, "retrieval-table", "r_mean")[1:] == ["59.5", "62.0", "+2.5"]
    assert _cell(html, "filter-table", "precision")[1] == "0.812"  # 0.8125 rounds half to even
    assert _cell(html, "filter-table", "roc_auc")[1] == "0.901"
    assert _cell(html, "filter-table", "kept_fraction_web")[1] == "64.1%"
    assert _cell(html, "filter-table", "kept_fraction_synthetic")[1] == "88.3%"
    assert _cell(html, "filter-table", "by_noise.swap")[1] == "91.0%"
    assert _cell(html, "filter-table", "clean_detail.terse")[1] == "13.3%"
    assert _cell(html, "filter-table", "clean_detail.full")[1] == "2.7%"
    assert _cell(html, "filter-table", "truth_rate")[1] == "73.4%"

    # charts: a loss curve per run, histograms with a threshold marker, a sweep chart
    assert tags.count("svg") >= 4 + 3 + 1
    assert html.count('class="chart histogram"') == 3
    assert "threshold 0.5" in html
    assert html.count('class="chart line-chart"') == 5
    # the only missing parts: the cut last line of each metrics file
    missing = re.search(r'<div class="missing".*?</div>', html, re.S).group(0)
    assert (
        missing.count("<li>") == 4
        and "runs/captioner/metrics.jsonl: 1 unreadable line(s) skipped" in missing
    )

    # thumbnails: 12 examples, upscaled data URIs, with a mix of outcomes
    imgs = [a["src"] for t, a in parsed.tags if t == "img"]
    assert len(imgs) == 12
    assert all(src.startswith("data:image/png;base64,") for src in imgs)
    cats = set(re.findall(r'<span class="cat">([^<]*)</span>', html))
    assert {"noise rejected", "clean kept"} <= cats and len(cats) >= 3

    # self-contained and escaped
    assert "http://" not in html and "https://" not in html
    assert parsed.scripts == 0
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a red circle" in html


def test_thumbnail_is_nearest_upscale(fake_run: Path):
    import base64
    import io

    from PIL import Image

    html = render_report(fake_run, n_examples=1)
    src = re.search(r'<img src="data:image/png;base64,([^"]+)"', html).group(1)
    image = Image.open(io.BytesIO(base64.b64decode(src)))
    assert image.size == (128, 128)
    pixels = np.asarray(image)
    # nearest-neighbour 2x: every pixel repeated in a 2x2 block
    assert (pixels[0::2] == pixels[1::2]).all()
    assert (pixels[:, 0::2] == pixels[:, 1::2]).all()


def test_missing_parts_render_with_notes(fake_run: Path, tmp_path: Path):
    # an empty folder: every section says what is missing
    empty = tmp_path / "empty"
    empty.mkdir()
    html = render_report(empty)
    _parse(html)
    assert "summary.json not found" in html
    assert "runs/pretrain_baseline/metrics.jsonl not found" in html
    assert "data/web_captioned/ not found" in html
    assert _cell(html, "retrieval-table", "tr_r1")[1:] == ["—", "—", "—"]
    assert "<img" not in html

    # a partial run: baseline only, no filter stage yet, broken summary section types, no shards
    part = tmp_path / "partial"
    shutil.copytree(fake_run / "runs" / "pretrain_baseline", part / "runs" / "pretrain_baseline")
    (part / "data" / "web_captioned").mkdir(parents=True)
    (part / "summary.json").write_text(
        json.dumps(
            {
                "baseline": {"retrieval": BASELINE},
                "capfilt": {},
                "filter": "oops",
                "timings": "x",
                "data": {"web": {"images": "many"}},
            }
        )
    )
    (part / "stages").mkdir()
    (part / "stages" / "synth.json").write_text(json.dumps({"stage": "synth", "seconds": 75.0}))
    (part / "recipe.json").write_text(
        json.dumps({"hash": "x", "recipe": {"name": "tiny", "seed": 3}})
    )
    html = render_report(part)
    _parse(html)
    assert "1 min 15 s" in html and "seed <b>3</b>" in html  # from the demo's side files
    assert _cell(html, "retrieval-table", "tr_r1")[1:] == ["41.2", "—", "—"]
    assert "CapFilt retrieval results missing" in html
    assert "filter evaluation missing" in html
    assert "has no .tar shards" in html
    assert html.count('class="chart line-chart"') == 1

    # parquet present but the summary lacks the filter: numbers come from the parquet, marked
    shutil.copytree(fake_run / "data" / "web_filtered", part / "data" / "web_filtered")
    html = render_report(part)
    assert "computed by the report from the per-text scores in data/web_filtered" in html
    texts = pd.concat(
        [pd.read_parquet(p) for p in sorted((part / "data" / "web_filtered").glob("*.parquet"))]
    )
    web = texts[texts.origin == "web"]
    assert _cell(html, "filter-table", "kept_fraction_web")[1] == f"{100 * web.kept.mean():.1f}%*"
    assert html.count('class="chart histogram"') == 3

    # garbage summary.json: noted, not fatal
    (part / "summary.json").write_text("{not json")
    assert "summary.json unreadable" in render_report(part)


def test_demo_table_and_report_show_the_same_figures(fake_run: Path):
    from rich.console import Console

    from capfilt.cli.demo_cmds import summary_tables

    html = render_report(fake_run)
    console = Console(record=True, width=200)
    for table in summary_tables(SUMMARY):
        console.print(table)
    printed = console.export_text()
    assert _cell(html, "filter-table", "test_truth.greedy") == [
        "Test captions true, greedy",
        "53.8%",
    ]
    # without a truth (real data), the method's CIDEr
    assert _cell(html, "filter-table", "test_cider.beam") == [
        "Test captions CIDEr-D ×100, beam",
        "1.5",
    ]
    keys = ("precision", "roc_auc", "kept_fraction_web", "by_noise.none", "truth_rate")
    for key in (*keys, "test_truth.nucleus", "test_cider.beam"):
        label, value = _cell(html, "filter-table", key)
        assert re.search(rf"{re.escape(label)}\s*│\s*{re.escape(value)}\s", printed), (label, value)
    label, base, cap, delta = _cell(html, "retrieval-table", "ir_r1")
    assert re.search(rf"{label}\s*│\s*{base}\s*│\s*{cap}\s*│\s*\{delta}", printed)
    assert "Total time" in printed


def test_demo_table_leaves_out_retrieval_when_nothing_was_evaluated():
    from capfilt.cli.demo_cmds import summary_tables

    no_test = {k: v for k, v in SUMMARY.items() if k not in ("baseline", "capfilt")}
    titles = [table.title for table in summary_tables(no_test)]
    assert titles == ["Filter and captioner"]
    # a run that measured nothing yet (bootstrap --only pretrain-baseline): no rows of dashes
    (nothing,) = summary_tables({"total_seconds": 12.0})
    assert [row for row in nothing.columns[0].cells] == ["Total time"]
    assert [t.title for t in summary_tables(SUMMARY)] == [
        "Baseline vs CapFilt",
        "Filter and captioner",
    ]


def test_cli_writes_report(fake_run: Path, tmp_path: Path):
    from capfilt.cli.main import app

    out = tmp_path / "sub" / "r.html"
    result = CliRunner().invoke(
        app, ["report", str(fake_run), "--out", str(out), "--examples", "3"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.read_text().count("<img ") == 3
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    # --out names a folder: report.html inside it; none asked for, the page says so
    result = CliRunner().invoke(
        app, ["report", str(fake_run), "--out", str(out.parent), "--examples", "0"]
    )
    assert result.exit_code == 0, result.output
    page = (out.parent / "report.html").read_text()
    assert "<img " not in page and "No example images: --examples 0." in page
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "is a file" in result.output


def test_charts_handle_edge_cases():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 3)  # a flat series still gets an axis
    one = line_chart([Series("loss", [5], [2.0])], title="t", x_label="step", y_label="loss")
    assert "<circle" in one
    nan = line_chart(
        [Series("loss", [1, 2], [float("nan"), float("inf")])], title="t", x_label="x", y_label="y"
    )
    assert "no data points" in nan
    assert "no texts" in histogram_chart([0, 0.5, 1], [("kept", [0, 0], "#0f0")], title="h")
    assert "&lt;b&gt;" in histogram_chart(
        [0, 0.5, 1], [("<b>", [1, 2], "#0f0")], title="h", threshold=0.5
    )


def test_a_stage_folder_gets_only_the_sections_it_can_fill(fake_run: Path, tmp_path: Path):
    # a caption stage's output: its images and texts; no filter has scored them
    captioned = tmp_path / "captioned"
    shutil.copytree(fake_run / "data" / "web_captioned", captioned)
    html = render_report(captioned)
    sections = re.findall(r'<section id="(\w+)"', html)
    assert sections == ["overview", "examples"]
    assert "CapFilt report: a caption stage output" in html and "<h2>1. Examples</h2>" in html
    assert 'id="retrieval-table"' not in html and 'id="filter-table"' not in html
    assert 'class="score"' not in html and "no score" not in html and "<img" in html
    # the truth is known, the decision is not: no example is called rejected or kept
    categories = re.findall(r'<span class="cat">([^<]*)</span>', html)
    assert categories and set(categories) <= {"noisy web text", "clean web text"}
    assert "noisy web text" in categories
    images = sum(1 for _ in read_samples(expand_shards(str(captioned))))
    assert f"<th>images</th><td>{images}</td>" in html

    # another tool's tars (img2dataset's: 5-digit names, a _stats.json naming no stage)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(next(captioned.glob("*.tar")), foreign / "00000.tar")
    (foreign / "00000_stats.json").write_text(json.dumps({"count": 999, "successes": 9}))
    html = render_report(foreign)
    assert "CapFilt report: shards no caption or filter stage wrote" in html
    assert "<img" in html and "<td>999</td>" not in html

    # a training run: its loss curves alone, and how far it got
    training = tmp_path / "captioner"
    shutil.copytree(fake_run / "runs" / "captioner", training)
    html = render_report(training)
    assert re.findall(r'<section id="(\w+)"', html) == ["overview", "losses"]
    assert "<h2>1. Training loss</h2>" in html and html.count('class="chart line-chart"') == 1
    assert "<th>last logged step</th><td>300</td>" in html
    assert "model/ not found: the run has not finished, or was stopped (last logged step 300)" in (
        " ".join(html.split())
    )
    (training / "model").mkdir()
    assert 'id="missing"' not in render_report(training)

    # a filter's per-text tables: decisions, histograms and examples, no retrieval or losses
    filtered = tmp_path / "filtered"
    shutil.copytree(fake_run / "data" / "web_filtered", filtered)
    html = render_report(filtered)
    assert re.findall(r'<section id="(\w+)"', html) == ["overview", "filter", "scores", "examples"]
    assert "<h2>1. Filter on web noise, and caption truth</h2>" in html
    assert 'id="retrieval-table"' not in html and html.count('class="chart histogram"') == 3


def test_report_of_a_folder_of_runs_names_them_and_exits_2(fake_run: Path, tmp_path: Path):
    from capfilt.cli.main import app

    runs = tmp_path / "runs"
    shutil.copytree(fake_run, runs / "first")
    shutil.copytree(fake_run / "runs" / "filter", runs / "more" / "filter_training")
    result = CliRunner().invoke(app, ["report", str(runs)])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert f"{runs / 'first'} (a bootstrap or demo run)" in out
    assert f"{runs / 'more' / 'filter_training'} (a training run)" in out
    assert f"capfilt report {runs / 'first'}" in out
    assert not (runs / "report.html").exists()
    # a user's own layout: a training run under runs/ and a filter's output beside it
    proj = tmp_path / "proj"
    shutil.copytree(fake_run / "runs" / "filter", proj / "runs" / "pre")
    shutil.copytree(fake_run / "data" / "web_filtered", proj / "web_filtered")
    result = CliRunner().invoke(app, ["report", str(proj)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{proj / 'runs' / 'pre'} (a training run)" in out
    assert f"{proj / 'web_filtered'} (a filter stage output)" in out
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    result = CliRunner().invoke(app, ["report", str(empty)])
    assert result.exit_code == 2 and "holds no capfilt run" in result.output
    # a training run's model/: its weights, not its figures; the run is named
    from capfilt.model.folder import CONFIG

    model = proj / "runs" / "pre" / "model"
    model.mkdir()
    (model / CONFIG).write_text("{}")
    result = CliRunner().invoke(app, ["report", str(model)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{model} is a capfilt model folder" in out
    assert f"`capfilt report {proj / 'runs' / 'pre'}`" in out


def test_a_runs_overview_counts_the_input_its_stages_skipped(tmp_path):
    run = tmp_path / "run"
    captioned = run / "data" / "web_captioned"
    captioned.mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    (captioned / "sizes.json").write_text(json.dumps({"00000000.tar": 3, "00000001.tar": 4}))
    for index, skipped in enumerate(({"undecodable_image": 2}, {"undecodable_image": 1})):
        marker = {"stage": "caption", "count": 3 + index, "skipped": skipped}
        (captioned / f"{index:08d}_stats.json").write_text(json.dumps(marker))
    html = render_report(run)
    assert "<th>web_captioned images</th><td>7</td>" in html
    assert "<th>web_captioned: input skipped, undecodable_image</th><td>3</td>" in html


def test_a_released_models_run_has_no_baseline_by_design_not_missing(tmp_path):
    """Released models re-pretrained (--pretrain-after) and tested: CapFilt's retrieval shows;
    the absent baseline is explained, not listed as a part that went missing."""
    run = tmp_path / "run"
    run.mkdir()
    inputs = {"captioner": "cap", "filter": "filt", "pretrain_after": True}
    (run / "manifest.json").write_text(json.dumps({"inputs": inputs}))
    (run / "summary.json").write_text(json.dumps({"capfilt": {"retrieval": CAPFILT}}))
    html = " ".join(render_report(run).split())
    assert _cell(html, "retrieval-table", "tr_r1")[1:3] == ["—", f"{CAPFILT['tr_r1']:.1f}"]
    assert "baseline retrieval results missing" not in html
    assert "no baseline: the captioner and filter were released models" in html


def test_a_filter_decided_by_another_rule_is_described_by_that_rule(fake_run: Path, tmp_path):
    """Rule itc/both used to be shown as 'ITM threshold 0.50' (the recipe's, unused), with a
    dashed ITM line the decisions did not follow and every decision off that line counted as a
    disagreement; the rule and its ITC threshold appeared nowhere."""
    from capfilt.cli.main import app
    from capfilt.config import FilterConfig
    from capfilt.eval.filter_metrics import stored_rule
    from capfilt.pipeline.bootstrap import filter_metrics
    from capfilt.pipeline.filter import rethreshold_shards
    from capfilt.pipeline.summary import filter_figures

    scored, images = fake_run / "data" / "web_filtered", str(fake_run / "data" / "web_captioned")
    both, itc = tmp_path / "both", tmp_path / "itc"
    rethreshold_shards(scored, [images], both, FilterConfig(rule="both", itc_threshold=0.1))
    rethreshold_shards(scored, [images], itc, FilterConfig(rule="itc", itc_threshold=-0.3))
    # what a run's summary.json holds: judged by the rule the filter applied
    for folder, rule in ((both, "both"), (itc, "itc")):
        report = filter_metrics(folder, stored_rule(folder))
        assert report["rule"]["rule"] == rule and report["kept_disagrees_with_threshold"] == 0
    assert report["threshold"] is None  # rule itc has no ITM threshold
    keys = [f.key for f in filter_figures(report)]
    assert "itc_threshold" in keys and "threshold" not in keys

    out = tmp_path / "e.json"
    result = CliRunner().invoke(
        app, ["eval", "filter", "tiny", "--scores", str(both), "-o", str(out)]
    )
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "filter rule both: ITM > 0.50 and ITC cosine > 0.100 (the filter run's)" in said
    assert "ITC cosine threshold" in said
    got = json.loads(out.read_text())
    assert got["kept_disagrees_with_threshold"] == 0
    assert got["rule"] == {
        "rule": "both",
        "threshold": 0.5,
        "itc_threshold": 0.1,
        "keep_fraction": None,
    }

    html = " ".join(render_report(both).split())
    assert "The filter kept a text when ITM &gt; 0.50 and ITC cosine &gt; 0.100 (rule both)" in html
    assert "the dashed line is the ITM threshold (rule both" in html
    html = " ".join(render_report(itc).split())
    assert "The filter kept a text when ITC cosine &gt; -0.300 (rule itc)" in html
    assert "no threshold line is drawn" in html and "threshold 0.5" not in html
    assert "ITM threshold" not in html

    fraction = {
        "rule": {"rule": "both", "threshold": 0.33, "itc_threshold": 0.12, "keep_fraction": 0.5}
    }
    texts = {f.key: f.text for f in filter_figures(fraction)}
    assert (texts["threshold"], texts["itc_threshold"], texts["keep_fraction"]) == (
        "0.33", "0.120", "50.0%",
    )  # fmt: skip
