"""Caption metrics: hand-checked BLEU/CIDEr-D, PTB tokenisation, graceful METEOR failure, and the
published MAGIC scores on the 4,982-image COCO Karpathy test set (the full-data test takes ~26 s on
2 cores, most of it METEOR)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("pycocoevalcap", reason="caption metrics need the 'eval' extra (pycocoevalcap)")

from capfilt.eval import caption_metrics as cm  # noqa: E402
from capfilt.eval.caption_metrics import (  # noqa: E402
    CaptionMetricsError,
    ptb_tokenize,
    python_ptb_tokenize,
    score_captions,
)

MAGIC = (
    Path(__file__).resolve().parents[1].parent
    / "shared" / "data" / "text" / "magic" / "mscoco_karpathy_test_magic_result.json"
)  # fmt: skip
needs_java = pytest.mark.skipif(not cm.java_available(), reason="no java executable on PATH")

# Captions with what the Stanford PTB tokenizer 3.4.1 makes of them (observed with the jar), after the
# COCO evaluation drops its punctuation tokens.
PTB_CASES = [
    (
        "A man's cat can't (see) \"it\" -- 3.5 1,000 and/or.",
        "a man 's cat ca n't -lrb- see -rrb- it 3.5 1,000 and/or",
    ),
    ("I cannot go; wanna? gonna! don't", "i can not go wan na gon na do n't"),
    (
        "the U.S. flag on a T.V. in Main St. near 5th Ave.",
        "the u.s. flag on a t.v. in main st. near 5th ave.",
    ),
    ("a man wearing a t-shirt, jeans,and a hat.", "a man wearing a t-shirt jeans and a hat"),
    ("a close-up of a fork.a knife at 6:30...", "a close-up of a fork.a knife at 6:30"),
    (
        "It\u2019s a \u201cquoted\u201d caf\u00e9 scene, o'clock",
        "it 's a quoted caf\u00e9 scene o'clock",
    ),
    ("the kids' toys   and\tjesus' hat\r\nnext", "the kids toys and jesus hat next"),
    ("50% off $5 x*y", "50 % off $ 5 x * y"),
    ("", ""),
]


def test_python_tokenizer_matches_ptb_on_known_cases():
    got = python_ptb_tokenize([c for c, _ in PTB_CASES])
    assert got == [want for _, want in PTB_CASES]


@needs_java
def test_java_tokenizer_known_cases_and_one_line_per_caption():
    # "\r\n" and U+2028 inside a caption must not split it into two lines (pycocoevalcap's own wrapper
    # would misalign every caption after it).
    texts = [c for c, _ in PTB_CASES] + ["one\u2028two", "", "   "]
    tokens, backend, notes = ptb_tokenize(texts, tokenizer="java")
    assert backend == "java" and notes == []
    assert tokens == [want for _, want in PTB_CASES] + ["one two", "", ""]


def _bleu_parts(tokens_pred, tokens_ref):
    """BLEU-1..4 of one sentence pair by hand (clipped n-gram precision, brevity penalty)."""
    precisions = []
    for n in range(1, 5):
        grams = [tuple(tokens_pred[i : i + n]) for i in range(len(tokens_pred) - n + 1)]
        ref = [tuple(tokens_ref[i : i + n]) for i in range(len(tokens_ref) - n + 1)]
        match = sum(min(grams.count(g), ref.count(g)) for g in set(grams))
        precisions.append(match / len(grams))
    bp = min(1.0, math.exp(1 - len(tokens_ref) / len(tokens_pred)))
    return precisions, bp


def test_bleu_by_hand():
    pred = {1: "A dog runs on grass."}
    refs = {1: ["a dog runs in the park"]}
    out = score_captions(pred, refs, metrics=("bleu",), tokenizer="python")
    # unigrams 3/5, bigrams 2/4, trigrams 1/3, 4-grams 0/2; 5 words vs 6 -> BP = exp(1 - 6/5)
    p, bp = _bleu_parts("a dog runs on grass".split(), "a dog runs in the park".split())
    assert p == [3 / 5, 2 / 4, 1 / 3, 0.0]
    assert out["bleu1"] == pytest.approx(100 * bp * 0.6, abs=1e-6)  # 49.12
    assert out["bleu2"] == pytest.approx(100 * bp * math.sqrt(0.6 * 0.5), abs=1e-6)
    assert out["bleu3"] == pytest.approx(100 * bp * (0.6 * 0.5 / 3) ** (1 / 3), abs=1e-6)
    assert out["bleu4"] < 0.01  # no matching 4-gram (the scorer's 1e-15 smoothing keeps it > 0)
    assert set(out) == {"bleu1", "bleu2", "bleu3", "bleu4", "n_images", "tokenizer", "notes"}


def test_identical_and_disjoint_predictions():
    refs = {
        # no word is shared by two references, so each n-gram's IDF is log(2 images / 1)
        "a": ["red bus parked beside an old station", "two people wait outside"],
        "b": ["cat sleeping on wooden chair", "one kitten asleep indoors"],
        "c": ["green hills under cloudy skies today", "mountain landscape with fog"],
    }
    same = score_captions({"a": refs["a"][0], "b": refs["b"][0]}, refs, ("bleu", "cider", "rouge"))
    for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert same[k] == pytest.approx(100.0, abs=1e-4), k
    # CIDEr-D of a prediction equal to one of 2 references that share no n-gram with the other:
    # cosine 1 with it, 0 with the other -> (1 + 0) / 2 refs x 10 = 5 per image -> 500 %.
    assert same["cider"] == pytest.approx(500.0, abs=1e-6)

    disjoint = score_captions(
        {"a": "xylophone zebra quartz", "b": "plum jam kettle"}, refs, ("bleu", "cider", "rouge")
    )
    assert disjoint["bleu1"] < 1e-6 and disjoint["bleu4"] < 1e-3
    assert disjoint["cider"] == 0.0 and disjoint["rouge_l"] == 0.0

    # Corpus CIDEr-D is the mean over images: 5 (identical) and 0 (disjoint) -> 2.5 -> 250 %.
    mixed = score_captions({"a": refs["a"][0], "b": "plum jam kettle"}, refs, ("cider",))
    assert mixed["cider"] == pytest.approx(250.0, abs=1e-6)
    assert mixed["n_images"] == 2  # "c" has references but no prediction: not scored


def test_input_errors():
    with pytest.raises(ValueError, match="no reference"):
        score_captions({1: "a dog"}, {2: ["a dog"]})
    with pytest.raises(ValueError, match="unknown caption metric"):
        score_captions({1: "a dog"}, {1: ["a dog"]}, metrics=("spice",))
    with pytest.raises(TypeError):
        score_captions({1: "a dog"}, {1: "a dog"})
    with pytest.raises(ValueError, match="tokenizer"):
        ptb_tokenize(["a"], tokenizer="nltk")


def test_without_java_falls_back_and_skips_meteor(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java anywhere
    assert not cm.java_available()
    with pytest.raises(CaptionMetricsError, match="java"):
        ptb_tokenize(["a dog"], tokenizer="java")
    out = score_captions({1: "a dog runs on grass"}, {1: ["a dog runs in the park"]})
    assert out["tokenizer"] == "python"
    assert out["meteor"] is None
    assert any("METEOR skipped" in n for n in out["notes"])
    assert out["bleu1"] > 0
    json.dumps(out)


@needs_java
def test_meteor_failure_is_reported_not_raised(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_mod

    # The JVM starts but cannot find the jar and exits: the wrapper's readline gets EOF.
    monkeypatch.setattr(meteor_mod, "METEOR_JAR", "no-such-meteor.jar")
    out = score_captions({1: "a dog runs"}, {1: ["a dog is running"]}, ("bleu", "meteor"))
    assert out["meteor"] is None
    assert any("METEOR failed" in n for n in out["notes"]), out["notes"]
    assert out["bleu1"] > 0


@needs_java
def test_meteor_time_limit():
    out = score_captions(
        {1: "a dog runs"}, {1: ["a dog is running"]}, ("meteor",), meteor_timeout=0.05
    )
    assert out["meteor"] is None
    assert any("timed out" in n for n in out["notes"]), out["notes"]


@pytest.fixture(scope="module")
def magic():
    if not MAGIC.is_file():
        pytest.skip(f"MAGIC caption reference not found at {MAGIC}")
    rows = json.loads(MAGIC.read_text())
    assert len(rows) == 4982
    return {r["image_name"]: r["prediction"] for r in rows}, {
        r["image_name"]: r["captions"] for r in rows
    }


@pytest.mark.slow  # ~26 s on 2 idle cores, most of it METEOR (JVM + paraphrase table)
def test_magic_published_scores(magic):
    """MAGIC paper, COCO Karpathy test: BLEU-4 12.9, METEOR 17.4, ROUGE-L 39.9, CIDEr 49.3."""
    preds, refs = magic
    out = score_captions(preds, refs)
    assert out["n_images"] == 4982
    assert out["bleu4"] == pytest.approx(12.9, abs=0.1)
    assert out["cider"] == pytest.approx(49.3, abs=0.1)
    assert out["rouge_l"] == pytest.approx(39.9, abs=0.1)
    if out["tokenizer"] == "java":  # METEOR runs wherever Java does
        assert out["meteor"] == pytest.approx(17.4, abs=0.1), out["notes"]
    json.dumps(out)


@needs_java
def test_python_tokenizer_agrees_with_java_on_magic(magic):
    """The fallback tokenizer gives the Java tokens for all but a handful of the 29,892 captions
    (measured: 3 differ: "Wii U.", "lying I. The", "M&Ms"), hence the same BLEU and CIDEr to 1e-4."""
    preds, refs = magic
    texts = list(preds.values()) + [c for rs in refs.values() for c in rs]
    java_tokens, _, _ = ptb_tokenize(texts, tokenizer="java")
    py_tokens = python_ptb_tokenize(texts)
    differ = sum(a != b for a, b in zip(java_tokens, py_tokens, strict=True))
    assert differ <= 10
