"""Filter metrics: exact AUC with ties, precision/recall/F1/AUC of a hand-computed table, threshold
sweep, histograms, missing truth, and reading score tables from parquet."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from capfilt.eval.filter_metrics import (
    filter_report,
    histogram_edges,
    load_score_tables,
    roc_auc,
    score_histogram,
)


def _auc_by_pairs(scores, labels):
    """The definition: P(pos > neg) + 0.5 P(pos == neg) over all pairs."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_perfect_inverted_constant():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([0.4] * 5, [1, 0, 1, 0, 0]) == 0.5


def test_auc_ties_by_hand():
    # positives 0.5, 0.5; negatives 0.5, 0.2: two ties (0.5 each) + two wins = 3 of 4 pairs
    assert roc_auc([0.5, 0.5, 0.5, 0.2], [True, True, False, False]) == pytest.approx(0.75)
    # 0.7 beats 0.2 (1) and ties 0.7 (0.5); 0.2 ties 0.2 (0.5) and loses to 0.7 -> 2 of 4
    assert roc_auc([0.7, 0.2, 0.7, 0.2], [1, 1, 0, 0]) == pytest.approx(0.5)


def test_auc_matches_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=40) / 4.0  # only 5 distinct values: lots of ties
        labels = rng.random(40) < 0.4
        assert roc_auc(scores, labels) == pytest.approx(_auc_by_pairs(scores, labels), abs=1e-12)


def test_auc_errors():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, float("nan")], [1, 0])
    with pytest.raises(ValueError, match="labels"):
        roc_auc([0.1, 0.2, 0.3], [1, 0])


def hand_table() -> pd.DataFrame:
    """7 web texts with truth (3 clean, 4 noisy), 3 synthetic, 1 human; kept = score > 0.5."""
    rows = [
        # score, kept, origin, clean, noise
        (0.92, True, "web", True, "none"),  # TN
        (0.83, True, "web", True, "none"),  # TN
        (0.35, False, "web", True, "none"),  # FP: a clean text rejected
        (0.74, True, "web", False, "swap"),  # FN: a noisy text kept
        (0.25, False, "web", False, "swap"),  # TP
        (0.15, False, "web", False, "attribute"),  # TP
        (0.45, False, "web", False, "generic"),  # TP
        (0.65, True, "synthetic", None, None),
        (0.48, False, "synthetic", None, None),
        (0.55, True, "synthetic", None, None),
        (0.97, True, "human", None, None),
    ]
    return pd.DataFrame(rows, columns=["score", "kept", "origin", "clean", "noise"])


