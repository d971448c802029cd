"""Caption preprocessing (docs/architecture.md §5, as BLIP's ``pre_caption``)."""

from __future__ import annotations

import re

_STRIP = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s+")


def clean_caption(text: str, max_words: int | None = 30) -> str:
    """Lowercase, replace ``.!"()*#:;~`` by spaces, collapse whitespace, keep ``max_words`` words."""
    text = _SPACES.sub(" ", _STRIP.sub(" ", text.lower())).strip()
    if max_words is not None and max_words > 0:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text
