"""The image preprocessing a model was trained with travels in its model folder: a run with
non-default ``data.mean``/``data.std`` records them, and caption, filter and both evaluations
normalise with them; folders written without a record keep CLIP's statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capfilt.config import load_recipe
from capfilt.data import transforms as transforms_mod
from capfilt.data.synth import write_synth
from capfilt.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, eval_transform_for
from capfilt.eval.retrieval import evaluate_retrieval
from capfilt.eval.stage_eval import evaluate_captioner
from capfilt.model import load_model_folder, save_model_folder
from capfilt.model.folder import META
from capfilt.pipeline.caption import caption_shards
from capfilt.pipeline.filter import filter_shards
from capfilt.runs.convert import convert
from capfilt.train.trainer import TrainJob, train
from tests.conftest import build_tiny_model

MEAN = (0.5, 0.25, 0.125)
STD = (0.2, 0.3, 0.4)
SETS = [
    "synth.n_human=16",
    "synth.n_web=16",
    "synth.n_test=8",
    "synth.shard_size=16",
    "train.epochs=1",
    "train.samples_per_epoch=16",
    "train.ckpt_every=1",
    "data.batch_size=8",
    f"data.mean={list(MEAN)}",
    f"data.std={list(STD)}",
    "caption.batch_size=8",
    "caption.max_length=5",
    "caption.min_length=1",
    "filter.batch_size=8",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny pretrain run of 2 steps with non-default normalisation statistics."""
    root = tmp_path_factory.mktemp("preprocess")
    recipe = load_recipe("tiny", SETS)
    write_synth(root / "data", recipe.synth)
    shards = [str(root / "data" / "human"), str(root / "data" / "web")]
    model_dir = train(TrainJob(stage="pretrain", recipe=recipe, shards=shards, out=root / "run"))
    return {"root": root, "recipe": recipe, "model": model_dir, "run": root / "run"}


@pytest.fixture
def seen(monkeypatch) -> list[tuple]:
    """(image_size, mean, std) of every evaluation transform's normalisation (of an image, or of a
    stage's whole batch)."""
    calls: list[tuple] = []
    original = EvalTransform.normalize

    def recording(self, pixels):
        calls.append((self.image_size, tuple(self.mean), tuple(self.std)))
        return original(self, pixels)

    monkeypatch.setattr(transforms_mod.EvalTransform, "normalize", recording)
    return calls


def test_the_model_folder_and_checkpoints_record_the_training_statistics(trained):
    want = {"image_size": 32, "mean": list(MEAN), "std": list(STD)}
    meta = json.loads((trained["model"] / META).read_text())
    assert meta["preprocess"] == want
    latest = (trained["run"] / "checkpoints" / "latest").read_text().strip()
    checkpoint = json.loads((trained["run"] / "checkpoints" / latest / META).read_text())
    assert checkpoint["preprocess"] == want
    _, _, cfg, loaded = load_model_folder(trained["model"])
    transform = eval_transform_for(loaded, cfg)
    assert (transform.image_size, transform.mean, transform.std) == (32, list(MEAN), list(STD))


def test_caption_filter_and_evaluations_normalise_with_the_saved_statistics(
    trained, seen, tmp_path
):
    recipe, test = trained["recipe"], [str(trained["root"] / "data" / "test")]
    expected = (32, MEAN, STD)

    caption_shards(trained["run"], test, tmp_path / "captioned", recipe.caption)
    assert seen and set(seen) == {expected}
    seen.clear()
    filter_shards(trained["model"], test, tmp_path / "filtered", recipe.filter)
    assert seen and set(seen) == {expected}
    seen.clear()
    evaluate_retrieval(trained["model"], test, k=2, batch_size=8)
    assert seen and set(seen) == {expected}
    seen.clear()
    evaluate_captioner(trained["model"], test, recipe.caption, metrics=("bleu",), max_images=4)
    assert seen and set(seen) == {expected}

    # the statistics change what the model sees: the saved ones are not CLIP's
    image = torch.zeros(3, 32, 32)
    saved = EvalTransform(32, MEAN, STD)
    clip = EvalTransform(32)
    from torchvision.transforms.functional import to_pil_image

    pil = to_pil_image(image)
    assert not torch.allclose(saved(pil), clip(pil))