def test_report_by_hand():
    rep = filter_report(hand_table(), threshold=0.5)
    json.dumps(rep, allow_nan=False)
    assert rep["decision"] == "kept" and rep["kept_disagrees_with_threshold"] == 0
    assert rep["n_texts"] == 11 and rep["n_truth"] == 7 and rep["n_noisy"] == 4
    assert rep["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 2}
    assert rep["precision"] == pytest.approx(3 / 4)
    assert rep["recall"] == pytest.approx(3 / 4)
    assert rep["f1"] == pytest.approx(3 / 4)
    # clean {0.92, 0.83, 0.35} vs noisy {0.74, 0.25, 0.15, 0.45}: 4 + 4 + 2 wins of 12 pairs
    assert rep["auc"] == pytest.approx(10 / 12)
    assert rep["rejection_by_noise"] == {
        "attribute": {"n": 1, "rejected_fraction": 1.0},
        "generic": {"n": 1, "rejected_fraction": 1.0},
        "none": {"n": 3, "rejected_fraction": pytest.approx(1 / 3)},
        "swap": {"n": 2, "rejected_fraction": 0.5},
    }
    assert rep["origins"]["web"] == {"n": 7, "kept": 3, "kept_fraction": pytest.approx(3 / 7)}
    assert rep["origins"]["synthetic"] == {"n": 3, "kept": 2, "kept_fraction": pytest.approx(2 / 3)}
    assert rep["origins"]["human"] == {"n": 1, "kept": 1, "kept_fraction": 1.0}
    assert rep["synthetic_rejection_rate"] == pytest.approx(1 / 3)
    assert rep["clean_rejection_by_detail"] is None  # no terse column
    assert rep["notes"] == []


def test_clean_rejection_by_detail_by_hand():
    table = hand_table()
    # the clean texts 0.92 and 0.35 are terse, 0.83 full; a noisy one's flag must not count
    table["terse"] = [True, False, True, True, None, None, None, None, None, None, None]
    rep = filter_report(table, threshold=0.5)
    json.dumps(rep, allow_nan=False)
    assert rep["clean_rejection_by_detail"] == {
        "terse": {"n": 2, "rejected_fraction": 0.5},
        "full": {"n": 1, "rejected_fraction": 0.0},
    }


def test_sweep_by_hand():
    rep = filter_report(hand_table(), threshold=0.5, sweep=(0.1, 0.2, 0.5, 0.9))
    by_t = {row["threshold"]: row for row in rep["sweep"]}
    # 0.1: nothing rejected -> precision undefined, recall 0
    assert by_t[0.1] == {"threshold": 0.1, "precision": None, "recall": 0.0, "f1": None,
                         "web_kept_fraction": 1.0, "synthetic_kept_fraction": 1.0}  # fmt: skip
    # 0.2: only 0.15 (noisy) rejected -> P 1, R 1/4, F1 0.4
    assert by_t[0.2]["precision"] == 1.0 and by_t[0.2]["recall"] == 0.25
    assert by_t[0.2]["f1"] == pytest.approx(0.4)
    assert by_t[0.2]["web_kept_fraction"] == pytest.approx(6 / 7)
    # 0.5 re-makes the kept decisions exactly
    assert by_t[0.5]["precision"] == pytest.approx(rep["precision"])
    assert by_t[0.5]["recall"] == pytest.approx(rep["recall"])
    assert by_t[0.5]["synthetic_kept_fraction"] == pytest.approx(2 / 3)
    # 0.9: only 0.92 kept -> TP 4, FP 2 -> P 2/3, R 1, F1 0.8; no synthetic kept
    assert by_t[0.9]["precision"] == pytest.approx(2 / 3) and by_t[0.9]["recall"] == 1.0
    assert by_t[0.9]["f1"] == pytest.approx(0.8)
    assert (
        by_t[0.9]["web_kept_fraction"] == pytest.approx(1 / 7)
        and by_t[0.9]["synthetic_kept_fraction"] == 0.0
    )
    assert [r["threshold"] for r in filter_report(hand_table())["sweep"]] == pytest.approx(
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    )


def test_histograms_by_hand():
    hist = filter_report(hand_table())["histograms"]
    assert hist["bin_edges"] == pytest.approx([i / 10 for i in range(11)])
    assert hist["web"]["kept"] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert hist["web"]["rejected"] == [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert hist["synthetic"]["kept"] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert hist["synthetic"]["rejected"] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert hist["human"] == {"kept": [0] * 9 + [1], "rejected": [0] * 10}
    # scores 0.0 and 1.0 land in the end bins
    edge = filter_report(pd.DataFrame({"score": [0.0, 1.0], "origin": ["web", "web"]}), 0.5)
    assert (
        edge["histograms"]["web"]["rejected"][0] == 1 and edge["histograms"]["web"]["kept"][9] == 1
    )


def test_perfect_and_inverted_filters():
    df = hand_table()
    clean = df["clean"] == True  # noqa: E712 (None -> False)
    df.loc[df["origin"] == "web", "score"] = np.where(clean[df["origin"] == "web"], 0.9, 0.1)
    rep = filter_report(df.drop(columns="kept"), threshold=0.5)
    assert rep["decision"] == "rule"  # no kept column: decided by the rule, ITM > 0.5
    assert (
        rep["auc"] == 1.0 and rep["precision"] == 1.0 and rep["recall"] == 1.0 and rep["f1"] == 1.0
    )
    df.loc[df["origin"] == "web", "score"] = 1.0 - df.loc[df["origin"] == "web", "score"]
    rep = filter_report(df.drop(columns="kept"), threshold=0.5)
    assert (
        rep["auc"] == 0.0 and rep["precision"] == 0.0 and rep["recall"] == 0.0 and rep["f1"] == 0.0
    )


def test_score_histogram():
    scores = [0.0, 0.05, 0.1, 0.95, 1.0, 1.2, -0.1, float("nan")]
    assert score_histogram(scores) == [3, 1, 0, 0, 0, 0, 0, 0, 0, 3]  # NaN out, outside clipped
    assert len(score_histogram(scores, 20)) == 20 and len(histogram_edges(20)) == 21
    # on [0, 1] it counts as numpy's own equal-width bins do
    values = np.random.default_rng(0).random(500).round(2)
    assert score_histogram(values) == np.histogram(values, bins=10, range=(0.0, 1.0))[0].tolist()


def test_missing_truth_still_reports_kept_fractions_and_histograms():
    df = hand_table().drop(columns=["clean", "noise"])
    rep = filter_report(df, threshold=0.5)
    json.dumps(rep, allow_nan=False)
    for key in ("precision", "recall", "f1", "auc", "confusion", "n_truth", "rejection_by_noise"):
        assert rep[key] is None, key
    assert any("no truth columns" in n for n in rep["notes"])
    assert rep["origins"]["web"]["kept_fraction"] == pytest.approx(3 / 7)
    assert rep["synthetic_rejection_rate"] == pytest.approx(1 / 3)
    assert sum(rep["histograms"]["web"]["kept"]) == 3
    assert all(r["precision"] is None and r["web_kept_fraction"] is not None for r in rep["sweep"])


def test_truth_from_noise_only_and_no_synthetic():
    df = hand_table()
    df = df[df["origin"] != "synthetic"].drop(columns="clean")
    rep = filter_report(df, threshold=0.5)
    assert rep["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 2}
    assert rep["synthetic_rejection_rate"] is None
    assert all(r["synthetic_kept_fraction"] is None for r in rep["sweep"])
    assert "synthetic" not in rep["origins"]
    json.dumps(rep, allow_nan=False)


def test_missing_scores_disagreeing_kept_and_bad_input():
    df = hand_table()
    df.loc[0, "score"] = np.nan
    df.loc[1, "kept"] = False  # a decision not made at this threshold
    rep = filter_report(df, threshold=0.5)
    assert rep["n_no_score"] == 1 and rep["n_texts"] == 10 and rep["n_truth"] == 6
    assert rep["kept_disagrees_with_threshold"] == 1
    assert rep["confusion"] == {"tp": 3, "fp": 2, "fn": 1, "tn": 0}
    with pytest.raises(ValueError, match="origin"):
        filter_report(df.drop(columns="origin"), 0.5)
    bad = hand_table().astype({"kept": object})
    bad.loc[0, "kept"] = None
    with pytest.raises(ValueError, match="kept"):
        filter_report(bad, 0.5)


def test_load_score_tables(tmp_path):
    df = hand_table()
    df.iloc[5:].to_parquet(tmp_path / "00000001.parquet")
    df.iloc[:5].to_parquet(tmp_path / "00000000.parquet")
    (tmp_path / "00000000_stats.json").write_text("{}")  # shard side files are ignored
    loaded = load_score_tables(tmp_path)
    assert len(loaded) == len(df)
    assert loaded["score"].tolist() == df["score"].tolist()  # sorted by file name
    assert filter_report(loaded, 0.5) == filter_report(df, 0.5)
    assert len(load_score_tables(tmp_path / "00000001.parquet")) == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        load_score_tables(empty)
    with pytest.raises(FileNotFoundError):
        load_score_tables(tmp_path / "missing.parquet")
