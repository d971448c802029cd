"""One bad sample costs only itself: it is skipped with a reason, gets its parquet row, and the
shard and the job complete (reader, caption and filter)."""

from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np
import pandas as pd
from PIL import Image

from capfilt.config import load_recipe
from capfilt.data.reader import SkipCounter, decode_image, member_key, read_samples
from capfilt.data.shards import expand_shards
from capfilt.data.writer import parquet_path
from capfilt.pipeline.caption import caption_shards
from capfilt.pipeline.filter import filter_shards

from .conftest import good_members, huge_png, jpeg, make_tar


def _hostile_shard(path):
    """Good samples g0..g2 around: a member in a folder, a climbing path, g0 again further on,
    a caption whose text is a number."""
    g = good_members(3)
    return make_tar(
        path,
        [
            *g[0:2],
            ("images/x.jpg", jpeg((0, 0, 200))),
            ("images/x.txt", b"a blue square"),
            ("../../evil.jpg", jpeg()),
            ("../../evil.txt", b"evil"),
            *g[2:4],
            *g[0:2],  # key g0 seen twice, apart
            ("num.jpg", jpeg()),
            ("num.json", json.dumps({"captions": [{"text": 5, "origin": "web"}]}).encode()),
            *g[4:6],
        ],
    )


def test_member_keys_are_normalised_or_rejected():
    assert member_key("images/x.jpg") == ("images_x", "jpg", None)
    assert member_key("./v1.0/a.b.jpg") == ("v1-0_a", "b.jpg", None)
    assert member_key("../../evil.jpg")[2] == "unsafe_path"
    assert member_key("/etc/x.jpg")[2] == "unsafe_path"


def test_hostile_members_cost_only_themselves_in_caption_and_filter(tiny_models, tmp_path):
    _hostile_shard(tmp_path / "in" / "00000000.tar")
    counter = SkipCounter()
    keys = [s.key for s in read_samples(expand_shards(str(tmp_path / "in")), counter)]
    assert keys == ["g0", "images_x", "g1", "g2"]
    assert counter.as_dict() == {"bad_caption": 1, "duplicate_key": 1, "unsafe_path": 1}

    caption_cfg = load_recipe("tiny", ["caption.batch_size=2"]).caption
    result = caption_shards(
        tiny_models["captioner"], [str(tmp_path / "in")], tmp_path / "cap", caption_cfg
    )
    assert not result.failed and result.stats["count"] == 4 and result.stats["input_count"] == 7
    table = pd.read_parquet(parquet_path(tmp_path / "cap", 0))
    assert list(table["status"]).count("kept") == 4
    skipped = table[table["status"] == "skipped"].set_index("reason")["uid"].to_dict()
    assert skipped == {"unsafe_path": "../../evil", "duplicate_key": "g0", "bad_caption": "num"}
    out_keys = [s.key for s in read_samples(expand_shards(str(tmp_path / "cap")))]
    assert out_keys == ["g0", "images_x", "g1", "g2"]

    # the filter straight on the hostile shard: the same rows, its summary counts only real texts
    filter_cfg = load_recipe("tiny", ["filter.batch_size=2"]).filter
    result = filter_shards(
        tiny_models["filter"], [str(tmp_path / "in")], tmp_path / "filt", filter_cfg
    )
    assert not result.failed and result.stats["input_count"] == 7
    assert result.stats["skipped"] == {"bad_caption": 1, "duplicate_key": 1, "unsafe_path": 1}
    table = pd.read_parquet(parquet_path(tmp_path / "filt", 0))
    assert sorted(table.loc[table["status"] == "skipped", "reason"]) == [
        "bad_caption",
        "duplicate_key",
        "unsafe_path",
    ]
    summary = json.loads((tmp_path / "filt" / "summary.json").read_text())
    assert summary["images"] == 4 and summary["texts"] == 4


