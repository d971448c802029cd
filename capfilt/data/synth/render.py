"""Scene → image: flat shapes drawn with PIL on a plain background, then JPEG bytes.

Geometry is relative to the image side S: slot centres at 0.25/0.5/0.75 S, "big" objects have a
half-extent of 0.19 S (24 px wide at 64 px) and "small" ones half of that, so size is obvious and
two big objects in opposite slots keep a gap of several pixels even with jitter.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from capfilt.data.synth.world import Scene, SceneObject

SLOT_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
"""Position slot → centre (x, y) as fractions of the image side."""

HALF_EXTENT = {"big": 0.19, "small": 0.095}
"""Half the object's width as a fraction of the image side."""


def object_geometry(obj: SceneObject, image_size: int) -> tuple[float, float, float]:
    """Centre x, centre y and half-extent of ``obj`` in pixels."""
    fx, fy = SLOT_CENTRES[obj.position]
    dx, dy = obj.offset
    return (fx + dx) * image_size, (fy + dy) * image_size, HALF_EXTENT[obj.size] * image_size


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int) -> None:
    cx, cy, r = object_geometry(obj, image_size)
    fill = tuple(obj.rgb)
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = 0.85 * r  # a full-extent square looks much heavier than the circle of the same width
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif obj.shape == "cross":
        t = max(1.0, 0.34 * r)  # arm half-thickness; at least 2 px wide when tiny
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"cannot draw shape {obj.shape!r}")


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as an RGB image; the same scene always gives the same pixels."""
    image = Image.new("RGB", (image_size, image_size), tuple(scene.background))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, image_size)
    return image


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes without chroma subsampling: with 4:2:0 a 12 px shape's colour bleeds away."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def render_jpeg(scene: Scene, image_size: int = 64, quality: int = 95) -> bytes:
    return encode_jpeg(render_scene(scene, image_size), quality)
