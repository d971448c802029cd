"""The built-in benchmark: a procedurally drawn world of coloured shapes whose truth is known.

Images show one or two flat shapes (shape, colour, size, position); captions are written from
templates with synonyms; a parser checks any caption against a scene's stored attributes, so
caption truth and filter precision/recall can be measured exactly. ``write_synth`` writes the
``human/``, ``web/`` (noisy) and ``test/`` shard folders.
"""

from capfilt.data.synth.build import write_synth
from capfilt.data.synth.captions import describe, describe_distinct, noisy_text
from capfilt.data.synth.render import render_jpeg, render_scene
from capfilt.data.synth.truth import (
    CaptionParseError,
    caption_is_true,
    check_caption,
    parse_caption,
)
from capfilt.data.synth.world import Rng, Scene, SceneObject, sample_scene

__all__ = [
    "CaptionParseError",
    "Rng",
    "Scene",
    "SceneObject",
    "caption_is_true",
    "check_caption",
    "describe",
    "describe_distinct",
    "noisy_text",
    "parse_caption",
    "render_jpeg",
    "render_scene",
    "sample_scene",
    "write_synth",
]
