"""How well the CapFilt filter separates true texts from noise, from a table of scored texts.

Input: a DataFrame with one row per scored text (web alt-text, synthetic caption or human caption):

=========  ==========================================================================================
column     meaning
=========  ==========================================================================================
score      ITM match probability ``softmax(itm_logits)[1]`` (required; rows without one are dropped
           and counted)
origin     ``"web"``, ``"synthetic"`` or ``"human"`` (required)
kept       the filter's decision (optional: when absent it is ``score > threshold``, BLIP's rule)
clean      ground truth of a benchmark, web texts only: is the text really true of its image
           (optional; when absent but ``noise`` is present, ``clean = noise == "none"``)
noise      kind of corruption of a web text: ``"none"``, ``"swap"``, ``"attribute"``, ``"generic"``
           (optional)
=========  ==========================================================================================

The filter's job is to *reject noisy web texts*, so "positive" means noisy and a rejection is a
positive prediction: precision = rejected-and-noisy / rejected, recall = rejected-and-noisy / noisy.
The ROC AUC is that of the score as a clean-vs-noisy classifier (> 0.5: clean texts score higher).
Without truth columns (a real web crawl) the report still has kept fractions, the synthetic
rejection rate, the sweep's kept fractions and the histograms; every truth-based number is ``None``
and ``notes`` says why. The report holds only plain ints, floats, strings, lists, dicts and ``None``
(never NaN), so it goes straight to ``json.dump``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capfilt.config.schema import FILTER_RULES, FilterConfig

DEFAULT_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
HIST_BINS = 10
"""Equal-width bins on [0, 1] of the score histograms in the filter's summaries."""
NOISE_NONE = "none"


def histogram_edges(bins: int = HIST_BINS) -> np.ndarray:
    """The ``bins + 1`` edges of ``bins`` equal-width bins on [0, 1]."""
    return np.linspace(0.0, 1.0, bins + 1)


def score_histogram(
    scores: Sequence[float] | np.ndarray | pd.Series, bins: int = HIST_BINS
) -> list[int]:
    """Counts of ``scores`` in ``bins`` equal-width bins on [0, 1]: missing scores are left out and
    scores outside [0, 1] (an ITM probability, so only by rounding) count in the end bins."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = np.clip(values[~np.isnan(values)], 0.0, 1.0)
    return [int(c) for c in np.histogram(values, bins=histogram_edges(bins))[0]]


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Exact ROC AUC of ``scores`` for ``labels`` (truthy = positive), by the Mann-Whitney U statistic.

    Equals P(score of a random positive > score of a random negative) + 0.5 P(tie): tied scores get
    their average rank. Raises ``ValueError`` when a class is empty or a score is NaN.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes (got {n_pos} positive, {n_neg} negative)")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based rank of a tied group = mean of the ranks it spans: last rank - (count - 1) / 2.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum_pos = float(avg_rank[inverse][y].sum())
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _prf(rejected: np.ndarray, noisy: np.ndarray) -> dict[str, Any]:
    """Precision/recall/F1 of 'rejected' as a detector of 'noisy', with the confusion counts."""
    tp = int((rejected & noisy).sum())
    fp = int((rejected & ~noisy).sum())
    fn = int((~rejected & noisy).sum())
    tn = int((~rejected & ~noisy).sum())
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = None if p is None or r is None else (2 * p * r / (p + r) if p + r > 0 else 0.0)
    return {
        "precision": p,
        "recall": r,
        "f1": f1,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def _kept_fraction(kept: np.ndarray) -> float | None:
    return float(kept.mean()) if kept.size else None


NO_TRUTH_COLUMNS = "no truth columns ('clean' or 'noise')"
"""How a score table without labels is noted (``eval filter --truth`` brings its own)."""


def _truth(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(known, noisy, why): web rows whose truth is known, which of all rows are noisy (False where
    unknown), and why nothing is known (None when something is)."""
    known = np.zeros(len(df), dtype=bool)
    if "clean" in df.columns:
        clean = df["clean"]
        known = clean.notna().to_numpy()
        noisy = ~clean.where(clean.notna(), True).astype(bool).to_numpy()
    elif "noise" in df.columns:
        known = df["noise"].notna().to_numpy()
        noisy = (df["noise"].astype(str) != NOISE_NONE).to_numpy()
    else:
        return (
            known,
            known,
            f"{NO_TRUTH_COLUMNS}: precision, recall, F1 and AUC left out",
        )
    known = known & (df["origin"] == "web").to_numpy()  # the truth is about web texts only
    if not known.any():
        return known, known, "no web text with known truth: precision, recall, F1 and AUC left out"
    return known, noisy & known, None


