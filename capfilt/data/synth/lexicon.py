"""The world's words: surface phrases for each meaning, shared by the caption writer and the parser.

Each table maps a canonical value to its surface phrases, the most common first (the writer picks
it more often). The parser reads every phrase listed here, plus a few that the writer never
uses but a model or a person plausibly would ("a picture of", "gray").
"""

from __future__ import annotations

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign", "plus"),
}

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow",),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "black": ("black",),
    "cyan": ("cyan", "turquoise"),
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "big": ("big", "large", "huge"),
}

_POSITION_BASES: dict[str, tuple[str, ...]] = {
    "left": (
        "on the left",
        "on the left side",
        "at the left",
        "on the left hand side",
        "in the left half",
    ),
    "right": (
        "on the right",
        "on the right side",
        "at the right",
        "on the right hand side",
        "in the right half",
    ),
    "top": ("at the top", "near the top", "in the upper part", "in the top half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part", "in the bottom half"),
    "center": ("in the middle", "in the center", "in the centre", "at the center"),
}
FRAME_SUFFIXES = ("of the image", "of the picture", "of the frame")
"""Optional ending of a position phrase: "on the left side of the picture"."""


def position_phrases(position: str, *, with_frame: bool) -> tuple[str, ...]:
    bases = _POSITION_BASES[position]
    if not with_frame:
        return bases
    return tuple(f"{base} {suffix}" for base in bases for suffix in FRAME_SUFFIXES)


EXTRA_POSITIONS: dict[str, tuple[str, ...]] = {
    "left": ("to the left",),
    "right": ("to the right",),
    "top": ("on top",),
}
"""Position phrases the parser also reads."""

RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "next_to": ("next to", "beside"),
}

EXTRA_RELATIONS: dict[str, tuple[str, ...]] = {"above": ("on top of",), "below": ("underneath",)}
"""Relation phrases the parser also reads."""

PREFIXES = (
    "an image of",
    "a drawing of",
    "a simple drawing of",
    "a sketch of",
    "an image showing",
    "a drawing showing",
    "a picture showing",
    "a picture with",
)
"""Caption openings the writer uses; never "a picture of", which is the captioner's prompt."""
EXTRA_PREFIXES = ("a picture of", "a photo of", "a photo showing")
"""Openings the parser also reads."""

BACKGROUNDS = (
    "on a plain background",
    "on a light background",
    "on a grey background",
    "on a blank background",
    "against a light background",
)
EXTRA_BACKGROUNDS = ("on a gray background", "on a white background")

COUNT_TWO = ("two shapes", "two objects")
"""Count phrases: claim the scene has exactly two objects."""
SINGLE_DETERMINERS = ("a single", "only one")
"""Determiners that also claim the scene has exactly one object."""
DETERMINERS = ("a", "an", "the", "one")
THERE = ("there is", "there are", "we can see", "you can see")
COPULA = ("is",)
AND = ("and",)

VOWELS = "aeiou"


def article(next_word: str) -> str:
    """The indefinite article for the next word (every word of this world is spelled as it sounds)."""
    return "an" if next_word[:1] in VOWELS else "a"


def lexicon() -> dict[str, tuple[str, str]]:
    """Every phrase the parser knows → (category, canonical value)."""
    table: dict[str, tuple[str, str]] = {}

    def add(category: str, value: str, phrases: tuple[str, ...]) -> None:
        for phrase in phrases:
            table[phrase] = (category, value)

    for value, phrases in SHAPE_WORDS.items():
        add("shape", value, phrases)
    for value, phrases in COLOUR_WORDS.items():
        add("colour", value, phrases)
    for value, phrases in SIZE_WORDS.items():
        add("size", value, phrases)
    for value in _POSITION_BASES:
        add("position", value, position_phrases(value, with_frame=False))
        add("position", value, position_phrases(value, with_frame=True))
    for value, phrases in EXTRA_POSITIONS.items():
        add("position", value, phrases)
    for value, phrases in RELATION_WORDS.items():
        add("relation", value, phrases)
    for value, phrases in EXTRA_RELATIONS.items():
        add("relation", value, phrases)
    add("prefix", "", PREFIXES + EXTRA_PREFIXES)
    add("background", "", BACKGROUNDS + EXTRA_BACKGROUNDS)
    add("count", "2", COUNT_TWO)
    add("det", "1", SINGLE_DETERMINERS)
    add("det", "", DETERMINERS)
    add("there", "", THERE)
    add("is", "", COPULA)
    add("and", "", AND)
    return table


def writer_vocabulary() -> set[str]:
    """Words the caption writer can emit (human/test captions and clean web texts)."""
    phrases: list[str] = []
    for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS, RELATION_WORDS):
        for values in table.values():
            phrases.extend(values)
    for position in _POSITION_BASES:
        phrases.extend(position_phrases(position, with_frame=True))
    phrases += [
        *PREFIXES,
        *BACKGROUNDS,
        *COUNT_TWO,
        *SINGLE_DETERMINERS,
        *DETERMINERS,
        *THERE,
        *COPULA,
        *AND,
    ]
    return {word for phrase in phrases for word in phrase.split()}
