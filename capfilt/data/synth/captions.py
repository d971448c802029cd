"""Caption writing: true descriptions of a scene from varied templates, and the web-text noise.

``describe`` writes one true caption. Every caption names each object's shape; colour, size and
position (or a relation between the two objects) are stated at random, so captions of the same
scene differ in content as well as in wording, like several people's COCO captions do. Captions
of two-object scenes always mention both objects.

``terse`` writes a true text that names each object's colour and shape and nothing else ("a red
circle and a blue square": no size, place or relation): a web text that says less than a
caption, as alt-text often does (the premise of BLIP's captioner, BLIP §3.3). In a terse world
the wrong web texts are terse too (another scene's terse text, or one colour or shape wrong), so
a text's form never tells whether it is right.

Noise for ``web/`` texts (``noisy_text``): ``swap`` (a caption of another random scene),
``attribute`` (a caption of this scene with one attribute of one object changed) and ``generic``
(alt-text junk). swap and attribute texts are checked false with the truth checker and redrawn
until they are.
"""

from __future__ import annotations

from dataclasses import replace

from capfilt.data.synth.lexicon import (
    BACKGROUNDS,
    COLOUR_WORDS,
    COUNT_TWO,
    PREFIXES,
    RELATION_WORDS,
    SHAPE_WORDS,
    SINGLE_DETERMINERS,
    SIZE_WORDS,
    article,
    position_phrases,
)
from capfilt.data.synth.truth import caption_is_true
from capfilt.data.synth.world import (
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Rng,
    Scene,
    SceneObject,
    relation_holds,
    sample_scene,
)

Require = tuple[int, str] | None
"""(object index, attribute) that a caption must state: how an attribute corruption shows."""

P_COLOUR = 0.85
"""Chance that a noun phrase states the colour (when not forced)."""
P_SIZE = 0.5
"""Chance that a noun phrase states the size (when not forced)."""
P_COMMON_WORD = 0.6
"""Chance of the most common surface word of a meaning; the rest share the synonyms evenly."""
P_FRAME = 0.2
"""Chance that a position phrase ends with "of the image"-like words."""

_THERE_IS = ("there is", "we can see")

MAX_TRIES = 200
"""Redraws allowed to find a false swap/attribute text before giving up (never needed in practice)."""


def _word(rng: Rng, options: tuple[str, ...]) -> str:
    if len(options) == 1 or rng.chance(P_COMMON_WORD):
        return options[0]
    return rng.choice(options[1:])


def noun_phrase(
    obj: SceneObject,
    rng: Rng,
    *,
    det: str = "a",
    colour: bool | None = None,
    size: bool | None = None,
) -> str:
    """A noun phrase such as "a big red circle": size and colour are random unless forced."""
    colour = rng.chance(P_COLOUR) if colour is None else colour
    size = rng.chance(P_SIZE) if size is None else size
    words = []
    if size:
        words.append(_word(rng, SIZE_WORDS[obj.size]))
    if colour:
        words.append(_word(rng, COLOUR_WORDS[obj.colour]))
    words.append(_word(rng, SHAPE_WORDS[obj.shape]))
    body = " ".join(words)
    if det == "a":
        det = article(body)
    return f"{det} {body}"


def position_phrase(obj: SceneObject, rng: Rng) -> str:
    return rng.choice(position_phrases(obj.position, with_frame=rng.chance(P_FRAME)))


def _forced(require: Require, index: int, attribute: str) -> bool | None:
    """True where ``require`` asks object ``index`` to state ``attribute``; None = leave it to chance."""
    return True if require == (index, attribute) else None


def _describe_one(scene: Scene, rng: Rng, require: Require) -> str:
    obj = scene.objects[0]
    colour = _forced(require, 0, "colour")
    size = _forced(require, 0, "size")

    def np(det: str = "a", **kw) -> str:
        return noun_phrase(obj, rng, det=det, colour=kw.get("colour", colour), size=size)

    templates = [
        lambda: f"{np()} {position_phrase(obj, rng)}",
        lambda: f"{_word(rng, _THERE_IS)} {np()} {position_phrase(obj, rng)}",
        lambda: f"{rng.choice(PREFIXES)} {np()} {position_phrase(obj, rng)}",
        lambda: f"{position_phrase(obj, rng)} there is {np()}",
        lambda: f"{np('the')} is {position_phrase(obj, rng)}",
        lambda: f"{np()} {position_phrase(obj, rng)} {rng.choice(BACKGROUNDS)}",
        lambda: f"{np(rng.choice(SINGLE_DETERMINERS))} {position_phrase(obj, rng)}",
    ]
    if require != (0, "position"):
        # without a position the colour is always said, else the caption says almost nothing
        templates += [
            lambda: np(colour=True),
            lambda: f"{rng.choice(PREFIXES)} {np(colour=True)} {rng.choice(BACKGROUNDS)}",
        ]
    return rng.choice(templates)()


