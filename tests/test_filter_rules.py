"""Filter keep rules (ITM, ITC cosine, both; threshold or kept fraction), origins, the truth-file
evaluation against a hand computation, and recipes that extend others."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from capfilt.cli.main import app
from capfilt.config import ConfigError, FilterConfig, load_recipe
from capfilt.pipeline.filter import (
    KeepRule,
    fixed_rule,
    fraction_rule,
    fraction_threshold,
    is_kept,
    normalize_origin,
)

SCORES = pd.DataFrame(
    {
        "uid": ["a", "b", "c", "d", "e"],
        "text_index": [0, 0, 0, 0, 1],
        "origin": ["web", "web", "web", "web", "synthetic"],
        "text": ["t"] * 5,
        "itm_score": [0.9, 0.2, 0.6, 0.4, 0.7],
        "itc_cosine": [0.30, 0.35, 0.10, 0.05, 0.2],
        "kept": [True, False, True, False, True],
    }
)


def test_rules_and_origins():
    entry = {"itm_score": 0.6, "itc_cosine": 0.2}
    assert is_kept({**entry, "origin": "web"}, 0.5) and not is_kept({**entry, "origin": "web"}, 0.6)
    # no origin, or another spelling of web, is judged; only human passes unjudged
    assert not is_kept(entry, 0.7) and not is_kept({**entry, "origin": " Web "}, 0.7)
    assert not is_kept({**entry, "origin": "alt-text"}, 0.7)
    assert is_kept({"origin": "HUMAN", "itm_score": 0.0, "itc_cosine": -1.0}, 0.7)
    assert [normalize_origin(o) for o in (None, "", "WEB", "Synthetic")] == [
        "web", "web", "web", "synthetic",
    ]  # fmt: skip
    assert fixed_rule(FilterConfig(rule="itc", itc_threshold=0.25)) == KeepRule(None, 0.25)
    both = fixed_rule(FilterConfig(rule="both", threshold=0.5, itc_threshold=0.25))
    assert both.keeps({**entry, "origin": "web", "itc_cosine": 0.3})
    assert not both.keeps({**entry, "origin": "web"})  # ITM passes, ITC does not


def test_fraction_is_a_quantile_of_the_whole_table():
    # judged texts' ITM scores: 0.9, 0.2, 0.6, 0.4, 0.7; keeping 40% = the top 2 → t = 0.6
    rule = fraction_rule(FilterConfig(keep_fraction=0.4), SCORES)
    assert rule == KeepRule(0.6, None)
    rows = SCORES.to_dict("records")
    assert sum(rule.keeps(r) for r in rows) == 2
    assert fraction_threshold([0.3, 0.1], 1.0) < 0.1  # all kept
    itc = fraction_rule(FilterConfig(rule="itc", keep_fraction=0.6), SCORES)
    assert itc == KeepRule(None, 0.10)  # top 3 cosines 0.35, 0.30, 0.2 stay


@pytest.mark.parametrize(
    "override, key",
    [
        ("filter.threshold=1.5", "filter.threshold"),
        ("filter.threshold=-0.1", "filter.threshold"),
        ("filter.itc_threshold=2", "filter.itc_threshold"),
        ("filter.keep_fraction=0", "filter.keep_fraction"),
        ("filter.rule=clip", "filter.rule"),
    ],
)
def test_bad_filter_settings_are_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        load_recipe("tiny", [override])


def test_a_cosine_rule_needs_the_cosine():
    with pytest.raises(ConfigError, match="filter.itc_cosine"):
        load_recipe("tiny", ["filter.rule=both", "filter.itc_cosine=false"])
    assert load_recipe("tiny", ["filter.itc_cosine=false"]).filter.rule == "itm"
    # by default the cosine's text pass runs only for a rule that decides on it
    assert not load_recipe("tiny").filter.computes_cosine
    for rule in ("itc", "both"):
        assert load_recipe("tiny", [f"filter.rule={rule}"]).filter.computes_cosine
    assert load_recipe("tiny", ["filter.itc_cosine=true"]).filter.computes_cosine


def test_truth_report_without_cosines_leaves_the_itc_head_out():
    from capfilt.eval.filter_metrics import truth_report

    scores = SCORES.assign(itc_cosine=None)
    truth = pd.DataFrame({"uid": ["a", "b"], "clean": [True, False]})
    report = truth_report(scores, truth, 0.5, 0.3)
    assert report["heads"]["itc"] == {"threshold": 0.3, "note": "not computed"}
    assert report["heads"]["itm"]["confusion"]["tp"] == 1  # b (0.2) rejected


def test_a_truth_file_wins_over_a_stored_truth_column():
    """The built-in benchmark's filter outputs carry their own ``clean`` column: the labels
    given are used (the merge used to lose both and fail with KeyError 'clean')."""
    from capfilt.eval.filter_metrics import truth_report

    stored = SCORES.assign(clean=[False] * len(SCORES))  # the opposite of most given labels
    truth = pd.DataFrame({"uid": ["a", "b"], "clean": [True, False]})
    report = truth_report(stored, truth, 0.5, 0.3)
    assert (report["n_matched"], report["n_noisy"]) == (2, 1)
    assert report["heads"]["itm"]["confusion"] == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}


def test_eval_filter_judges_a_filter_output_at_the_thresholds_it_decided_with(tmp_path: Path):
    """A re-decided or keep-fraction output records its thresholds in summary.json: eval filter
    reports those (it said the recipe's 0.5 beside the stored 0.65 decisions), unless asked."""
    folder = tmp_path / "filtered"
    folder.mkdir()
    SCORES.assign(kept=SCORES["itm_score"] > 0.65).to_parquet(folder / "00000000.parquet")
    rule = {"rule": "itm", "keep_fraction": None, "threshold": 0.65, "itc_threshold": 0.3}
    (folder / "summary.json").write_text(json.dumps({"rule": rule}))
    report = tmp_path / "r.json"
    args = ["eval", "filter", "tiny", "--scores", str(folder), "-o", str(report)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "filter rule itm: ITM > 0.65 (the filter run's)" in " ".join(result.output.split())
    got = json.loads(report.read_text())
    assert got["threshold"] == 0.65 and got["origins"]["web"]["kept"] == 1
    result = CliRunner().invoke(app, [*args, "--threshold", "0.5"])
    assert "filter rule itm: ITM > 0.50 (asked for)" in " ".join(result.output.split())
    assert json.loads(report.read_text())["origins"]["web"]["kept"] == 2  # a, c re-decided


def test_a_truth_file_keeps_uids_that_look_like_numbers(tmp_path: Path):
    """img2dataset's keys are zero-padded numbers: read as integers, none would match."""
    from capfilt.eval.filter_metrics import load_truth

    truth = tmp_path / "truth.csv"
    truth.write_text("uid,clean\n000000042,1\n0007,0\nNA,1\n")
    assert load_truth(truth)["uid"].tolist() == ["000000042", "0007", "NA"]


def test_eval_filter_truth_file_matches_a_hand_computation(tmp_path: Path):
    folder = tmp_path / "filtered"
    folder.mkdir()
    SCORES.to_parquet(folder / "00000000.parquet")
    truth = tmp_path / "truth.csv"
    truth.write_text("uid,clean\na,1\nb,0\nc,false\nd,no\nz,1\n")
    report = tmp_path / "r.json"
    args = ["eval", "filter", "tiny", "--scores", str(folder), "--truth", str(truth)]
    result = CliRunner().invoke(
        app,
        [*args, "--threshold", "0.5", "--set", "filter.itc_threshold=0.3", "--out", str(report)],
    )
    assert result.exit_code == 0, result.output
    got = json.loads(report.read_text())["truth_file"]
    assert (got["n_matched"], got["n_unmatched"], got["n_noisy"]) == (4, 1, 3)
    itm, itc = got["heads"]["itm"], got["heads"]["itc"]
    # ITM > 0.5 rejects b, d: tp 2, fp 0, fn 1 (c); the clean a (0.9) outscores every noisy text
    assert itm["confusion"] == {"tp": 2, "fp": 0, "fn": 1, "tn": 1}
    assert (itm["precision"], itm["recall"], itm["f1"], itm["auc"]) == pytest.approx(
        (1.0, 2 / 3, 0.8, 1.0)
    )
    # ITC > 0.3 rejects a (0.30), c, d: tp 2, fp 1, fn 1 (b); a's 0.30 beats 2 of 3 noisy cosines
    assert itc["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 0}
    assert (itc["precision"], itc["recall"], itc["f1"], itc["auc"]) == pytest.approx(
        (2 / 3, 2 / 3, 2 / 3, 2 / 3)
    )
    assert "ITC cosine" in result.output

    # --threshold re-decides (the stored decisions keep a and c; at 0.65 only a stays)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "filter",
            "tiny",
            "--scores",
            str(folder),
            "--threshold",
            "0.65",
            "-o",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["origins"]["web"]["kept"] == 1
    result = CliRunner().invoke(
        app, ["eval", "filter", "tiny", "--scores", str(folder), "-o", str(report)]
    )
    assert json.loads(report.read_text())["origins"]["web"]["kept"] == 2

    bad = tmp_path / "bad.csv"
    bad.write_text("uid,label\na,1\n")
    result = CliRunner().invoke(app, [*args[:-1], str(bad)])
    assert result.exit_code == 2 and "no 'clean' column" in " ".join(result.output.split())


def test_recipe_extends_a_chain_and_refuses_unknown_bases(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("extends: tiny\nname: base\nfilter: {threshold: 0.2}\ntrain: {lr: 0.01}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\ntrain: {epochs: 3}\n")
    cfg = load_recipe(child)
    tiny = load_recipe("tiny")
    assert cfg.name == "child" and cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.filter.threshold == 0.2 and cfg.model == tiny.model  # from tiny, two levels up
    assert load_recipe(child, ["train.lr=0.5"]).train.lr == 0.5
    (tmp_path / "u.yaml").write_text("extends: no-such-recipe\n")
    with pytest.raises(ConfigError, match="u.yaml: extends: recipe not found: 'no-such-recipe'"):
        load_recipe(tmp_path / "u.yaml")
    (tmp_path / "l1.yaml").write_text("extends: l2.yaml\n")
    (tmp_path / "l2.yaml").write_text("extends: l1.yaml\n")
    with pytest.raises(ConfigError, match=r"^l1.yaml: extends: l2.yaml: extends: recipes extend"):
        load_recipe(tmp_path / "l1.yaml")
    # a bare name finds the YAML file beside the recipe before a shipped recipe of that name
    (tmp_path / "tiny.yaml").write_text("extends: demo\nname: local\n")
    (tmp_path / "named.yaml").write_text("extends: base\nname: named\n")
    (tmp_path / "shadow.yaml").write_text("extends: tiny\n")
    assert load_recipe(tmp_path / "named.yaml").filter.threshold == 0.2
    assert load_recipe(tmp_path / "shadow.yaml").name == "local"
    real = load_recipe("real-cpu")
    assert real.model.max_text_len == 35 and real.model.image_size <= 224
    assert real.model.weight_init == "fan_in"  # from demo


def test_a_truth_file_counts_each_text_once_and_refuses_conflicts(tmp_path: Path):
    """Repeated rows were counted twice, and a text labelled both ways was counted as two texts
    (one clean, one not); a file matching no scored text reported 0 texts and exited 0."""
    from capfilt.eval.filter_metrics import truth_report

    twice = pd.DataFrame({"uid": ["a", "a", "b", "b"], "clean": [True, True, False, False]})
    report = truth_report(SCORES, twice, 0.5, 0.3)
    assert (report["n_labels"], report["n_repeated_rows"]) == (2, 2)
    assert (report["n_matched"], report["n_noisy"]) == (2, 1)
    assert report["heads"]["itm"]["confusion"] == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}
    both = pd.DataFrame({"uid": ["a", "b", "b"], "text_index": [0, 0, 0], "clean": [1, 0, 1]})
    with pytest.raises(ValueError, match=r"1 text\(s\) both clean and not clean: b#0"):
        truth_report(SCORES, both.astype({"clean": bool}), 0.5, 0.3)

    folder = tmp_path / "filtered"
    folder.mkdir()
    SCORES.to_parquet(folder / "00000000.parquet")
    args = ["eval", "filter", "tiny", "--scores", str(folder), "--truth"]
    conflicting = tmp_path / "conflicting.csv"
    conflicting.write_text("uid,clean\na,1\nb,0\nb,1\n")
    result = CliRunner().invoke(app, [*args, str(conflicting)])
    assert result.exit_code == 2 and "both clean and not clean: b" in result.output
    elsewhere = tmp_path / "elsewhere.csv"
    elsewhere.write_text("uid,clean\ncoco_1,1\ncoco_2,0\n")
    result = CliRunner().invoke(app, [*args, str(elsewhere)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "none of the truth file's 2 labelled text(s)" in said
    assert "'coco_1'" in said and "'a'" in said  # an example from each side
    partial = tmp_path / "partial.csv"
    partial.write_text("uid,clean\na,1\na,1\nb,0\nz,1\n")
    result = CliRunner().invoke(app, [*args, str(partial)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "1 of the truth file's 3 labels matched no scored text" in said
    assert "1 repeated truth row(s) counted once" in said


def test_eval_filter_with_a_truth_file_judges_the_stored_decision_and_the_sweep(tmp_path: Path):
    """With --truth the stored decision's figures were only in the JSON, the filter table showed
    dashes for precision/recall/F1, and the JSON said 'no truth columns' with no truth sweep."""
    folder = tmp_path / "filtered"
    folder.mkdir()
    # rule both keeps only a (ITM > 0.5 and cosine > 0.2); e's cosine 0.2 is not above
    SCORES.assign(kept=[True, False, False, False, False]).to_parquet(folder / "00000000.parquet")
    rule = {"rule": "both", "keep_fraction": None, "threshold": 0.5, "itc_threshold": 0.2}
    (folder / "summary.json").write_text(json.dumps({"rule": rule}))
    truth = tmp_path / "truth.csv"
    truth.write_text("uid,clean\na,1\nb,0\nc,0\nd,0\n")
    report = tmp_path / "r.json"
    args = ["eval", "filter", "tiny", "--scores", str(folder), "--truth", str(truth)]
    result = CliRunner().invoke(app, [*args, "-o", str(report)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "stored decision" in said and "—" not in said and "no truth columns" not in said
    got = json.loads(report.read_text())
    # the stored decision rejects b, c, d: every noisy text and no clean one; ITM alone misses c
    assert got["truth_file"]["stored_decision"]["confusion"] == {"tp": 3, "fp": 0, "fn": 0, "tn": 1}
    assert got["truth_file"]["heads"]["itm"]["recall"] == pytest.approx(2 / 3)
    assert (got["n_truth"], got["precision"], got["recall"], got["f1"]) == (4, 1.0, 1.0, 1.0)
    assert not any("truth" in note for note in got["notes"])
    at = {row["threshold"]: row for row in got["sweep"]}
    assert (at[0.5]["precision"], at[0.5]["recall"]) == pytest.approx((1.0, 2 / 3))  # rejects b, d
    # the table row of the stored decision: precision, recall, F1 all 1.000 beside ITM's
    rows = [line for line in result.output.splitlines() if line.strip("│ ").startswith("recall")]
    assert rows and rows[0].split("│")[-2].strip() == "1.000"
