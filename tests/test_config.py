"""Recipes: every shipped recipe loads; overrides, unknown keys and wrong types behave."""

from __future__ import annotations

import dataclasses

import pytest

from capfilt.config import (
    RECIPES_DIR,
    ConfigError,
    Recipe,
    config_hash,
    dump_yaml,
    explain,
    field_docs,
    from_dict,
    load_recipe,
    load_yaml,
)
from capfilt.config import schema as schema_module

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"tiny", "demo", "blip-base"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_recipe(path)
    assert isinstance(cfg, Recipe)
    # Every key written in the file is a schema key (from_dict would have raised) and survives a dump.
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_recipe(again) == cfg
    raw = load_yaml(path)
    assert raw.get("name") == path.stem


def test_blip_base_holds_the_paper_settings():
    cfg = load_recipe("blip-base")
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.model.vision_width) == (224, 16, 768)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps, cfg.train.warmup_lr) == (
        3e-4,
        0.05,
        3000,
        1e-6,
    )
    assert (cfg.train.lr_decay_rate, cfg.train.epochs, cfg.train.schedule) == (0.9, 20, "step")
    assert cfg.model.queue_size == 57600 and cfg.model.momentum == 0.995 and cfg.model.alpha == 0.4
    assert cfg.caption.top_p == 0.9 and cfg.filter.threshold == 0.5


def test_overrides_set_nested_fields_and_parse_types():
    cfg = load_recipe(
        "tiny",
        ["train.lr=1e-4", "model.grad_checkpointing=true", "data.crop_scale=[0.3, 1.0]", "name=x"],
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.grad_checkpointing is True
    assert cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.name == "x"
    assert config_hash(cfg) != config_hash(load_recipe("tiny"))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "train.lrr"),
        ("nosection.x=1", "nosection"),
        ("train.epochs=abc", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("model.grad_checkpointing=3", "model.grad_checkpointing"),
        ("train.schedule=linear", "train.schedule"),
        ("synth.noise_mix.bogus=1", "synth.noise_mix.bogus"),
        ("data.crop_scale=[0.5]", "data.crop_scale"),
        ("model.image_pool=max", "model.image_pool"),
        ("model.text_pool=max", "model.text_pool"),
        ("model.vision_stem=[8]", "model.vision_stem"),
        ("model.weight_init=xavier", "model.weight_init"),
        ("train.itm_negatives=soft", "train.itm_negatives"),
        ("finetune.filter.itm_negatives=easy", "finetune.filter.itm_negatives"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_recipe("tiny", [override])


def test_a_mapping_entry_an_empty_section_and_none(tmp_path):
    default = load_recipe("demo").synth.noise_mix
    assert set(default) == {"swap", "attribute", "generic"}
    # one entry of a mapping changes, the others keep the default's weight
    mix = load_recipe("demo", ["synth.noise_mix.swap=0.9"]).synth.noise_mix
    assert mix == {**default, "swap": 0.9}
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: demo\nsynth:\n  noise_mix: {generic: 0}\ntrain:\n")
    mine = load_recipe(recipe)
    assert mine.synth.noise_mix == {**default, "generic": 0.0}
    # `train:` left empty keeps the base's training section, not the defaults
    assert mine.train == load_recipe("demo").train != load_recipe(None).train
    # None spelled as Python does, for an optional setting
    assert load_recipe("demo", ["filter.keep_fraction=None"]).filter.keep_fraction is None
    assert load_recipe("demo", ["filter.keep_fraction=0.5", "filter.keep_fraction=none"]) == (
        load_recipe("demo")
    )
    with pytest.raises(ConfigError, match="filter.threshold: expected a number, got 'None'"):
        load_recipe("demo", ["filter.threshold=None"])  # not optional


def test_a_training_runs_config_yaml_is_the_recipe_it_ran(tmp_path):
    from capfilt.config.core import dump_yaml, to_dict

    recipe = load_recipe("tiny", ["train.lr=0.25"])
    run_config = {"stage": "pretrain", "shards": ["x"], "recipe": to_dict(recipe)}
    (tmp_path / "config.yaml").write_text(dump_yaml(run_config))
    assert load_recipe(tmp_path / "config.yaml") == recipe


def test_config_explain_lists_extends_and_refuses_an_unknown_section():
    from typer.testing import CliRunner

    from capfilt.cli.main import app

    result = CliRunner().invoke(app, ["config", "explain", "extends"])
    assert result.exit_code == 0 and "mine.yaml" in result.output and "extends" in result.output
    result = CliRunner().invoke(app, ["config", "explain", "nosuch"])
    assert result.exit_code == 2 and "no recipe key starts with 'nosuch'" in result.output
    assert "sections: caption, data, eval, extends" in " ".join(result.output.split())


def test_unknown_recipe_and_malformed_override():
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe("no-such-recipe")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe("tiny", ["train.lr"])


def test_every_field_has_a_docstring():
    for cls in [
        c
        for c in vars(schema_module).values()
        if dataclasses.is_dataclass(c) and isinstance(c, type)
    ]:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"
    assert all(doc for _, _, doc in explain(Recipe))
    types = {key: tp for key, tp, _ in explain(Recipe)}
    assert types["train.schedule"] == "'step' | 'cosine'"  # a choice lists its values
    assert types["train.lr"] == "float"


def test_from_dict_defaults_and_hash_stability():
    a = from_dict(Recipe, {})
    b = from_dict(Recipe, {"train": {}})
    assert a == b and config_hash(a) == config_hash(b)


def test_a_key_given_twice_is_refused_not_silently_dropped(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: tiny\ntrain:\n  epochs: 3\ntrain:\n  lr: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"mine.yaml: key 'train' is given twice \(lines 2 and 4\)"
    ):
        load_recipe(recipe)
    recipe.write_text("extends: tiny\ntrain:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(lines 3 and 4\)"):
        load_recipe(recipe)
    # a YAML merge key is not a duplicate: the section's own value overrides the anchor's
    recipe.write_text("extends: tiny\ntrain:\n  <<: {lr: 0.1, epochs: 3}\n  lr: 0.2\n")
    assert (load_recipe(recipe).train.lr, load_recipe(recipe).train.epochs) == (0.2, 3)


def test_a_typo_in_a_base_recipe_names_the_file_that_holds_it(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: tiny\ntrain:\n  epoch: 3\n")
    (tmp_path / "child.yaml").write_text("extends: base\ntrain:\n  lr: 0.1\n")
    with pytest.raises(
        ConfigError, match=r"^child.yaml: extends: base.yaml: unknown config key 'train.epoch'"
    ):
        load_recipe(tmp_path / "child.yaml")
    # a typo in a --set override is not in any file
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.epoch'"):
        load_recipe("tiny", ["train.epoch=3"])