def _clean_rejection_by_detail(
    terse: pd.Series, rejected: np.ndarray, noisy: np.ndarray
) -> dict[str, dict[str, Any]] | None:
    """False-rejection rate of the clean texts whose ``terse`` flag is known, terse vs full."""
    flag = terse.to_numpy()
    out = {}
    for name, value in (("terse", True), ("full", False)):
        rows = ~noisy & np.array([pd.notna(f) and bool(f) == value for f in flag], dtype=bool)
        if rows.any():
            out[name] = {"n": int(rows.sum()), "rejected_fraction": float(rejected[rows].mean())}
    return out or None


def keep_rule(rule: dict[str, Any] | None, threshold: float | None = None) -> dict[str, Any]:
    """A filter's rule as ``capfilt filter`` records it (``summary.json``'s ``rule``: ``rule``,
    ``threshold``, ``itc_threshold``, ``keep_fraction``), with the threshold a rule does not use
    set to None; without one, BLIP's rule: ITM above ``threshold``."""
    if not isinstance(rule, dict) or rule.get("rule") not in FILTER_RULES:
        rule = {"rule": "itm", "threshold": threshold}
    name = rule["rule"]

    def value(key: str, used: bool) -> float | None:
        v = rule.get(key)
        return float(v) if used and isinstance(v, int | float) and not isinstance(v, bool) else None

    return {
        "rule": name,
        "threshold": value("threshold", name in ("itm", "both")),
        "itc_threshold": value("itc_threshold", name in ("itc", "both")),
        "keep_fraction": value("keep_fraction", True),
    }


def config_rule(cfg: FilterConfig) -> dict[str, Any]:
    """A recipe's rule (:func:`keep_rule`): its fixed thresholds, or none with ``keep_fraction``
    (the thresholds a fraction gives are known only to the run that decided with them)."""
    fixed = cfg.keep_fraction is None
    return keep_rule(
        {
            "rule": cfg.rule,
            "threshold": cfg.threshold if fixed else None,
            "itc_threshold": cfg.itc_threshold if fixed else None,
            "keep_fraction": cfg.keep_fraction,
        }
    )