def _noise_images(sizes) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for h, w in sizes
    ]


def test_worker_pixels_then_batch_normalisation_equal_the_whole_transform_to_the_bit():
    """Loader workers send uint8 pixels and the stage normalises the batch: the model's input is
    exactly to_tensor + normalize of the resized image, and the resize is Pillow's bicubic (BLIP's)
    up to rounding: within 2 levels, a few thousandths of a level apart on average, on noise
    (the hardest case), downscaled and upscaled."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    transform = EvalTransform(32, MEAN, STD)
    images = _noise_images([(40, 50), (17, 33), (64, 64), (480, 640)])
    pixels = torch.stack([transform.pixels(im) for im in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 32, 32)
    reference = torch.stack(
        [F.normalize(F.to_tensor(F.to_pil_image(p)), MEAN, STD) for p in pixels]
    )
    assert torch.equal(transform.normalize(pixels), reference)
    assert torch.equal(torch.stack([transform(im) for im in images]), reference)
    pillow = torch.stack(
        [F.pil_to_tensor(F.resize(im, [32, 32], InterpolationMode.BICUBIC)) for im in images]
    )
    difference = (pixels.int() - pillow.int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.01


def test_training_views_are_pillows_crops_normalised_where_the_model_is_to_the_bit():
    """The training loader's workers send uint8 crops and the trainer normalises the batch: the
    model's input is exactly what to_tensor + normalize of the same random crop and flip give
    (Pillow's resize, the training runs unchanged)."""
    import random

    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from capfilt.data.transforms import TrainTransform, _crop_box

    transform = TrainTransform(32, (0.5, 1.0), True, MEAN, STD)
    images = _noise_images([(40, 50), (17, 33), (64, 64), (480, 640)]) * 3
    pixels = torch.stack([transform.pixels(im, random.Random(i)) for i, im in enumerate(images)])
    assert pixels.dtype == torch.uint8 and pixels.shape == (12, 3, 32, 32)
    reference = []
    for i, im in enumerate(images):  # the transform before the split, step by step
        rng = random.Random(i)
        top, left, h, w = _crop_box(im.width, im.height, (0.5, 1.0), rng)
        view = F.resized_crop(im, top, left, h, w, [32, 32], InterpolationMode.BICUBIC)
        view = F.hflip(view) if rng.random() < 0.5 else view
        reference.append(F.normalize(F.to_tensor(view), MEAN, STD))
    reference = torch.stack(reference)
    assert torch.equal(transform.normalize(pixels), reference)
    wholes = [transform(im, random.Random(i)) for i, im in enumerate(images)]
    assert torch.equal(torch.stack(wholes), reference)
    assert not torch.equal(reference[0], reference[4])  # the same image, another view


def test_exported_processor_carries_the_saved_statistics(trained, tmp_path):
    from transformers import BlipImageProcessor

    out, fmt, kind = convert(trained["model"], tmp_path / "hf", kind="filter")
    assert (fmt, kind) == ("transformers", "filter")
    processor = BlipImageProcessor.from_pretrained(str(out))
    assert processor.image_mean == pytest.approx(list(MEAN))
    assert processor.image_std == pytest.approx(list(STD))


def test_folders_without_a_record_keep_clip_statistics(trained, tmp_path):
    model, tokenizer, cfg, _ = load_model_folder(trained["model"])
    older = save_model_folder(tmp_path / "old", model, tokenizer, cfg, stage="pretrain")
    meta = json.loads((Path(older) / META).read_text())
    assert "preprocess" not in meta
    transform = eval_transform_for(meta, cfg)
    assert (transform.mean, transform.std) == (list(CLIP_MEAN), list(CLIP_STD))
    tiny = build_tiny_model(tokenizer)
    with pytest.raises(ValueError, match="image_size"):
        eval_transform_for({"preprocess": {"image_size": 64, "mean": MEAN, "std": STD}}, tiny.cfg)
