"""Two things a user of a long caption run saw: the closing progress line printed twice, and a
transformers FutureWarning (``past_key_values``) printed on every run."""

from __future__ import annotations

import logging
import warnings

import torch

from capfilt.config import CaptionConfig
from capfilt.model import train_wordpiece_tokenizer
from capfilt.model.decoding import row_seeds
from capfilt.model.generate import generate_captions
from capfilt.utils.progress import ProgressReporter
from tests.conftest import build_tiny_model


def _lines(caplog, desc: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{desc}:")]


def test_the_closing_progress_line_is_not_a_repeat_of_the_last_one(caplog):
    caplog.set_level(logging.INFO)
    with ProgressReporter("caption", total=8, log_interval=0.0, use_bar=False) as progress:
        progress.advance(4)
        progress.advance(4)  # the periodic line already says 8/8
    lines = _lines(caplog, "caption")
    assert (
        len(lines) == 2
        and lines[0].startswith("caption: 4/8")
        and lines[1].startswith("caption: 8/8")
    )


def test_the_closing_line_is_written_when_the_last_count_was_not_logged(caplog):
    caplog.set_level(logging.INFO)
    with ProgressReporter("caption", total=8, log_interval=3600.0, use_bar=False) as progress:
        progress.advance(8)  # no periodic line within the interval
    lines = _lines(caplog, "caption")
    assert len(lines) == 1 and lines[0].startswith("caption: 8/8")


def test_captioning_raises_no_deprecation_or_future_warning():
    tok = train_wordpiece_tokenizer(["a red circle", "a blue square on the left"] * 4, 60)
    model = build_tiny_model(tok).eval()
    images = torch.randn(3, 3, 32, 32)
    settings = CaptionConfig(max_length=6, min_length=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = generate_captions(
            model, tok, images, settings, 2, row_seeds(0, ["a", "b", "c"], 2)
        )
    assert len(captions) == 3 and all(len(c) == 2 for c in captions)
    noisy = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not noisy, [str(w.message) for w in noisy]