def _relation_words(a: SceneObject, b: SceneObject, rng: Rng) -> str:
    holds = [r for r in RELATIONS if relation_holds(r, a.position, b.position)]
    return _word(rng, RELATION_WORDS[rng.choice(holds)])


def _describe_two(scene: Scene, rng: Rng, require: Require) -> str:
    order = rng.shuffled(range(len(scene.objects)))
    ia, ib = order[0], order[1]
    a, b = scene.objects[ia], scene.objects[ib]

    def np(index: int, det: str = "a") -> str:
        obj = scene.objects[index]
        return noun_phrase(
            obj,
            rng,
            det=det,
            colour=_forced(require, index, "colour"),
            size=_forced(require, index, "size"),
        )

    def pos(obj: SceneObject) -> str:
        return position_phrase(obj, rng)

    def rel() -> str:
        return _relation_words(a, b, rng)

    templates = [
        lambda: f"{np(ia)} {pos(a)} and {np(ib)} {pos(b)}",
        lambda: f"{np(ia)} {rel()} {np(ib)}",
        lambda: f"{_word(rng, _THERE_IS)} {np(ia)} {rel()} {np(ib)}",
        lambda: f"{rng.choice(COUNT_TWO)} {np(ia)} {pos(a)} and {np(ib)} {pos(b)}",
        lambda: f"{rng.choice(PREFIXES)} {np(ia)} {rel()} {np(ib)}",
        lambda: f"{pos(a)} there is {np(ia)} and {pos(b)} there is {np(ib)}",
        lambda: f"{pos(a)} {np(ia)} and {pos(b)} {np(ib)}",
        lambda: f"{np(ia)} {pos(a)} {rel()} {np(ib)}",
        lambda: f"{np(ia, 'the')} is {rel()} {np(ib, 'the')}",
    ]
    if require is None or require[1] != "position":
        templates += [
            lambda: f"{np(ia)} and {np(ib)}",
            lambda: f"there are {rng.choice(COUNT_TWO)} {np(ia)} and {np(ib)}",
            lambda: f"{np(ia)} and {np(ib)} {rng.choice(BACKGROUNDS)}",
        ]
    return rng.choice(templates)()


def describe(scene: Scene, rng: Rng, *, require: Require = None) -> str:
    """One true caption of ``scene`` (lowercase, no punctuation).

    ``require=(i, attribute)`` makes the caption state that attribute of object ``i``
    (``position`` is stated by a position phrase or by a relation to the other object).
    """
    if len(scene.objects) == 1:
        return _describe_one(scene, rng, require)
    return _describe_two(scene, rng, require)


def terse(scene: Scene, rng: Rng) -> str:
    """A true text of ``scene`` that names every object's colour and shape, but no size or place.

    Colour stays because a filter fine-tuned on this world's human captions rejects texts that
    leave it out (a third to two fifths of shape-only texts were rejected at 0.5, which counts
    against its F1 on web noise although they are true); it keeps these (99%)."""
    names = [noun_phrase(obj, rng, colour=True, size=False) for obj in scene.objects]
    body = " and ".join(names)
    return rng.choice(
        [
            lambda: body,
            lambda: f"{rng.choice(PREFIXES)} {body}",
            lambda: f"{body} {rng.choice(BACKGROUNDS)}",
        ]
    )()


