"""The synthetic world's facts: attribute values, scenes, spatial relations, seeded sampling.

A scene is one or two flat shapes on a plain light background. Each object has four named
attributes (shape, colour, size, position) plus small rendering jitter (offset, exact RGB) that
is stored with the scene so that the image can be re-rendered from its ``truth.scene`` json.

Positions are five slots on a 3x3 layout. Two-object scenes use opposite slots only
(left/right or top/bottom): with "big" objects a quarter of the image wide, any other pair could
overlap, and with opposite slots the relations "left of" / "above" are unambiguous.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

T = TypeVar("T")

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
"""Shapes that stay distinguishable at 12 px after JPEG (no stars: their points blur away)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 205, 30),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "black": (25, 25, 25),
    "cyan": (30, 195, 210),
}
"""Object colours: far apart in hue or lightness, and all unlike the light grey background."""

SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "center")

SLOTS: dict[str, tuple[int, int]] = {
    "left": (0, 1),
    "right": (2, 1),
    "top": (1, 0),
    "bottom": (1, 2),
    "center": (1, 1),
}
"""Position → (column, row) on a 3x3 layout; relations are defined on these, not on pixels."""

PAIRS = (("left", "right"), ("top", "bottom"))
"""Position pairs of two-object scenes (see the module docstring)."""

RELATIONS = ("left_of", "right_of", "above", "below", "next_to")

COLOUR_JITTER = 12
"""Per-channel RGB jitter of an object: visible variety, still far from every other colour."""
OFFSET_JITTER = 0.03
"""Position jitter as a fraction of the image side (about 2 px at 64 px)."""
BACKGROUND_RANGE = (218, 245)
"""Grey level of the plain background."""


def relation_holds(relation: str, a: str, b: str) -> bool:
    """Whether an object at position ``a`` stands in ``relation`` to one at position ``b``.

    ``next_to`` means side by side in the same row (left/center/right of each other).
    """
    (ca, ra), (cb, rb) = SLOTS[a], SLOTS[b]
    if relation == "left_of":
        return ca < cb
    if relation == "right_of":
        return ca > cb
    if relation == "above":
        return ra < rb
    if relation == "below":
        return ra > rb
    if relation == "next_to":
        return ra == rb and ca != cb
    raise ValueError(f"unknown relation {relation!r}")


class Rng:
    """A seeded random source keyed by a tuple, e.g. ``Rng(seed, split_id, shard_index)``.

    Every draw goes through ``random.Random.random()``, the one method whose sequence Python
    promises to keep across versions, so the world is byte-identical on any interpreter.
    """

    def __init__(self, *key: int | str):
        digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
        self._random = random.Random(int.from_bytes(digest[:8], "big"))

    def random(self) -> float:
        return self._random.random()

    def chance(self, p: float) -> bool:
        return self._random.random() < p

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._random.random()

    def randint(self, low: int, high: int) -> int:
        """Integer in ``[low, high]``, both ends included."""
        return low + min(int(self._random.random() * (high - low + 1)), high - low)

    def choice(self, seq: Sequence[T]) -> T:
        if not seq:
            raise IndexError("choice from an empty sequence")
        return seq[self.randint(0, len(seq) - 1)]

    def weighted(self, items: Sequence[T], weights: Sequence[float]) -> T:
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("weights must not all be zero")
        x = self._random.random() * total
        for item, weight in zip(items, weights, strict=True):
            x -= weight
            if x < 0:
                return item
        return next(
            item
            for item, weight in zip(reversed(items), reversed(weights), strict=True)
            if weight > 0
        )

    def shuffled(self, seq: Sequence[T]) -> list[T]:
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):
            j = self.randint(0, i)
            out[i], out[j] = out[j], out[i]
        return out


@dataclass(frozen=True)
class SceneObject:
    """One shape: its named attributes plus the rendering jitter that makes images differ."""

    shape: str
    colour: str
    size: str
    position: str
    rgb: tuple[int, int, int]
    """Exact fill colour (the named colour plus jitter)."""
    offset: tuple[float, float] = (0.0, 0.0)
    """Centre offset from the position slot, as a fraction of the image side."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {tuple(allowed)}, got {getattr(self, name)!r}"
                )

    def changed(self, **changes: Any) -> SceneObject:
        """A copy with attributes changed; a new colour brings its plain RGB."""
        if "colour" in changes and "rgb" not in changes:
            changes["rgb"] = COLOURS[changes["colour"]]
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "rgb": list(self.rgb),
            "offset": list(self.offset),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        return cls(
            shape=data["shape"],
            colour=data["colour"],
            size=data["size"],
            position=data["position"],
            rgb=tuple(int(v) for v in data.get("rgb", COLOURS[data["colour"]])),
            offset=tuple(float(v) for v in data.get("offset", (0.0, 0.0))),
        )


@dataclass(frozen=True)
class Scene:
    """An image's ground truth: its objects and background grey level."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int] = (232, 232, 232)

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")

    def replace_object(self, index: int, obj: SceneObject) -> Scene:
        objects = list(self.objects)
        objects[index] = obj
        return replace(self, objects=tuple(objects))

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background": list(self.background)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(
            objects=tuple(SceneObject.from_dict(o) for o in data["objects"]),
            background=tuple(int(v) for v in data.get("background", (232, 232, 232))),
        )


def _jittered_rgb(colour: str, rng: Rng) -> tuple[int, int, int]:
    return tuple(
        max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour]
    )


def sample_object(rng: Rng, position: str) -> SceneObject:
    colour = rng.choice(tuple(COLOURS))
    return SceneObject(
        shape=rng.choice(SHAPES),
        colour=colour,
        size=rng.choice(SIZES),
        position=position,
        rgb=_jittered_rgb(colour, rng),
        # rounded so that the json round trip gives back the very same scene
        offset=(
            round(rng.uniform(-OFFSET_JITTER, OFFSET_JITTER), 3),
            round(rng.uniform(-OFFSET_JITTER, OFFSET_JITTER), 3),
        ),
    )


def sample_scene(rng: Rng, max_objects: int = 2) -> Scene:
    """A random scene with 1..max_objects objects (uniform), attributes uniform and independent."""
    if max_objects not in (1, 2):
        raise ValueError("max_objects must be 1 or 2")
    n = rng.randint(1, max_objects)
    if n == 1:
        positions: Sequence[str] = (rng.choice(POSITIONS),)
    else:
        positions = rng.shuffled(rng.choice(PAIRS))
    grey = rng.randint(*BACKGROUND_RANGE)
    return Scene(
        objects=tuple(sample_object(rng, p) for p in positions), background=(grey, grey, grey)
    )
