"""The truth checker: parse a caption of this world and check each of its claims against a scene.

A caption is read with the world's phrase lexicon (longest phrase first, synonyms folded to their
meaning) and a small grammar that covers everything the caption writer produces and the obvious
variants (missing articles, "a picture of ...", commas). Any word outside the lexicon, or words
in an order the grammar does not read, make the caption *unparseable*, and an unparseable caption
is not true: a model's caption may be any word sequence.

Definition. A parsed caption is **true** of a scene iff
  1. it mentions at least one object;
  2. its mentioned objects can be matched to *distinct* objects of the scene such that every
     stated attribute (shape always; colour, size, position where stated) is that object's, and
     every stated relation ("left of", "above", "next to", ...) holds between the matched objects;
  3. its count claim, if any ("two shapes", "a single ..."), equals the scene's object count.
A caption that mentions only one object of a two-object scene can be true; ``complete`` says
whether it mentions as many objects as the scene has.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from capfilt.data.synth.lexicon import lexicon
from capfilt.data.synth.world import Scene, relation_holds

ATTRIBUTES = ("shape", "colour", "size", "position")

_PUNCT = re.compile(r"[.!\"()*#:;~,?]")
"""BLIP's caption cleaning strips ``.!"()*#:;~``; commas and question marks are read as spaces too."""


class CaptionParseError(ValueError):
    """The caption is not a sentence of this world's grammar."""


@dataclass
class Mention:
    """One object as a caption describes it; None = not stated."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def label(self) -> str:
        return " ".join(v for v in (self.size, self.colour, self.shape) if v)


@dataclass
class ParsedCaption:
    mentions: list[Mention] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    """(subject mention index, relation, object mention index)."""
    count: int | None = None
    """Claimed number of objects in the scene, if the caption claims one."""


@cache
def _table() -> tuple[dict[tuple[str, ...], tuple[str, str]], int]:
    table = {tuple(phrase.split()): meaning for phrase, meaning in lexicon().items()}
    return table, max(len(k) for k in table)


def tokenize(caption: str) -> list[tuple[str, str, str]]:
    """Caption → (category, value, surface) tokens, longest known phrase first."""
    words = _PUNCT.sub(" ", caption.lower()).split()
    table, longest = _table()
    tokens = []
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            meaning = table.get(tuple(words[i : i + n]))
            if meaning is not None:
                tokens.append((*meaning, " ".join(words[i : i + n])))
                i += n
                break
        else:
            raise CaptionParseError(f"unknown word {words[i]!r}")
    return tokens


class _Parser:
    """Recursive descent over the token list; see ``parse_caption`` for the grammar."""

    def __init__(self, tokens: list[tuple[str, str, str]]):
        self.tokens = tokens
        self.i = 0
        self.out = ParsedCaption()

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def accept(self, category: str) -> str | None:
        if self.peek() == category:
            value = self.tokens[self.i][1]
            self.i += 1
            return value
        return None

    def fail(self, expected: str) -> CaptionParseError:
        got = repr(self.tokens[self.i][2]) if self.i < len(self.tokens) else "the end"
        return CaptionParseError(f"expected {expected}, got {got}")

    def claim_count(self, n: int) -> None:
        if self.out.count is not None and self.out.count != n:
            raise CaptionParseError("contradictory object counts")
        self.out.count = n

    def noun_phrase(self) -> int:
        det = self.accept("det")
        if det == "1":
            self.claim_count(1)
        mention: dict[str, str] = {}
        while self.peek() in ("size", "colour"):
            category = self.peek()
            if category in mention:
                raise CaptionParseError(f"two {category} words for one object")
            mention[category] = self.accept(category)
        shape = self.accept("shape")
        if shape is None:
            raise self.fail("a shape")
        self.out.mentions.append(Mention(shape=shape, **mention))
        return len(self.out.mentions) - 1

    def attach_position(self, index: int) -> None:
        position = self.accept("position")
        if position is not None:
            self.out.mentions[index].position = position

    def clause(self) -> None:
        self.accept("there")
        position = self.accept("position")
        if position is not None:  # "on the left (there is) a red circle"
            self.accept("there")
            index = self.noun_phrase()
            self.out.mentions[index].position = position
        else:  # "a red circle (is) (on the left) (to the left of a blue square (on the right))"
            index = self.noun_phrase()
            copula = self.accept("is")
            self.attach_position(index)
            relation = self.accept("relation")
            if relation is not None:
                other = self.noun_phrase()
                self.out.relations.append((index, relation, other))
                self.attach_position(other)
            elif copula is not None and self.out.mentions[index].position is None:
                raise self.fail("a position or relation after 'is'")
        self.accept("background")

    def caption(self) -> ParsedCaption:
        self.accept("prefix")
        self.accept("there")
        if self.accept("count") is not None:
            self.claim_count(2)
        self.clause()
        while self.accept("and") is not None:
            self.clause()
        if self.i != len(self.tokens):
            raise self.fail("the end of the caption")
        return self.out


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a caption; raises ``CaptionParseError`` if it is not in the world's grammar.

    Grammar (tokens are lexicon phrases; ``[x]`` optional)::

        caption := [prefix] [there] [count] clause ("and" clause)*
        clause  := [there] ( position [there] np
                           | np ["is"] [position] [relation np [position]] ) [background]
        np      := [det] {size | colour} shape      (at most one size and one colour)
    """
    if not caption or not caption.strip():
        raise CaptionParseError("empty caption")
    return _Parser(tokenize(caption)).caption()