def _rule_decision(df: pd.DataFrame, rule: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
    """(keep, why): the rule's decision for every row from its scores (human texts always stay,
    as in the filter), or None and why when a score or threshold it needs is missing."""
    keep = np.ones(len(df), dtype=bool)
    for key, column, name in (
        ("threshold", "score", "ITM probability"),
        ("itc_threshold", "itc_cosine", "ITC cosine"),
    ):
        used = rule["rule"] in (("itm", "both") if key == "threshold" else ("itc", "both"))
        if not used:
            continue
        if rule[key] is None:
            return None, f"rule {rule['rule']} without its {key}"
        if column not in df.columns or df[column].isna().any():
            return None, f"rule {rule['rule']} decides on the {name}, which some texts lack"
        keep &= df[column].to_numpy(dtype=np.float64) > rule[key]
    human = df["origin"].astype(str).str.strip().str.lower() == "human"
    return keep | human.to_numpy(), None


def filter_report(
    df: pd.DataFrame,
    threshold: float = 0.5,
    sweep: Sequence[float] = DEFAULT_SWEEP,
    rule: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate filter decisions and scores; see the module docstring for the columns.

    Returns a JSON-ready dict:

    - ``rule``: the filter's rule (:func:`keep_rule` of ``rule``, BLIP's ITM above ``threshold``
      when None; an ``itc``/``both`` rule decides on an ``itc_cosine`` column), ``threshold``
      (its ITM threshold, None for rule ``itc``), ``decision`` (``"kept"`` column or
      ``"rule"``), ``n_texts``, ``n_no_score`` (rows dropped for a missing score),
      ``kept_disagrees_with_threshold`` (rows whose ``kept`` differs from the rule's decision;
      ``None`` without a ``kept`` column, or where the rule's scores are missing: ``notes``);
    - ``origins``: per origin ``{"n", "kept", "kept_fraction"}``; ``synthetic_rejection_rate``;
    - on web texts with known truth (``None`` without truth): ``n_truth``, ``n_noisy``,
      ``precision``, ``recall``, ``f1`` and ``confusion`` (tp/fp/fn/tn) of rejecting noisy texts,
      ``auc`` (score separating clean from noisy), ``rejection_by_noise`` (per noise kind ``{"n",
      "rejected_fraction"}``: the recall for each corruption, and for ``"none"`` the false-rejection rate),
      ``clean_rejection_by_detail`` (with a ``terse`` column: the false-rejection rate of clean texts
      that are ``terse`` (colours and shapes only) and ``full``, ``{"n", "rejected_fraction"}`` each);
    - ``sweep``: one row per ITM threshold t (decision ``score > t``, whatever the rule): ``threshold``, ``precision``,
      ``recall``, ``f1``, ``web_kept_fraction``, ``synthetic_kept_fraction``;
    - ``histograms``: ``bin_edges`` (11 values) and per origin ``{"kept": [10 counts], "rejected":
      [10 counts]}``;
    - ``notes``: what was left out and why.
    """
    for col in ("score", "origin"):
        if col not in df.columns:
            raise ValueError(f"score table has no '{col}' column (columns: {list(df.columns)})")
    notes: list[str] = []
    has_score = df["score"].notna()
    n_no_score = int((~has_score).sum())
    if n_no_score:
        notes.append(f"{n_no_score} row(s) without a score left out")
    df = df.loc[has_score].reset_index(drop=True)
    score = df["score"].to_numpy(dtype=np.float64)
    origin = df["origin"].astype(str).to_numpy()

    rule = keep_rule(rule, threshold)
    by_rule, why = _rule_decision(df, rule)
    if "kept" in df.columns:
        if df["kept"].isna().any():
            raise ValueError("'kept' column has missing values")
        kept = df["kept"].astype(bool).to_numpy()
        decision = "kept"
        disagree = None if by_rule is None else int((kept != by_rule).sum())
        if why is not None:
            notes.append(f"agreement of the stored decisions with the rule left out: {why}")
    elif by_rule is None:
        raise ValueError(f"no 'kept' column, and the rule cannot decide: {why}")
    else:
        kept, decision, disagree = by_rule, "rule", None
    rejected = ~kept
    is_web, is_syn = origin == "web", origin == "synthetic"

    report: dict[str, Any] = {
        "rule": rule,
        "threshold": rule["threshold"],
        "decision": decision,
        "n_texts": int(len(df)),
        "n_no_score": n_no_score,
        "kept_disagrees_with_threshold": disagree,
        "origins": {
            o: {
                "n": int((origin == o).sum()),
                "kept": int(kept[origin == o].sum()),
                "kept_fraction": _kept_fraction(kept[origin == o]),
            }
            for o in sorted(set(origin))
        },
        "synthetic_rejection_rate": None if not is_syn.any() else 1.0 - float(kept[is_syn].mean()),
    }
    if not is_syn.any():
        notes.append("no synthetic texts: synthetic rejection rate left out")

    # --- truth-based metrics on web texts ---------------------------------------------------------
    known, noisy_all, why = _truth(df)
    truth_keys = (
        "n_truth",
        "n_noisy",
        "precision",
        "recall",
        "f1",
        "confusion",
        "auc",
        "rejection_by_noise",
        "clean_rejection_by_detail",
    )
    report.update(dict.fromkeys(truth_keys))
    if why is not None:
        notes.append(why)
    else:
        noisy = noisy_all[known]
        report["n_truth"] = int(known.sum())
        report["n_noisy"] = int(noisy.sum())
        report.update(_prf(rejected[known], noisy))
        try:
            report["auc"] = roc_auc(score[known], ~noisy)  # clean is the positive class of the AUC
        except ValueError as exc:
            notes.append(f"AUC left out: {exc}")
        if "noise" in df.columns:
            kinds = df["noise"].to_numpy()[known]
            rej = rejected[known]
            report["rejection_by_noise"] = {
                str(k): {
                    "n": int((kinds == k).sum()),
                    "rejected_fraction": float(rej[kinds == k].mean()),
                }
                for k in sorted({k for k in kinds if pd.notna(k)}, key=str)
            }
        if "terse" in df.columns:
            report["clean_rejection_by_detail"] = _clean_rejection_by_detail(
                df["terse"][known], rejected[known], noisy
            )

    # --- threshold sweep: decisions re-made from the score ------------------------------------------
    rows = []
    for t in sweep:
        keep_t = score > t
        row: dict[str, Any] = {"threshold": float(t)}
        if known.any():
            prf = _prf(~keep_t[known], noisy_all[known])
            row.update({k: prf[k] for k in ("precision", "recall", "f1")})
        else:
            row.update(precision=None, recall=None, f1=None)
        row["web_kept_fraction"] = _kept_fraction(keep_t[is_web])
        row["synthetic_kept_fraction"] = _kept_fraction(keep_t[is_syn])
        rows.append(row)
    report["sweep"] = rows

    # --- score histograms, kept vs rejected, per origin ---------------------------------------------
    hist: dict[str, Any] = {"bin_edges": [float(e) for e in histogram_edges()]}
    for o in sorted(set(origin)):
        sel = origin == o
        hist[o] = {
            name: score_histogram(score[sel & mask])
            for name, mask in (("kept", kept), ("rejected", rejected))
        }
    report["histograms"] = hist
    report["notes"] = notes
    return report


def stored_rule(folder: str | Path) -> dict[str, Any] | None:
    """The rule a ``capfilt filter`` output decided with (:func:`keep_rule`), from its
    ``summary.json`` (a keep-fraction run records the thresholds its fraction gave); None for a
    folder without one."""
    try:
        rule = json.loads((Path(folder) / "summary.json").read_text())["rule"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return keep_rule(rule) if isinstance(rule, dict) and rule.get("rule") in FILTER_RULES else None


def load_score_tables(path: str | Path) -> pd.DataFrame:
    """Read one parquet file, or every ``*.parquet`` directly in a folder (sorted by name), as one table.

    A folder of filter output holds one ``{shard}.parquet`` per shard beside the shards; sorting makes
    the row order the same on every run.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet file in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"score table not found: {path}")
    from capfilt.data.writer import drop_skipped_rows  # rows of bad input samples hold no score

    tables = [pd.read_parquet(f) for f in files]
    return drop_skipped_rows(pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0])


