"""``capfilt bootstrap``: the whole loop on small shards, resumed after a kill, extended by a
round, refused on a changed recipe; and the README's "Your own data" steps on coco-mini."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from capfilt.config import FilterConfig, load_recipe
from capfilt.data.synth import write_synth
from capfilt.eval.filter_metrics import load_score_tables
from capfilt.pipeline.bootstrap import BootstrapConflict, BootstrapInputs, run_bootstrap
from capfilt.pipeline.filter import rethreshold_shards

FAST = [
    "train.epochs=1",
    "finetune.captioner.epochs=1",
    "finetune.filter.epochs=1",
    "caption.max_length=8",
    "caption.min_length=2",
    "eval.k=4",
    "filter.itc_cosine=true",  # recorded: a filter folder is re-decided on the cosine below
]
"""Overrides of the tiny recipe that keep every stage to a few optimiser steps."""
SYNTH = ["synth.n_human=16", "synth.n_web=16", "synth.n_test=8", "synth.shard_size=8"]
# Bootstrap runs compared to the bit (a resumed one with an uninterrupted one) train on the CPU
# even where a GPU is visible: capfilt asks for deterministic kernels on CPUs only.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module", autouse=True)
def _on_cpu():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "capfilt", *args]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("boot-data")
    write_synth(root, load_recipe("tiny", SYNTH).synth)
    return root


def _inputs(shards: Path, **kw) -> BootstrapInputs:
    return BootstrapInputs(
        human=[str(shards / "human")],
        web=[str(shards / "web")],
        test=[str(shards / "test")],
        **kw,
    )


def _args(shards: Path, out: Path) -> list[str]:
    args = ["bootstrap", "tiny", "--out", str(out)]
    for name in ("human", "web", "test"):
        args += [f"--{name}", str(shards / name)]
    for item in FAST:
        args += ["--set", item]
    return args


def _texts(folder: Path) -> pd.DataFrame:
    table = load_score_tables(folder)
    return table[["uid", "text_index", "origin", "text", "itm_score", "itc_cosine", "kept"]]


@pytest.fixture(scope="module")
def run_a(shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("boot") / "a"
    events = []
    summary = run_bootstrap(load_recipe("tiny", FAST), _inputs(shards), out, on_stage=events.append)
    return out, {"summary": summary, "events": events}


def test_bootstrap_runs_every_stage_and_writes_manifest_and_summary(run_a, shards):
    out, info = run_a
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    order = [
        "pretrain-baseline", "finetune-captioner", "finetune-filter", "caption", "filter",
        "pretrain-capfilt", "evaluate",
    ]  # fmt: skip
    assert sorted(stages) == sorted(order)
    assert all(rec["status"] == "done" for rec in stages.values())
    # paths inside the run folder relative to it, others absolute: true wherever it is moved
    assert stages["caption"]["output"] == os.path.join("data", "web_captioned")
    assert stages["pretrain-capfilt"]["inputs"] == [
        str(shards / "human"), os.path.join("data", "web_filtered")
    ]  # fmt: skip
    assert stages["evaluate"]["output"] == "eval"
    done = [e for e in info["events"] if e.status == "done"]
    assert [e.key for e in done] == order and all(e.output.exists() for e in done)
    summary = json.loads((out / "summary.json").read_text())
    for part in ("baseline", "capfilt"):
        assert 0 <= summary[part]["retrieval"]["r_mean"] <= 100
    assert summary["captioner"]["n_images"] == 8 and "cider" in summary["captioner"]
    # BLIP's nucleus sampling writes the data; greedy and beam search are reported beside it
    by_method = summary["captioner"]["by_method"]
    assert sorted(by_method) == ["beam", "greedy", "nucleus"]
    assert by_method["nucleus"]["cider"] == summary["captioner"]["cider"]
    texts = _texts(out / "data" / "web_filtered")
    assert summary["filter"]["n_texts"] == len(texts)
    assert set(summary["timings"]) == set(stages)
    assert summary["outputs"]["filter"] == os.path.join("data", "web_filtered")
    assert len(summary["rounds"]) == 1

    # a second run resumes: nothing is redone
    events = []
    run_bootstrap(load_recipe("tiny", FAST), _inputs(shards), out, on_stage=events.append)
    assert {e.status for e in events} == {"done-earlier"}


def test_a_project_moved_whole_resumes_and_moved_data_is_named(run_a, shards, tmp_path):
    """A folder holding the run folder and its data, moved or copied whole, resumes: the
    inputs are where they were relative to the run folder."""
    out, _ = run_a
    common = Path(os.path.commonpath([out, shards]))
    moved_out, moved_shards = (
        tmp_path / out.relative_to(common),
        tmp_path / shards.relative_to(common),
    )
    shutil.copytree(out, moved_out)
    shutil.copytree(shards, moved_shards)
    events = []
    run_bootstrap(
        load_recipe("tiny", FAST), _inputs(moved_shards), moved_out, on_stage=events.append
    )
    assert events and {e.status for e in events} == {"done-earlier"}
    for name in ("manifest.json", "summary.json"):  # nothing names where the run was
        assert str(out) not in (moved_out / name).read_text(), name
    # the data alone moved: the refusal says which input changed, from where to where
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(shards, elsewhere)
    with pytest.raises(BootstrapConflict) as refused:
        run_bootstrap(load_recipe("tiny", FAST), _inputs(elsewhere), moved_out)
    said = str(refused.value)
    assert f"--web: {moved_shards / 'web'} -> {elsewhere / 'web'}" in said
    assert "--restart-from pretrain-baseline" in said


def test_a_changed_recipe_is_refused_unless_restarted(run_a, shards):
    out, _ = run_a
    # a filter setting is first read by the filter stage: the stages before it stay
    with pytest.raises(BootstrapConflict, match="--restart-from filter ") as refused:
        run_bootstrap(load_recipe("tiny", [*FAST, "filter.threshold=0.2"]), _inputs(shards), out)
    # it names what changed, and the recipe the run was made with
    assert "another recipe (filter.threshold: 0.5 -> 0.2)" in str(refused.value)
    assert f"the recipe it was made with ({out / 'recipe.yaml'})" in str(refused.value)
    # a restart later than the first stage a change affects would keep stages made without it
    manifest, recipe_yaml = (out / "manifest.json").read_bytes(), (out / "recipe.yaml").read_bytes()
    for change, later, first in (
        ("train.lr=0.5", "evaluate", "pretrain-baseline"),
        ("caption.prompt='a photo of '", "caption", "finetune-captioner"),
        ("filter.threshold=0.2", "pretrain-capfilt", "filter"),
    ):
        with pytest.raises(BootstrapConflict, match=f"affects {first} and every stage after"):
            recipe = load_recipe("tiny", [*FAST, change])
            run_bootstrap(recipe, _inputs(shards), out, restart_from=later)
    other_web = _inputs(shards)
    other_web.web = [str(shards / "human")]
    with pytest.raises(
        BootstrapConflict,
        match=r"other inputs \(--web: .*/web -> .*/human\): the change affects pretrain-base",
    ):
        run_bootstrap(load_recipe("tiny", FAST), other_web, out, restart_from="evaluate")
    assert (out / "manifest.json").read_bytes() == manifest
    assert (out / "recipe.yaml").read_bytes() == recipe_yaml
    from capfilt.cli.main import app

    result = CliRunner().invoke(app, [*_args(shards, out), "--set", "train.lr=0.5"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "another recipe (train.lr: 0.001 -> 0.5)" in text
    # the run folder's recipe.yaml resumes it (nothing to redo)
    events = []
    run_bootstrap(load_recipe(out / "recipe.yaml"), _inputs(shards), out, on_stage=events.append)
    assert {e.status for e in events} == {"done-earlier"}
    result = CliRunner().invoke(app, [*_args(shards, out), "--only", "bogus"])
    assert result.exit_code == 2 and "unknown stage" in result.output

    # another test set only invalidates the evaluation
    other = _inputs(shards)
    other.test = [str(shards / "human")]
    with pytest.raises(BootstrapConflict, match="--restart-from evaluate"):
        run_bootstrap(load_recipe("tiny", FAST), other, out)

    # stopped as the restarted stage begins: the old figures are gone, the report says so
    class Stop(Exception):
        pass

    def stop(event):
        if event.status == "start":
            raise Stop

    assert (out / "summary.json").is_file()
    with pytest.raises(Stop):
        run_bootstrap(load_recipe("tiny", FAST), other, out, restart_from="evaluate", on_stage=stop)
    assert not (out / "summary.json").exists()
    from capfilt.report import render_report

    page = " ".join(render_report(out).split())
    assert "manifest.json: not finished: evaluate (running or stopped)" in page
    assert "summary.json not found" in page
    events = []
    summary = run_bootstrap(
        load_recipe("tiny", FAST), other, out, restart_from="evaluate", on_stage=events.append
    )
    assert [e.key for e in events if e.status == "done"] == ["evaluate"]
    assert summary["captioner"]["n_images"] == 16  # the human shards now
    run_bootstrap(load_recipe("tiny", FAST), _inputs(shards), out, restart_from="evaluate")


def test_a_change_to_stages_not_yet_finished_needs_no_restart(shards, tmp_path):
    """A stage failed on its settings (or was stopped) before finishing: the corrected
    command runs; a change that touches a finished stage is still refused."""

    class Stop(Exception):
        pass

    def stop_at_captioner(event):
        if event.key == "finetune-captioner" and event.status == "start":
            raise Stop

    out = tmp_path / "run"
    with pytest.raises(Stop):
        run_bootstrap(load_recipe("tiny", FAST), _inputs(shards), out, on_stage=stop_at_captioner)
    with pytest.raises(BootstrapConflict, match="--restart-from pretrain-baseline"):
        run_bootstrap(load_recipe("tiny", [*FAST, "train.lr=0.5"]), _inputs(shards), out)
    events = []
    changed = load_recipe("tiny", [*FAST, "finetune.captioner.lr=0.002"])
    with pytest.raises(Stop):
        run_bootstrap(
            changed,
            _inputs(shards),
            out,
            on_stage=lambda e: (events.append(e), stop_at_captioner(e)),
        )
    assert [(e.key, e.status) for e in events] == [
        ("pretrain-baseline", "done-earlier"),
        ("finetune-captioner", "start"),
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "recipe.yaml").read_text().count("lr: 0.002") == 1
    assert manifest["stages"]["pretrain-baseline"]["status"] == "done"


def test_a_stage_says_when_its_model_was_trained_with_another_recipe(run_a, capsys):
    """``capfilt caption --model my-run/runs/captioner`` takes the default recipe's (demo's)
    caption settings: it says so when the model's run used another recipe."""
    from capfilt.cli.common import warn_of_another_recipe
    from capfilt.runs.resolve import training_recipe_name

    out, _ = run_a
    run = out / "runs" / "captioner"
    assert training_recipe_name(run) == training_recipe_name(run / "model") == "tiny"
    assert training_recipe_name(out / "no-such-model") is None
    capsys.readouterr()
    warn_of_another_recipe(run, load_recipe("demo"), "caption", "caption")
    said = " ".join(capsys.readouterr().err.split())
    assert f"warning: {run} was trained with recipe 'tiny'" in said
    assert "caption.* settings from recipe 'demo'" in said and "capfilt caption tiny ..." in said
    warn_of_another_recipe(run, load_recipe("tiny"), "caption", "caption")
    assert capsys.readouterr().err == ""