def test_huge_image_is_rejected_from_its_header(tmp_path):
    shard = make_tar(
        tmp_path / "s.tar", [("big.png", huge_png()), ("big.txt", b"big"), *good_members(1)]
    )
    counter = SkipCounter()
    start = time.monotonic()
    samples = list(read_samples([str(shard)], counter))
    assert time.monotonic() - start < 5  # not decoded: 400 M pixels would take seconds
    assert [s.key for s in samples] == ["g0"]
    assert counter.as_dict() == {"image_too_large": 1}
    assert "pixels" in counter.records[0].detail


def test_large_photo_is_shrunk_per_sample_to_what_the_model_needs():
    data = jpeg(size=1000)
    full = decode_image(data)
    small = decode_image(data, min_side=32)
    assert full.size == (1000, 1000)
    assert 64 <= min(small.size) < 128  # still twice the model's side: the resize scales down
    assert np.abs(np.asarray(small, dtype=int).mean(axis=(0, 1)) - (200, 30, 30)).max() < 4


def test_large_palette_1bit_and_16bit_images_are_shrunk_too():
    """``Image.reduce`` refuses these modes: a stage dropped every large GIF as undecodable."""
    rgb = Image.new("RGB", (1024, 768), (0, 160, 40))
    images = {
        "palette GIF": (rgb.convert("P"), "GIF"),
        "palette PNG": (rgb.convert("P"), "PNG"),
        "1-bit PNG": (rgb.convert("1"), "PNG"),
        "16-bit PNG": (Image.fromarray(np.full((768, 1024), 40000, dtype=np.uint16)), "PNG"),
    }
    for name, (image, fmt) in images.items():
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        small = decode_image(buf.getvalue(), min_side=128)
        full = decode_image(buf.getvalue())
        assert small.mode == "RGB" and 256 <= min(small.size) < 512, name
        mean = np.asarray(full, dtype=float).mean(axis=(0, 1))
        assert np.abs(np.asarray(small, dtype=float).mean(axis=(0, 1)) - mean).max() < 2, name


def test_16bit_png_is_scaled_not_clipped_to_white():
    grey16 = np.full((8, 8), 128 * 257, dtype=np.uint16)  # mid grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    image = decode_image(buf.getvalue())
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (128, 128, 128)


def test_gif_bmp_tiff_are_read_with_their_bytes_kept(tmp_path):
    members = []
    for fmt, ext in (("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tiff")):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (0, 200, 0)).save(buf, format=fmt)
        members += [(f"{ext}.{ext}", buf.getvalue()), (f"{ext}.txt", b"a green square")]
    shard = make_tar(tmp_path / "s.tar", members)
    counter = SkipCounter()
    samples = list(read_samples([str(shard)], counter))
    assert counter.total == 0
    assert [(s.key, s.image_ext) for s in samples] == [
        ("gif", "gif"),
        ("bmp", "bmp"),
        ("tiff", "tiff"),
    ]
    with tarfile.open(shard) as tar:
        for sample in samples:
            member = tar.extractfile(f"{sample.key}.{sample.image_ext}")
            assert sample.image_bytes == member.read()
    assert all(s.image.getpixel((8, 8))[1] > 150 for s in samples)


