"""Image transforms: random-resized-crop training view and a plain resize for evaluation (docs/architecture.md §5).

The training transform draws its randomness from a ``random.Random`` passed per sample, not from
torch's global generator, so a sample's augmentation depends only on its position in the
(seeded) data stream: a resumed run sees exactly the crops an uninterrupted run would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from capfilt.config.schema import ModelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASPECT_RANGE = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default ratio range


def _crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area (RandomResizedCrop's rule)."""
    area = width * height
    log_lo, log_hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(width, height)  # fallback: central square crop
    return (height - side) // 2, (width - side) // 2, side, side


def resize_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 pixels [C, H, W] resized to ``height`` x ``width``, bicubic with antialiasing.

    This is the filter of Pillow's BICUBIC resize, which BLIP's transforms use, run by torch's
    uint8 kernel. Pillow's resize cost an inference stage's loader worker as much as decoding
    the JPEG; on coco-mini's photos this one is 4.2-4.7x faster, so a worker prepares 1.7-1.95x
    the photos per second (benchmarks/image_resize.py). The values are Pillow's up to rounding:
    0.015-0.05 levels apart on average, and 1 value in 10,000-100,000 more than 2 levels apart
    (at sharp edges; at most 19 levels in that benchmark).
    """
    return F2.resize(pixels, [height, width], InterpolationMode.BICUBIC, antialias=True)


class _Normalizing:
    """The second half of a transform split for loader workers: :meth:`normalize` turns uint8
    pixels (made in a worker: a quarter of the bytes of the float input to pass between
    processes and copy to a GPU) into the model's float input, a whole batch at once on the
    model's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # loader workers get the settings, never statistics cached on a GPU
        return {**self.__dict__, "_stats": {}}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [..., 3, S, S] (an image or a batch, on any device) → the model's float
        input: ``(pixels / 255 - mean) / std``, as ``to_tensor`` + ``normalize`` compute it."""
        stats = self._stats.get(pixels.device)
        if stats is None:
            stats = tuple(
                torch.tensor(v, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
                for v in (self.mean, self.std)
            )
            self._stats[pixels.device] = stats
        mean, std = stats
        return pixels.float().div(255).sub_(mean).div_(std)


class TrainTransform(_Normalizing):
    """RandomResizedCrop(scale) + optional horizontal flip + normalise, driven by an explicit RNG.

    :meth:`pixels` runs in the training loader's workers (uint8), :meth:`normalize` on the
    batch where the model is; calling the transform does both, the same to the bit.
    """

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ):
        super().__init__(mean, std)
        self.image_size = image_size
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip

    def pixels(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        """The random view of the image at the model's input size, uint8 [3, S, S]."""
        # Pillow's resize, not resize_pixels' faster kernel: the training runs (and the
        # README's measured demo and ablation tables) stay the same to the digit
        top, left, h, w = _crop_box(image.width, image.height, self.crop_scale, rng)
        image = F.resized_crop(
            image, top, left, h, w, [self.image_size, self.image_size], InterpolationMode.BICUBIC
        )
        if self.hflip and rng.random() < 0.5:
            image = F.hflip(image)
        return F.pil_to_tensor(image)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        return self.normalize(self.pixels(image, rng))


class EvalTransform(_Normalizing):
    """Resize to the model's square input, normalise.

    In two halves for the inference stages' loaders: :meth:`pixels` (in a worker process: the
    resized image as uint8) and :meth:`normalize` (a whole batch, on the model's device). Calling
    the transform does both; the result is the same to the bit either way.
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
    ):
        super().__init__(mean, std)
        self.image_size = image_size

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The image resized to the model's input, uint8 [3, S, S]."""
        return resize_pixels(F.pil_to_tensor(image), self.image_size, self.image_size)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.normalize(self.pixels(image))


def preprocess_spec(
    image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> dict[str, Any]:
    """What a model folder records about its input images (its meta's ``"preprocess"``): the
    image side and the normalisation statistics the model was trained with."""
    return {
        "image_size": int(image_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def eval_transform_for(meta: Mapping[str, Any] | None, cfg: ModelConfig) -> EvalTransform:
    """The evaluation transform of a loaded model: the preprocessing saved in its folder's meta
    (:func:`preprocess_spec`); folders written without one get CLIP's statistics, as before."""
    saved = (meta or {}).get("preprocess")
    if not saved:
        return EvalTransform(cfg.image_size)
    if int(saved["image_size"]) != cfg.image_size:
        raise ValueError(
            f"the model folder's preprocess.image_size {saved['image_size']} differs from its model.image_size {cfg.image_size}"
        )
    return EvalTransform(cfg.image_size, tuple(saved["mean"]), tuple(saved["std"]))