def test_kill_during_caption_then_resume_gives_the_same_outputs(run_a, shards, tmp_path):
    a, _ = run_a
    b = tmp_path / "b"
    proc = subprocess.Popen(
        _cli(*_args(shards, b)),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    manifest = b / "manifest.json"
    state = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = json.loads(manifest.read_text())["stages"].get("caption", {}).get("status")
        except (OSError, ValueError):
            state = None
        if state == "running":
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state == "running", "the kill should land in the caption stage"
    stages = json.loads(manifest.read_text())["stages"]
    assert "filter" not in stages and stages["finetune-filter"]["status"] == "done"

    events = []
    run_bootstrap(load_recipe("tiny", FAST), _inputs(shards), b, on_stage=events.append)
    redone = [e.key for e in events if e.status == "done"]
    assert redone == ["caption", "filter", "pretrain-capfilt", "evaluate"]
    pd.testing.assert_frame_equal(
        _texts(a / "data" / "web_filtered"), _texts(b / "data" / "web_filtered")
    )
    for run in ("pretrain_baseline", "pretrain_capfilt"):
        weights = f"runs/{run}/model/model.safetensors"
        left, right = load_file(a / weights), load_file(b / weights)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), run


def test_two_rounds(run_a, shards):
    out, _ = run_a
    summary = run_bootstrap(load_recipe("tiny", FAST), _inputs(shards, rounds=2), out)
    round_2 = out / "round_2"
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert manifest["round_2/finetune-captioner"]["status"] == "done"
    config = (round_2 / "runs" / "captioner" / "config.yaml").read_text()
    assert str(out / "runs" / "pretrain_capfilt") in config  # fine-tuned from round 1's model
    assert manifest["round_2/caption"]["inputs"] == [
        os.path.join("round_2", "runs", "captioner"), str(shards / "web")  # the original web
    ]  # fmt: skip
    assert summary["outputs"]["round_2/filter"] == os.path.join("round_2", "data", "web_filtered")
    assert (round_2 / "runs" / "pretrain_capfilt" / "model" / "capfilt.json").is_file()
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["capfilt"] == summary["rounds"][1]["capfilt"]
    assert len(_texts(round_2 / "data" / "web_filtered")) == len(
        _texts(out / "data" / "web_filtered")
    )
    # the report's tables are the last round's: its scores, examples and loss curves with them
    from capfilt.report.load import load_run

    data = load_run(out)
    assert data.filtered_label == "round_2/data/web_filtered"
    assert data.captioned_label == "round_2/data/web_captioned"
    round_texts = _texts(round_2 / "data" / "web_filtered")
    assert data.texts[["uid", "text", "itm_score"]].equals(
        round_texts[["uid", "text", "itm_score"]].reset_index(drop=True)
    )
    assert {"captioner (round 2)", "pretrain_capfilt (round 2)", "pretrain_baseline"} <= set(
        data.metrics
    )
    assert data.summary["data"]["round_2/web_captioned images"] == 16
    # --only names a stage of every round: refused before anything is removed or run
    manifest_bytes = (out / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="stage round_2/filter would run but needs round_2/fin"):
        run_bootstrap(
            load_recipe("tiny", [*FAST, "filter.threshold=0.3"]),
            _inputs(shards, rounds=2),
            out,
            restart_from="filter",
            only=("filter",),
        )
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    assert any((round_2 / "data" / "web_filtered").glob("*.tar"))
    # the terminal's tables say whose figures they show
    from capfilt.cli.demo_cmds import summary_tables

    titles = [table.title for table in summary_tables(summary)]
    assert titles == ["Baseline vs CapFilt (round 2 of 2)", "Filter and captioner (round 2 of 2)"]


