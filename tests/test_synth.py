"""The built-in benchmark world: captions true by construction, an exact truth checker, noise that
is really wrong, deterministic and resumable shards, and pixels that show what the truth says."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from capfilt.config.core import ConfigError
from capfilt.config.schema import SynthConfig
from capfilt.data.reader import read_samples
from capfilt.data.shards import count_samples, expand_shards
from capfilt.data.synth import (
    Rng,
    Scene,
    SceneObject,
    caption_is_true,
    check_caption,
    describe,
    describe_distinct,
    parse_caption,
    render_scene,
    sample_scene,
    write_synth,
)
from capfilt.data.synth.captions import (
    corrupt_scene,
    generic_noise,
    noisy_text,
    swap_noise,
    terse,
)
from capfilt.data.synth.lexicon import writer_vocabulary
from capfilt.data.synth.render import encode_jpeg, object_geometry
from capfilt.data.synth.world import COLOURS, POSITIONS, SHAPES
from capfilt.data.text import clean_caption

SMALL = SynthConfig(
    seed=3,
    n_human=40,
    n_web=600,
    n_test=20,
    captions_per_human=3,
    captions_per_test=4,
    noise_rate=0.5,
    web_terse_rate=0.4,
    shard_size=128,
)


def _obj(shape, colour, size, position):
    return SceneObject(shape, colour, size, position, rgb=COLOURS[colour])


TWO = Scene((_obj("circle", "red", "big", "left"), _obj("triangle", "green", "small", "right")))
ONE = Scene((_obj("square", "blue", "small", "center"),))


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _samples(folder: Path):
    return list(read_samples(expand_shards(str(folder))))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    write_synth(out, SMALL)
    return out


# --- captions and the checker -------------------------------------------------------------


def test_every_generated_caption_is_true_complete_and_clean():
    rng = Rng("captions")
    vocabulary = writer_vocabulary()
    for _ in range(400):
        scene = sample_scene(rng)
        for text in describe_distinct(scene, rng, 5):
            result = check_caption(text, scene)
            assert result["true"] and result["complete"], (text, result, scene.to_dict())
            assert text == clean_caption(text), text  # BLIP's cleaning leaves it unchanged
            assert set(text.split()) <= vocabulary, text
    assert 70 <= len(vocabulary) <= 130


def test_terse_texts_are_true_complete_and_name_only_colours_and_shapes():
    rng = Rng("terse")
    for _ in range(300):
        scene = sample_scene(rng)
        text = terse(scene, rng)
        result = check_caption(text, scene)
        assert result["true"] and result["complete"], (text, result, scene.to_dict())
        parsed = parse_caption(text)
        named = sorted((m.shape, m.colour) for m in parsed.mentions)
        assert named == sorted((o.shape, o.colour) for o in scene.objects), text
        assert all(m.size is m.position is None for m in parsed.mentions), text
        assert not parsed.relations and parsed.count is None, text


def test_terse_noise_is_false_and_terse():
    rng = Rng("terse noise")
    for _ in range(200):
        scene = sample_scene(rng)
        for kind in ("swap", "attribute"):
            text = noisy_text(kind, scene, rng, terse_text=True)
            assert not caption_is_true(text, scene), (kind, text)
            mentions = parse_caption(text).mentions
            assert all(m.size is m.position is None and m.colour for m in mentions), text
        # one colour or shape wrong: the other objects as they are
        wrong = parse_caption(noisy_text("attribute", scene, rng, terse_text=True)).mentions
        if len(scene.objects) == 1:
            obj, m = scene.objects[0], wrong[0]
            assert (m.colour != obj.colour) + (m.shape != obj.shape) == 1


def test_captions_of_one_scene_are_diverse():
    rng = Rng("diverse")
    for _ in range(50):
        scene = sample_scene(rng)
        assert len(set(describe_distinct(scene, rng, 5))) == 5


@pytest.mark.parametrize(
    "caption",
    [
        "a big red circle on the left",
        "a red circle to the left of a green triangle",
        "there is a small green triangle on the right side of the picture",
        "two shapes a large red disc at the left and a tiny green triangle on the right",
        "on the right there is a triangle and on the left a red circle",
        "the green triangle is to the right of the big red circle",
        "A big red circle, on the left.",  # case and punctuation as a person would write
        "red circle next to green triangle",  # no articles
        "a picture of a red circle on a plain background",
        "a green triangle",
        "a red circle to the left",  # phrases the writer never uses but a model might
        "a green triangle to the right",
    ],
)
def test_checker_accepts_true_captions(caption):
    result = check_caption(caption, TWO)
    assert result["parsed"] and result["true"], result
    assert result["failed"] == []


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("a blue circle on the left", "colour"),
        ("a big red square", "shape"),
        ("a small red circle", "size"),
        ("a red circle on the right", "position"),
        ("a red circle to the right of a green triangle", "relation"),
        ("a red circle above a green triangle", "relation"),
        ("a single red circle on the left", "count"),
        ("a red circle and a red circle", "shape"),  # two mentions need two distinct objects
        ("a red circle and a green triangle and a blue square", "mentions 3"),
        ("circle red the left", "unparseable"),
        ("zxq blorp wibble", "unparseable"),
        ("a red circle is", "unparseable"),
        ("a red circle and", "unparseable"),
        ("a red green circle", "unparseable"),
        ("", "unparseable"),
        ("click to enlarge", "unparseable"),
        ("IMG_2041.jpg", "unparseable"),
        ("image", "unparseable"),
        ("free download wallpaper hd", "unparseable"),
    ],
)
def test_checker_rejects_false_captions(caption, reason):
    result = check_caption(caption, TWO)
    assert not result["true"]
    assert any(reason in failure for failure in result["failed"]), result


def test_checker_completeness_counts_and_scene_json():
    assert check_caption("a red circle", TWO)["complete"] is False
    assert check_caption("a red circle and a triangle", TWO)["complete"] is True
    assert caption_is_true("a single small blue square in the middle", ONE)
    assert not caption_is_true("two shapes a blue square and a red circle", ONE)
    assert not caption_is_true("two shapes a small blue square", ONE)
    # a truth json works as well as a Scene
    assert caption_is_true("a blue box in the centre of the frame", ONE.to_dict())
    vertical = Scene(
        (_obj("cross", "black", "big", "top"), _obj("diamond", "orange", "small", "bottom"))
    )
    assert caption_is_true("a black cross on top of an orange diamond", vertical)
    assert caption_is_true("an orange diamond underneath a cross on top", vertical)
    # "next to" means side by side in one row
    assert not caption_is_true("a black cross next to an orange diamond", vertical)
    parsed = parse_caption("a tiny violet plus sign beneath a large turquoise rhombus")
    assert [(m.shape, m.colour, m.size) for m in parsed.mentions] == [
        ("cross", "purple", "small"),
        ("diamond", "cyan", "big"),
    ]
    assert parsed.relations == [(0, "below", 1)]


def test_attribute_noise_changes_exactly_one_claim():
    rng = Rng("attribute")
    for _ in range(400):
        scene = sample_scene(rng)
        wrong, (index, attribute) = corrupt_scene(scene, rng)
        diff = [
            (i, f.name)
            for i, (a, b) in enumerate(zip(scene.objects, wrong.objects, strict=True))
            for f in dataclasses.fields(a)
            if f.name in ("shape", "colour", "size", "position")
            and getattr(a, f.name) != getattr(b, f.name)
        ]
        if attribute == "position" and len(scene.objects) == 2:
            assert {d[1] for d in diff} == {"position"}  # the two objects trade places
            continue
        assert diff == [(index, attribute)]
        text = describe(wrong, rng, require=(index, attribute))
        assert caption_is_true(text, wrong)
        result = check_caption(text, scene)
        if result["true"]:  # a changed attribute that the other object happens to match
            continue
        assert len(result["failed"]) == 1, (text, result)


def test_swap_and_generic_noise_are_false():
    rng = Rng("swap")
    for _ in range(300):
        scene = sample_scene(rng)
        assert not caption_is_true(swap_noise(scene, rng), scene)
        assert not check_caption(generic_noise(rng), scene)["parsed"]


# --- the world and its pixels -------------------------------------------------------------


def test_scene_sampling_is_balanced_and_round_trips():
    rng = Rng("balance")
    scenes = [sample_scene(rng) for _ in range(3000)]
    counts = Counter(len(s.objects) for s in scenes)
    assert abs(counts[1] - counts[2]) < 300
    objects = [o for s in scenes for o in s.objects]
    # two-object scenes never use the centre, so positions are counted on single objects
    singles = [s.objects[0] for s in scenes if len(s.objects) == 1]
    for attribute, values, pool in (
        ("shape", SHAPES, objects),
        ("colour", COLOURS, objects),
        ("position", POSITIONS, singles),
    ):
        freq = Counter(getattr(o, attribute) for o in pool)
        assert set(freq) == set(values)
        assert max(freq.values()) < 1.5 * min(freq.values()), (attribute, freq)
    for scene in scenes[:200]:
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert all(len(sample_scene(rng, max_objects=1).objects) == 1 for _ in range(100))


def test_objects_stay_inside_the_image_and_apart():
    rng = Rng("geometry")
    size = 64
    for _ in range(2000):
        scene = sample_scene(rng)
        boxes = []
        for obj in scene.objects:
            cx, cy, r = object_geometry(obj, size)
            assert r <= cx <= size - r and r <= cy <= size - r
            boxes.append((cx, cy, r))
        if len(boxes) == 2:
            (ax, ay, ar), (bx, by, br) = boxes
            gap = max(abs(ax - bx), abs(ay - by)) - ar - br
            assert gap >= 3, scene  # pixels apart, so objects never touch after JPEG


@pytest.mark.parametrize("colour", sorted(COLOURS))
def test_rendered_colour_and_size_show_in_pixels(colour):
    rng = Rng("pixels", colour)
    for shape in SHAPES:
        scene = sample_scene(rng, max_objects=1)
        obj = scene.objects[0].changed(shape=shape, colour=colour, size="big")
        image = Image.open(
            io.BytesIO(encode_jpeg(render_scene(Scene((obj,), scene.background)), 95))
        )
        pixels = np.asarray(image.convert("RGB"), dtype=float)
        cx, cy, _ = object_geometry(obj, 64)
        patch = pixels[int(cy) - 1 : int(cy) + 2, int(cx) - 1 : int(cx) + 2].reshape(-1, 3).mean(0)
        assert np.abs(patch - np.array(obj.rgb)).max() < 20, (shape, colour, patch, obj.rgb)
        nearest = min(COLOURS, key=lambda c: np.square(patch - np.array(COLOURS[c])).sum())
        assert nearest == colour
    small = render_scene(Scene((_obj("square", colour, "small", "center"),)), 64)
    big = render_scene(Scene((_obj("square", colour, "big", "center"),)), 64)

    def area(im):
        return int((np.asarray(im, dtype=int) != np.asarray(im)[0, 0]).any(-1).sum())

    assert 3.0 < area(big) / area(small) < 5.0


# --- the written splits -------------------------------------------------------------------


def test_splits_have_the_configured_shape(world):
    summary = json.loads((world / "synth.json").read_text())["summary"]
    expected = {
        "human": (SMALL.n_human, SMALL.captions_per_human),
        "web": (SMALL.n_web, 1),
        "test": (SMALL.n_test, SMALL.captions_per_test),
    }
    keys = set()
    for split, (n, per_image) in expected.items():
        urls = expand_shards(str(world / split))
        assert len(urls) == -(-n // SMALL.shard_size)
        assert count_samples(urls) == n == summary["splits"][split]["count"]
        samples = _samples(world / split)
        assert len(samples) == n
        for sample in samples:
            meta = sample.meta
            assert meta["uid"] == sample.key and "." not in sample.key
            assert meta["source"] == f"synth-{split}"
            assert len(sample.captions) == per_image
            assert sample.text == sample.captions[0]["text"]
            assert {c["origin"] for c in sample.captions} == {"web" if split == "web" else "human"}
            assert set(meta["truth"]) == (
                {"scene", "clean", "noise", "terse"}
                if split == "web"
                else {"scene", "clean", "noise"}
            )
            assert sample.image.size == (SMALL.image_size, SMALL.image_size)
            if split != "web":
                assert len({c["text"] for c in sample.captions}) == per_image
                assert meta["truth"]["clean"] and all(
                    caption_is_true(c["text"], meta["truth"]["scene"]) for c in sample.captions
                )
            keys.add(sample.key)
        rows = pd.concat([pd.read_parquet(u.replace(".tar", ".parquet")) for u in urls])
        assert len(rows) == n and set(rows["status"]) == {"kept"} and set(rows["split"]) == {split}
    assert len(keys) == SMALL.n_human + SMALL.n_web + SMALL.n_test


def test_web_noise_matches_its_label(world):
    samples = _samples(world / "web")
    kinds = Counter()
    n_terse = 0
    rows = pd.concat(
        [pd.read_parquet(p) for p in sorted((world / "web").glob("*.parquet"))]
    ).set_index("uid")
    for sample in samples:
        truth = sample.meta["truth"]
        kinds[truth["noise"]] += 1
        assert truth["clean"] == (truth["noise"] == "none")
        assert caption_is_true(sample.text, truth["scene"]) == truth["clean"], (sample.text, truth)
        assert rows.loc[sample.key, "noise"] == truth["noise"]
        if truth["terse"]:  # a terse text may be right or wrong, never generic junk
            assert truth["noise"] != "generic"
            mentions = parse_caption(sample.text).mentions
            assert all(m.size is m.position is None for m in mentions), sample.text
            n_terse += 1
        # the image is exactly the stored scene, re-rendered
        assert (
            encode_jpeg(
                render_scene(Scene.from_dict(truth["scene"]), SMALL.image_size), SMALL.jpeg_quality
            )
            == sample.image_bytes
        )
    n = len(samples)
    noisy = n - kinds["none"]
    assert abs(noisy / n - SMALL.noise_rate) < 0.08
    for kind, weight in SMALL.noise_mix.items():
        assert abs(kinds[kind] / noisy - weight / sum(SMALL.noise_mix.values())) < 0.1, kinds
    assert abs(n_terse / (n - kinds["generic"]) - SMALL.web_terse_rate) < 0.1, (n_terse, kinds)
    summary = json.loads((world / "synth.json").read_text())["summary"]
    assert summary["splits"]["web"]["noise"] == dict(sorted(kinds.items()))
    assert summary["splits"]["web"]["terse"] == n_terse


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    again = tmp_path / "again"
    write_synth(again, SMALL)
    assert _files(again) == _files(world)
    other = tmp_path / "other"
    write_synth(other, dataclasses.replace(SMALL, seed=SMALL.seed + 1, n_web=128))
    for split in ("human", "test"):
        assert (other / split / "00000000.tar").read_bytes() != (
            world / split / "00000000.tar"
        ).read_bytes()


def test_resume_rewrites_missing_shards_identically(world, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(world, out)
    (out / "web" / "00000002.tar").unlink()
    (out / "web" / "00000002_stats.json").unlink()
    (out / "human" / "00000000_stats.json").unlink()  # the done-marker alone decides
    (out / "web" / "00000004.tar").write_bytes(b"truncated")  # a done shard is not reread
    write_synth(out, SMALL)
    (out / "web" / "00000004.tar").write_bytes((world / "web" / "00000004.tar").read_bytes())
    assert _files(out) == _files(world)


def test_config_change_regenerates_and_drops_stale_shards(world, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(world, out)
    smaller = dataclasses.replace(SMALL, n_web=200, noise_rate=0.2)
    summary = write_synth(out, smaller)
    assert summary["splits"]["web"]["count"] == 200
    assert len(expand_shards(str(out / "web"))) == 2
    assert (out / "web" / "00000000.tar").read_bytes() != (
        world / "web" / "00000000.tar"
    ).read_bytes()
    assert json.loads((out / "web" / "sizes.json").read_text()) == {
        "00000000.tar": 128,
        "00000001.tar": 72,
    }
    assert json.loads((out / "synth.json").read_text())["config"]["n_web"] == 200


def test_invalid_config_is_refused(tmp_path):
    with pytest.raises(ConfigError):
        write_synth(tmp_path, dataclasses.replace(SMALL, max_objects=3))
    with pytest.raises(ConfigError, match="web_terse_rate"):
        write_synth(tmp_path, dataclasses.replace(SMALL, web_terse_rate=1.5))