def _as_scene(scene: Scene | dict[str, Any]) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_dict(scene)


def _failures(parsed: ParsedCaption, scene: Scene, assignment: tuple[int, ...]) -> list[str]:
    failed = []
    for m, (mention, index) in enumerate(zip(parsed.mentions, assignment, strict=True)):
        obj = scene.objects[index]
        for attribute in ATTRIBUTES:
            said = getattr(mention, attribute)
            if said is not None and said != getattr(obj, attribute):
                failed.append(
                    f"object {m + 1} ({mention.label()}): {attribute} is {getattr(obj, attribute)}, caption says {said}"
                )
    for a, relation, b in parsed.relations:
        pa, pb = scene.objects[assignment[a]].position, scene.objects[assignment[b]].position
        if not relation_holds(relation, pa, pb):
            failed.append(
                f"relation: object {a + 1} is not {relation} object {b + 1} ({pa} vs {pb})"
            )
    return failed


def check_caption(caption: str, scene: Scene | dict[str, Any]) -> dict[str, Any]:
    """Check ``caption`` against ``scene`` (a Scene or its ``to_dict`` json).

    Returns ``true`` (see the module docstring), ``parsed``, ``complete`` (mentions as many
    objects as the scene has), ``n_mentions``, ``assignment`` (mention → scene object index, for
    the best match) and ``failed``: the claims that do not hold under the best match (fewest
    failures), or why the caption could not be read.
    """
    scene = _as_scene(scene)
    result: dict[str, Any] = {
        "parsed": False,
        "true": False,
        "complete": False,
        "n_mentions": 0,
        "assignment": [],
        "failed": [],
    }
    try:
        parsed = parse_caption(caption)
    except CaptionParseError as err:
        result["failed"] = [f"unparseable: {err}"]
        return result
    n_objects, n_mentions = len(scene.objects), len(parsed.mentions)
    failed: list[str] = []
    result.update(parsed=True, n_mentions=n_mentions, complete=n_mentions == n_objects)
    if parsed.count is not None and parsed.count != n_objects:
        failed.append(f"count: caption says {parsed.count} objects, scene has {n_objects}")
    if n_mentions > n_objects:
        failed.append(f"mentions {n_mentions} objects, scene has {n_objects}")
    else:
        # at most two objects, so trying every matching is cheap and exact
        best = min(
            (
                (_failures(parsed, scene, a), a)
                for a in itertools.permutations(range(n_objects), n_mentions)
            ),
            key=lambda fa: len(fa[0]),
        )
        failed.extend(best[0])
        result["assignment"] = list(best[1])
    result["failed"] = failed
    result["true"] = not failed
    return result


def caption_is_true(caption: str, scene: Scene | dict[str, Any]) -> bool:
    """Whether ``caption`` is true of ``scene`` (unparseable captions are not)."""
    return check_caption(caption, scene)["true"]