def describe_distinct(scene: Scene, rng: Rng, n: int) -> list[str]:
    """``n`` captions of ``scene``, all different where the templates allow it."""
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(20 * n):  # a handful of redraws is plenty: scenes have hundreds of captions
        if len(out) == n:
            break
        text = describe(scene, rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    while len(out) < n:
        out.append(describe(scene, rng))
    return out


ATTRIBUTES = ("colour", "shape", "size", "position")


TERSE_ATTRIBUTES = ("colour", "shape")
"""The attributes a terse text states, so the ones a terse attribute-noise text can get wrong."""


def corrupt_scene(
    scene: Scene, rng: Rng, attributes: tuple[str, ...] = ATTRIBUTES
) -> tuple[Scene, tuple[int, str]]:
    """``scene`` with one of ``attributes`` of one object changed, and which (object index,
    attribute).

    In a two-object scene a position change swaps the two objects' places, which keeps the
    scene's layout valid and makes "left of" into "right of".
    """
    index = rng.randint(0, len(scene.objects) - 1)
    attribute = rng.choice(attributes)
    obj = scene.objects[index]
    if attribute == "position" and len(scene.objects) == 2:
        other = scene.objects[1 - index]
        objects = [None, None]
        objects[index] = obj.changed(position=other.position)
        objects[1 - index] = other.changed(position=obj.position)
        return replace(scene, objects=tuple(objects)), (index, attribute)
    options = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS}[
        attribute
    ]
    new = rng.choice(tuple(v for v in options if v != getattr(obj, attribute)))
    return scene.replace_object(index, obj.changed(**{attribute: new})), (index, attribute)


def attribute_noise(scene: Scene, rng: Rng, *, terse_text: bool = False) -> str:
    """A caption that is true of ``scene`` except for exactly one attribute of one object
    (with ``terse_text``, a terse text wrong in one object's colour or shape)."""
    for _ in range(MAX_TRIES):
        if terse_text:
            wrong, _ = corrupt_scene(scene, rng, TERSE_ATTRIBUTES)
            text = terse(wrong, rng)
        else:
            wrong, require = corrupt_scene(scene, rng)
            text = describe(wrong, rng, require=require)
        if not caption_is_true(text, scene):
            return text
    # only a degenerate hand-made scene gets here
    raise RuntimeError("could not write a false attribute caption")


def swap_noise(scene: Scene, rng: Rng, max_objects: int = 2, *, terse_text: bool = False) -> str:
    """A caption (or with ``terse_text`` a terse text) of another random scene, false of ``scene``."""
    write = terse if terse_text else describe
    for _ in range(MAX_TRIES):
        text = write(sample_scene(rng, max_objects), rng)
        if not caption_is_true(text, scene):
            return text
    raise RuntimeError("could not draw a false swap caption")


_NAMES = ("john", "maria", "alex", "kim", "sam", "lee")
_GENERIC = (
    lambda r: "click to enlarge",
    lambda r: "stock photo",
    lambda r: "image",
    lambda r: "untitled",
    lambda r: f"untitled-{r.randint(1, 99)}",
    lambda r: f"dsc {r.randint(0, 9999):04d}",
    lambda r: f"img_{r.randint(0, 9999):04d}.jpg",
    lambda r: f"photo by {r.choice(_NAMES)}",
    lambda r: "free download wallpaper hd",
    lambda r: "thumbnail",
    lambda r: "no description available",
    lambda r: f"screenshot {r.randint(2008, 2023)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    lambda r: "abstract geometric background vector",
    lambda r: "view full size",
    lambda r: "all rights reserved",
    lambda r: f"image {r.randint(1, 9)} of {r.randint(10, 40)}",
    lambda r: f"best wallpaper {r.randint(2010, 2023)}",
    lambda r: "clipart shapes for kids",
    lambda r: f"{r.choice(_NAMES)}'s upload",
    lambda r: "sale 50% off today only",
)
"""Alt-text junk found under real web images: file names, boilerplate, credits, ads."""


def generic_noise(rng: Rng) -> str:
    """Alt-text junk that describes nothing in the image."""
    return rng.choice(_GENERIC)(rng)


def noisy_text(
    kind: str, scene: Scene, rng: Rng, max_objects: int = 2, *, terse_text: bool = False
) -> str:
    """A web text of noise ``kind`` (swap, attribute, generic) for ``scene``; swap and attribute
    texts are terse with ``terse_text`` (generic junk is the same either way)."""
    if kind == "swap":
        return swap_noise(scene, rng, max_objects, terse_text=terse_text)
    if kind == "attribute":
        return attribute_noise(scene, rng, terse_text=terse_text)
    if kind == "generic":
        return generic_noise(rng)
    raise ValueError(f"unknown noise kind {kind!r}")
