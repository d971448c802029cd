"""Every recipe value a stage cannot use is refused when the recipe loads: exit 2, naming the key
(with its section, also inside ``finetune.*``) and the value given."""

from __future__ import annotations

import pytest

from capfilt.config import RECIPES_DIR, ConfigError, load_recipe
from tests.faults._cli import no_traceback, run_cli

BAD_VALUES = {
    "caption": [
        ("caption.batch_size=0", "caption.batch_size"),
        ("caption.top_p=5", "caption.top_p"),
        ("caption.top_p=0", "caption.top_p"),
        ("caption.temperature=-1", "caption.temperature"),
        ("caption.temperature=0", "caption.temperature"),
        ("caption.num_captions=0", "caption.num_captions"),
        ("caption.num_beams=0", "caption.num_beams"),
        ("caption.repetition_penalty=0", "caption.repetition_penalty"),
        ("caption.max_length=0", "caption.max_length"),
        ("caption.min_length=40", "caption.min_length"),  # above max_length (30)
    ],
    "filter": [
        ("filter.threshold=1.5", "filter.threshold"),
        ("filter.threshold=-0.1", "filter.threshold"),
        ("filter.batch_size=-3", "filter.batch_size"),
    ],
    "eval": [("eval.k=-1", "eval.k"), ("eval.batch_size=0", "eval.batch_size")],
    "train": [
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.ckpt_every=0", "train.ckpt_every"),
        ("train.log_every=0", "train.log_every"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.betas=[0.9, 1.0]", "train.betas[1]"),
        ("train.min_lr=1", "train.min_lr"),  # above lr
        ("train.clip_grad=-1", "train.clip_grad"),
        ("train.samples_per_epoch=-5", "train.samples_per_epoch"),
        ("finetune.captioner.ckpt_every=0", "finetune.captioner.ckpt_every"),
        ("finetune.filter.lr=-1", "finetune.filter.lr"),
    ],
    "data": [
        ("data.num_workers=-1", "data.num_workers"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.shuffle_buffer=0", "data.shuffle_buffer"),
        ("data.max_words=0", "data.max_words"),
        ("data.weights=[1, -1]", "data.weights[1]"),
        ("data.std=[0.2, 0, 0.2]", "data.std[1]"),
    ],
    "model": [
        ("model.temp=0", "model.temp"),
        ("model.momentum=1.5", "model.momentum"),
        ("model.text_dropout=1", "model.text_dropout"),
        ("model.vision_heads=0", "model.vision_heads"),
        ("model.image_size=30", "model.image_size"),  # not a multiple of the patch size
    ],
    "synth": [("synth.jpeg_quality=0", "synth.jpeg_quality"), ("synth.n_web=-1", "synth.n_web")],
}


@pytest.mark.parametrize("section", sorted(BAD_VALUES))
def test_out_of_range_values_are_refused_naming_the_key(section):
    for override, key in BAD_VALUES[section]:
        with pytest.raises(ConfigError) as err:
            load_recipe("tiny", [override])
        message = str(err.value)
        assert message.startswith(f"{key}: must be"), (override, message)
        value = override.split("=", 1)[1]
        if not value.startswith("["):
            assert f"got {float(value)!r}" in message or f"got {value}" in message, message


def test_boundary_values_are_accepted():
    cfg = load_recipe(
        "tiny",
        [
            "filter.threshold=0",
            "caption.top_p=1",
            "caption.min_length=20",  # = max_length in tiny
            "data.num_workers=0",
            "train.keep_checkpoints=1",
            "train.warmup_steps=0",
            "eval.k=0",
        ],
    )
    assert cfg.filter.threshold == 0 and cfg.caption.top_p == 1 and cfg.eval.k == 0
    assert load_recipe("tiny", ["filter.threshold=1"]).filter.threshold == 1


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_still_loads(recipe):
    assert load_recipe(recipe).name


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("filter", "tiny", "--model", "m", "--threshold", "1.5"), "filter.threshold"),
        (("caption", "tiny", "--model", "m", "--set", "caption.top_p=5"), "caption.top_p"),
        (("pretrain", "tiny", "--set", "train.ckpt_every=0"), "train.ckpt_every"),
        (("pretrain", "tiny", "--set", "data.num_workers=-1"), "data.num_workers"),
        (("pretrain", "tiny", "--set", "train.lr=-1"), "train.lr"),
    ],
)
def test_the_cli_exits_2_before_doing_anything(args, key, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_cli(capsys, *args, "--shards", tmp_path / "none", "--out", out)
    assert result.code == 2, result.output
    assert f"error: {key}: must be" in result.stderr
    assert no_traceback(result)
    assert not out.exists()