def load_truth(path: str | Path) -> pd.DataFrame:
    """A hand-labelled truth file (csv or parquet): ``uid,clean`` and optionally ``text_index``
    (without it, the label applies to every web text of that image)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"truth file not found: {path}")
    # uids are names, not numbers: img2dataset's "000000042" must not become 42
    table = (
        pd.read_parquet(path)
        if path.suffix == ".parquet"
        else pd.read_csv(path, dtype={"uid": str}, keep_default_na=False)
    )
    for col in ("uid", "clean"):
        if col not in table.columns:
            raise ValueError(
                f"truth file {path} has no '{col}' column (columns: {list(table.columns)})"
            )
    table = table.copy()
    table["uid"] = table["uid"].astype(str)
    clean = table["clean"]
    if not pd.api.types.is_bool_dtype(clean):
        words = {"1": True, "1.0": True, "true": True, "yes": True}
        words.update({"0": False, "0.0": False, "false": False, "no": False})
        clean = clean.astype(str).str.strip().str.lower().map(words)
    if clean.isna().any():
        raise ValueError(f"truth file {path}: 'clean' must be true/false or 1/0 in every row")
    table["clean"] = clean.astype(bool)
    return table


def _label_name(row: Any, keys: list[str]) -> str:
    """A labelled text as a person reads it: ``uid`` or ``uid#text_index``."""
    return str(row["uid"]) + (f"#{row['text_index']}" if "text_index" in keys else "")


def _unique_labels(truth: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, int]:
    """The truth file's labels once per text, and how many repeated rows were collapsed; a text
    labelled both clean and not clean is refused (counting both made one text two)."""
    labels = truth[[*keys, "clean"]].drop_duplicates()
    repeats = len(truth) - len(labels)
    twice = labels[labels.duplicated(keys, keep=False)].drop_duplicates(keys)
    if len(twice):
        names = ", ".join(_label_name(row, keys) for _, row in twice.head(3).iterrows())
        more = f" and {len(twice) - 3} more" if len(twice) > 3 else ""
        raise ValueError(
            f"truth file labels {len(twice)} text(s) both clean and not clean: {names}{more}"
        )
    return labels.reset_index(drop=True), repeats