def test_released_models_caption_and_filter_only(run_a, shards, tmp_path):
    a, _ = run_a
    inputs = BootstrapInputs(
        web=[str(shards / "web")],
        captioner=str(a / "runs" / "captioner"),
        filter=str(a / "runs" / "filter"),
    )
    summary = run_bootstrap(load_recipe("tiny", FAST), inputs, tmp_path / "rel")
    stages = json.loads((tmp_path / "rel" / "manifest.json").read_text())["stages"]
    assert sorted(stages) == ["caption", "evaluate", "filter"]
    pd.testing.assert_frame_equal(
        _texts(a / "data" / "web_filtered"), _texts(tmp_path / "rel" / "data" / "web_filtered")
    )
    assert summary["filter"]["n_texts"] > 0 and summary["baseline"] == {}
    # its report: the stages it ran, not the pretrains and fine-tunes it never had
    from capfilt.report import render_report

    page = " ".join(render_report(tmp_path / "rel").split())
    assert "with released models" in page and "no model is pretrained or fine-tuned" in page
    assert "metrics.jsonl not found" not in page and 'id="retrieval"' not in page
    assert 'id="losses"' not in page and "<h2>1. Filter on web noise" in page
    # a model setting changes every stage this run has: the first of them is named
    with pytest.raises(BootstrapConflict, match="pass --restart-from caption to redo"):
        run_bootstrap(
            load_recipe("tiny", [*FAST, "model.text_dropout=0.2"]), inputs, tmp_path / "rel"
        )
    with pytest.raises(ValueError, match="--pretrain-after"):
        run_bootstrap(load_recipe("tiny", FAST), BootstrapInputs(
            web=inputs.web, captioner=inputs.captioner, filter=inputs.filter, rounds=2
        ), tmp_path / "rel2")  # fmt: skip