def test_a_tar_in_directory_order_gives_every_sample_with_its_caption(tmp_path, caplog):
    """``tar cf s.tar images/`` writes a folder's files in directory order: a sample's image and
    caption apart. A local tar is read grouped by key; a stream (which cannot seek back) keeps
    the first of each key and says the tar is not grouped."""
    members = {}
    for i in range(6):
        members[f"images/img{i}.jpg"] = jpeg((40 * i, 90, 40))
        members[f"images/img{i}.txt"] = f"caption {i}\n".encode()  # echo's newline
    # every image first, in no particular order, then every caption
    scrambled = [f"images/img{i}.jpg" for i in (5, 3, 1, 4, 0, 2)]
    scrambled += [f"images/img{i}.txt" for i in range(6)]
    unsorted = make_tar(tmp_path / "unsorted.tar", [(n, members[n]) for n in scrambled])
    ordered = make_tar(tmp_path / "sorted.tar", [(n, members[n]) for n in sorted(members)])

    def read(url):
        counter = SkipCounter()
        got = {s.key: (s.captions, s.image_bytes) for s in read_samples([url], counter)}
        return got, counter.as_dict()

    got, skipped = read(str(unsorted))
    expected, _ = read(str(ordered))
    assert skipped == {} and len(got) == 6 and got == expected
    # the newline is no part of the caption
    assert got["images_img3"][0] == [{"text": "caption 3", "origin": "web"}]
    # read as a stream: what cannot be grouped is counted and the tar named
    got, skipped = read(f"pipe:cat {unsorted}")
    assert len(got) < 6 and skipped.get("duplicate_key")
    assert "must hold each sample's members together" in caplog.text


def test_captions_other_tools_write_to_the_json_are_read(tmp_path):
    """A json ``caption``/``text`` without a txt, and ``captions`` as plain strings, are the
    sample's web texts; a json with neither is skipped, its keys named."""
    shard = make_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", jpeg()),
            ("a.json", json.dumps({"caption": "a red square", "url": "http://x"}).encode()),
            ("b.jpg", jpeg()),
            ("b.json", json.dumps({"captions": ["one", "two", " "]}).encode()),
            ("c.jpg", jpeg()),
            ("c.json", json.dumps({"alt": "a photo", "status": "success"}).encode()),
        ],
    )
    counter = SkipCounter()
    samples = {s.key: s for s in read_samples([str(shard)], counter)}
    assert samples["a"].text == "a red square"
    assert samples["a"].captions == [{"text": "a red square", "origin": "web"}]
    assert samples["b"].text == "one"
    assert [c["text"] for c in samples["b"].captions] == ["one", "two"]
    assert counter.as_dict() == {"missing_caption": 1} and "c" not in samples
    assert "json keys: alt, status" in counter.records[0].detail


def test_a_missing_image_names_the_members_it_found(tmp_path):
    """A phone's ``IMG_2023.05.04.jpg``: webdataset's key ends at the first dot, so the image's
    extension is ``05.04.jpg``; the skip says what it found."""
    shard = make_tar(
        tmp_path / "s.tar", [("IMG_2023.05.04.jpg", jpeg()), ("IMG_2023.05.04.txt", b"a cat")]
    )
    counter = SkipCounter()
    assert list(read_samples([str(shard)], counter)) == []
    (record,) = counter.records
    assert record.reason == "missing_image"
    assert "members IMG_2023.05.04.jpg, IMG_2023.05.04.txt" in record.detail
    assert "first dot" in record.detail


def test_keys_that_meet_once_folders_are_joined_are_duplicates_not_merged(tmp_path):
    """``a/b.jpg`` and ``a_b.jpg`` share key ``a_b``: the first sample is kept whole, the second
    counted as a duplicate (its files replaced the first one's)."""
    shard = make_tar(
        tmp_path / "s.tar",
        [
            ("a/b.jpg", jpeg((200, 0, 0))),
            ("a/b.txt", b"the first"),
            ("a_b.jpg", jpeg((0, 0, 200))),
            ("a_b.txt", b"the second"),
            *good_members(1),
        ],
    )
    counter = SkipCounter()
    samples = list(read_samples([str(shard)], counter))
    assert [(s.key, s.text) for s in samples] == [("a_b", "the first"), ("g0", "a red square")]
    assert counter.as_dict() == {"duplicate_key": 1}
    # loader workers that read only some samples agree on where each sample starts
    from capfilt.data.reader import iter_tar_samples

    keys = [r["__key__"] for r in iter_tar_samples(str(shard), read=lambda p: p == 1)]
    assert keys == ["a_b", "a_b", "g0"]