def _no_match_error(labels: pd.DataFrame, scores: pd.DataFrame, keys: list[str]) -> ValueError:
    """Why a truth file matching none of the scored texts is refused, with a key from each side
    (a uid spelt another way, e.g. with a shard prefix, is the usual cause)."""
    ours = _label_name(labels.iloc[0], keys)
    theirs = _label_name(scores.iloc[0], keys) if len(scores) else None
    scored = (
        f"e.g. '{theirs}'"
        if theirs is not None
        else "none" + (" of origin web" if keys == ["uid"] else "")
    )
    return ValueError(
        f"none of the truth file's {len(labels)} labelled text(s) matches a scored text "
        f"(matched on {' and '.join(keys)}): truth has e.g. '{ours}', the scores {scored}"
    )


STORED_TRUTH = ("clean", "noise", "terse")
"""A score table's own truth columns (the built-in benchmark's), which a truth file replaces."""


def _labelled(scores: pd.DataFrame, truth: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """(keys, scores): the columns a truth file's labels are matched on, and the scored texts it
    can label (a label by uid alone is about the image's web texts), without their own truth
    columns (the labels given win over the benchmark's)."""
    scores = scores.copy()
    scores["uid"] = scores["uid"].astype(str)
    keys = ["uid", "text_index"] if "text_index" in truth.columns else ["uid"]
    if keys == ["uid"]:
        scores = scores[scores["origin"].astype(str) == "web"]
    return keys, scores.drop(columns=[c for c in STORED_TRUTH if c in scores.columns])


def with_truth(scores: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The score table with a truth file's labels as its ``clean`` column (missing where a text
    has no label), so that :func:`filter_report` judges the decisions and the sweep by them."""
    keys, _ = _labelled(scores, truth)
    labels, _ = _unique_labels(truth, keys)
    table = scores.drop(columns=[c for c in STORED_TRUTH if c in scores.columns])
    table["uid"] = table["uid"].astype(str)
    if keys == ["uid"]:  # a label by uid alone is about the image's web texts only
        labels = labels.assign(origin="web")
        table["origin"] = table["origin"].astype(str)
        keys = [*keys, "origin"]
    return table.merge(labels, on=keys, how="left")


def truth_report(
    scores: pd.DataFrame,
    truth: pd.DataFrame,
    itm_threshold: float,
    itc_threshold: float,
) -> dict[str, Any]:
    """Precision/recall/F1 of rejecting the texts labelled not clean, and the ROC AUC of each
    score, for the ITM probability and the ITC cosine side by side (and the stored decision).

    ``scores`` is the filter's per-text table (``uid``, ``itm_score``, ``itc_cosine``,
    ``kept``, ``origin``, ``text_index``); ``truth`` comes from :func:`load_truth`. Repeated
    rows count once (``n_repeated_rows``); a text labelled both ways, or a truth file matching
    no scored text, is a ``ValueError``. Labels without a scored text are counted in
    ``n_unmatched``.
    """
    keys, scores = _labelled(scores, truth)
    labels, repeats = _unique_labels(truth, keys)
    merged = labels.merge(scores, on=keys, how="left", indicator=True)
    matched = merged[merged["_merge"] == "both"].reset_index(drop=True)
    if not len(matched):
        raise _no_match_error(labels, scores, keys)
    noisy = ~matched["clean"].to_numpy(dtype=bool)
    report: dict[str, Any] = {
        "n_labels": int(len(labels)),
        "n_repeated_rows": int(repeats),
        "n_matched": int(len(matched)),
        "n_unmatched": int((merged["_merge"] == "left_only").sum()),  # labels with no score
        "n_noisy": int(noisy.sum()),
        "heads": {},
    }
    for head, column, threshold in (
        ("itm", "itm_score", itm_threshold),
        ("itc", "itc_cosine", itc_threshold),
    ):
        score = pd.to_numeric(matched[column], errors="coerce").to_numpy(dtype=np.float64)
        # the cosine is not computed with rule itm unless filter.itc_cosine: true
        if len(score) and np.isnan(score).all():
            report["heads"][head] = {"threshold": float(threshold), "note": "not computed"}
            continue
        rejected = ~(score > threshold)
        row: dict[str, Any] = {"threshold": float(threshold), **_prf(rejected, noisy)}
        try:
            row["auc"] = roc_auc(score, ~noisy)  # clean is the positive class
        except ValueError as exc:
            row["auc"] = None
            row["note"] = f"AUC left out: {exc}"
        report["heads"][head] = row
    if "kept" in matched.columns and len(matched):
        report["stored_decision"] = _prf(~matched["kept"].astype(bool).to_numpy(), noisy)
    return report