def test_released_models_another_filter_keeps_the_captions(run_a, shards, tmp_path):
    """Captions do not depend on the filter: another --filter redoes the filter and what follows
    it, and --pretrain-after added to a finished run only adds the re-pretrain."""
    a, _ = run_a
    out = tmp_path / "rel"
    inputs = BootstrapInputs(
        web=[str(shards / "web")],
        captioner=str(a / "runs" / "captioner"),
        filter=str(a / "runs" / "filter"),
    )
    run_bootstrap(load_recipe("tiny", FAST), inputs, out)
    captioned = sorted((out / "data" / "web_captioned").glob("*.tar"))
    made = [p.stat().st_mtime_ns for p in captioned]
    inputs.filter = str(a / "runs" / "pretrain_baseline")
    with pytest.raises(BootstrapConflict, match="pass --restart-from filter to redo"):
        run_bootstrap(load_recipe("tiny", FAST), inputs, out)
    events = []
    run_bootstrap(
        load_recipe("tiny", FAST), inputs, out, restart_from="filter", on_stage=events.append
    )
    assert [(e.key, e.status) for e in events if e.status != "start"] == [
        ("caption", "done-earlier"), ("filter", "done"), ("evaluate", "done"),
    ]  # fmt: skip
    assert [p.stat().st_mtime_ns for p in captioned] == made
    events = []
    inputs.human, inputs.pretrain_after = [str(shards / "human")], True
    run_bootstrap(load_recipe("tiny", FAST), inputs, out, on_stage=events.append)
    assert [(e.key, e.status) for e in events if e.status != "start"] == [
        ("caption", "done-earlier"), ("filter", "done-earlier"), ("pretrain-capfilt", "done"),
        ("evaluate", "done"),
    ]  # fmt: skip
    # another captioner: the captions are redone
    inputs.captioner = str(a / "runs" / "pretrain_baseline")
    with pytest.raises(BootstrapConflict, match="pass --restart-from caption to redo"):
        run_bootstrap(load_recipe("tiny", FAST), inputs, out)


def test_a_model_fine_tuned_for_the_other_half_is_warned_of_before_and_after(
    run_a, shards, tmp_path
):
    """A filter given as --captioner runs (its LM head is the pretrain's, not noise), but the
    warning is printed apart from the log, before the first stage and again at the end."""
    a, _ = run_a
    out = tmp_path / "rel"
    args = ["bootstrap", "tiny", "--out", str(out), "--web", str(shards / "web")]
    args += ["--captioner", str(a / "runs" / "filter"), "--filter", str(a / "runs" / "filter")]
    for item in FAST:
        args += ["--set", item]
    proc = subprocess.run(
        _cli(*args, "--only", "caption"), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    warning = (
        f"warning: --captioner {a / 'runs' / 'filter'} was made by stage 'filter', not a captioner"
    )
    assert said.count(warning) == 2, said
    assert "the LM head was not fine-tuned for captioning; give a captioner (a capfilt" in said
    assert said.index(warning) < said.index("bootstrap: caption ...")


def test_a_mistyped_input_stops_the_run_before_its_first_stage(shards, tmp_path):
    """Each input is looked for before anything is written: the corrected command then starts
    afresh (no manifest naming the typo to be refused against)."""
    from capfilt.data.shards import ShardSpecError

    out = tmp_path / "run"
    for option, bad in (("test", "tset"), ("human", "humna")):
        inputs = _inputs(shards)
        setattr(inputs, option, [str(shards / bad)])
        with pytest.raises(ShardSpecError, match=f"--{option}: .*{bad}"):
            run_bootstrap(load_recipe("tiny", FAST), inputs, out)
        assert not out.exists()
    released = BootstrapInputs(
        web=[str(shards / "web")], captioner=str(tmp_path / "no-cap"), filter=str(tmp_path)
    )
    with pytest.raises(ValueError, match="--captioner: no capfilt model at .*no-cap"):
        run_bootstrap(load_recipe("tiny", FAST), released, out)
    assert not out.exists()
    proc = subprocess.run(
        _cli(*_args(shards, out)[:-2 * len(FAST)], "--test", str(shards / "tset")),
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--test:" in proc.stderr and "tset" in proc.stderr, proc.stderr
    assert not out.exists()


def test_report_on_a_bootstrap_folder_a_filter_folder_and_an_empty_one(run_a, shards, tmp_path):
    from capfilt.report import render_report

    out, _ = run_a
    html = render_report(out)
    assert 'id="retrieval"' in html or "Baseline" in html
    assert "summary.json not found" not in html and "<img" in html
    # the captioner's test figures are on the page; only the demo's truth rate is not
    assert "Test captions true, nucleus" in html
    assert "synthetic caption truth rate: `capfilt demo` computes it" in html
    if (out / "round_2").is_dir():  # after test_two_rounds
        assert 'id="rounds"' in html
    # a filter folder alone: re-decided to keep half of the run's texts (a whole-run quantile)
    texts = _texts(out / "data" / "web_filtered")
    half = tmp_path / "half"
    rethreshold_shards(
        out / "data" / "web_filtered",
        [str(out / "data" / "web_captioned")],
        half,
        FilterConfig(rule="itc", keep_fraction=0.5),
    )
    cosines = sorted(texts["itc_cosine"], reverse=True)
    cut = cosines[round(0.5 * len(cosines))]
    assert json.loads((half / "summary.json").read_text())["rule"]["itc_threshold"] == cut
    decided = _texts(half)
    assert decided["kept"].sum() == (texts["itc_cosine"] > cut).sum() > 0
    alone = render_report(half)
    assert "CapFilt report: a filter stage output" in alone and "<img" in alone and "<svg" in alone
    assert (
        f"The filter kept a text when ITC cosine &gt; {cut:.3f} (rule itc, keep_fraction 0.5 set"
        in alone
    )
    assert "no threshold line is drawn" in alone and "threshold 0.5" not in alone
    # it names the folder it read, not a bootstrap folder's data/web_filtered it does not have
    assert "data/web_filtered" not in alone and "data/web_captioned" not in alone
    # shards no caption stage wrote, and a training run (whose loss curves the page draws)
    page = " ".join(render_report(shards / "web").split())
    assert "CapFilt report: shards no caption or filter stage wrote" in page
    assert 'id="filter"' not in page and 'class="score"' not in page
    page = " ".join(render_report(out / "runs" / "captioner").split())
    assert "CapFilt report: a training run" in page and 'id="retrieval"' not in page
    empty = tmp_path / "empty"
    empty.mkdir()
    page = render_report(empty)
    assert "no capfilt run, stage output or training run" in page and 'id="missing"' in page


def test_readme_your_own_data_on_coco_mini(coco_mini, tmp_path, monkeypatch):
    """The README's "Your own data" commands, as written, on a tiny budget (recipe tiny)."""
    from capfilt.cli.main import app

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Your own data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c.split() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert [c[:2] for c in commands] == [["capfilt", "data"]] * 2 + [
        ["capfilt", "bootstrap"],
        ["capfilt", "report"],
    ]
    repo = tmp_path / "project"
    repo.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").mkdir()
    (tmp_path / "shared" / "data" / "coco-mini").symlink_to(coco_mini)
    monkeypatch.chdir(repo)
    budget = [*FAST, "train.samples_per_epoch=16"]
    budget += ["finetune.captioner.samples_per_epoch=16", "finetune.filter.samples_per_epoch=16"]
    runner = CliRunner()
    for args in commands:
        args = [a.split("#")[0] for a in args[1 : args.index("#") if "#" in args else None]]
        if args[0] == "bootstrap":
            args[1] = "tiny"
            for item in budget:
                args += ["--set", item]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert (repo / "my-run" / "report.html").is_file()
    summary = json.loads((repo / "my-run" / "summary.json").read_text())
    assert summary["filter"]["origins"]["web"]["n"] == 79 * 5  # every val2017 caption judged
    assert summary["filter"]["origins"]["synthetic"]["n"] == 79
