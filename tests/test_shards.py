"""Shard writer/reader: atomic output, done-markers, brace/folder specs, bad samples skipped and counted."""

from __future__ import annotations

import errno
import io
import json
import tarfile
import threading
import time

import pandas as pd
import pytest
from PIL import Image

from capfilt.data.reader import SkipCounter, iter_tar_samples, read_caption_texts, read_samples
from capfilt.data.sample import build_sample, caption_entry, make_key, output_sample
from capfilt.data.shards import ShardSpecError, count_samples, expand_shards
from capfilt.data.stage import StageError, run_shard_stage
from capfilt.data.text import clean_caption
from capfilt.data.writer import (
    ShardWriter,
    _header,
    _tarinfo,
    encode_field,
    is_shard_done,
    parquet_path,
    stats_path,
    tar_path,
)


def _jpeg(color=(200, 30, 30), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_shard(out, index, n, chash="h"):
    with ShardWriter(out, index, stage="test", config_hash=chash) as writer:
        for i in range(n):
            key = make_key("s", index, i)
            writer.write(
                build_sample(
                    key, _jpeg((i * 10 % 255, 0, 0)), [caption_entry(f"caption {index} {i}", "web")]
                )
            )
            writer.record({"uid": key, "status": "kept", "reason": ""})
        return writer.commit()


def test_writer_outputs_and_read_back(tmp_path):
    stats = _write_shard(tmp_path, 0, 5)
    assert stats["count"] == 5 and stats["input_count"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000000.parquet",
        "00000000.tar",
        "00000000_stats.json",
    ]
    table = pd.read_parquet(tmp_path / "00000000.parquet")
    assert list(table["uid"]) == [make_key("s", 0, i) for i in range(5)]
    samples = list(read_samples(expand_shards(str(tmp_path))))
    assert [s.text for s in samples] == [f"caption 0 {i}" for i in range(5)]
    assert samples[0].captions == [{"text": "caption 0 0", "origin": "web"}]
    assert samples[0].image.size == (16, 16) and samples[0].image_ext == "jpg"
    assert is_shard_done(tmp_path, 0, "h") and not is_shard_done(tmp_path, 0, "other")


def test_shard_paths_and_merged_skip_counts(tmp_path):
    assert [
        p.name for p in (tar_path(tmp_path, 7), parquet_path(tmp_path, 7), stats_path(tmp_path, 7))
    ] == [
        "00000007.tar",
        "00000007.parquet",
        "00000007_stats.json",
    ]
    assert tar_path(tmp_path, 2, prefix="web-").name == "web-00000002.tar"
    with ShardWriter(tmp_path, 7, stage="test", config_hash="h") as writer:
        writer.skip("missing_caption")
        counter = SkipCounter()
        counter.skip("missing_caption")
        counter.skip("undecodable_image")
        writer.add_skipped(counter.counts)
        stats = writer.commit()
    assert (writer.tar_path, writer.parquet_path, writer.stats_path) == (
        tar_path(tmp_path, 7),
        parquet_path(tmp_path, 7),
        stats_path(tmp_path, 7),
    )
    assert (
        stats["skipped"] == {"missing_caption": 2, "undecodable_image": 1}
        and stats["input_count"] == 3
    )


def test_output_sample_passes_input_fields_through(tmp_path):
    with ShardWriter(tmp_path, 0, stage="test", config_hash="h") as writer:
        sample = build_sample(
            "k", _jpeg(), [caption_entry("web text", "web")], source="s", truth={"clean": True}
        )
        writer.write({**sample, "cls": b"3"})
        writer.commit()
    (sample_in,) = read_samples([str(tar_path(tmp_path, 0))])
    captions = [*sample_in.captions, caption_entry("a synthetic one", "synthetic")]
    out = output_sample(sample_in, captions, "a synthetic one", filter={"threshold": 0.5})
    assert out["__key__"] == "k" and out["jpg"] == sample_in.image_bytes and out["cls"] == b"3"
    assert out["txt"] == "a synthetic one"
    assert out["json"] == {
        "uid": "k",
        "source": "s",
        "truth": {"clean": True},
        "captions": captions,
        "filter": {"threshold": 0.5},
    }
    # the input sample is not changed
    assert sample_in.meta["captions"] == [caption_entry("web text", "web")]


def test_aborted_writer_leaves_nothing_visible(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 3, stage="test", config_hash="h") as writer:
            writer.write(build_sample("a", _jpeg(), [caption_entry("x", "web")]))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_dotted_and_duplicate_keys(tmp_path):
    with ShardWriter(tmp_path, 0, stage="test", config_hash="h") as writer:
        with pytest.raises(ValueError, match="no '.'"):
            writer.write({"__key__": "a.b", "txt": "x"})
        writer.write({"__key__": "a", "txt": "x"})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write({"__key__": "a", "txt": "y"})


def test_same_samples_give_byte_identical_tars(tmp_path):
    _write_shard(tmp_path / "a", 0, 4)
    _write_shard(tmp_path / "b", 0, 4)
    for name in ("00000000.tar", "00000000.parquet", "00000000_stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("n_samples", [0, 3])
def test_the_writer_writes_the_bytes_tarfile_writes(tmp_path, n_samples):
    # members written by hand: the same bytes as TarFile.addfile / close in GNU format, for
    # data of every padding (0, 512, odd sizes), a name too long for one header, non-ASCII
    samples = [
        {
            "__key__": f"s{i}" + ("x" * 120 if i == 1 else "é"),
            "jpg": bytes(range(256)) * (2 * i + 1),
            "txt": "" if i == 2 else "a caption",
            "json": {"i": i},
            "bin": b"\0" * 512 * i,
        }
        for i in range(n_samples)
    ]
    with ShardWriter(tmp_path, 0, stage="test", config_hash="h") as writer:
        for sample in samples:
            writer.write(sample)
        writer.commit()
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = encode_field(sample[ext])
                tar.addfile(_tarinfo(f"{sample['__key__']}.{ext}", len(data)), io.BytesIO(data))
    assert tar_path(tmp_path, 0).read_bytes() == expected.getvalue()
    read_back = list(iter_tar_samples(str(tar_path(tmp_path, 0))))
    assert [r["__key__"] for r in read_back] == [s["__key__"] for s in samples]
    assert [r["bin"] for r in read_back] == [s["bin"] for s in samples]


@pytest.mark.parametrize("name", ["a.jpg", "é" * 50, "x" * 100, "x" * 101, "é" * 51])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 8**11 - 1, 8**11, 2**40])
def test_a_member_header_is_tarfiles_own(name, size):
    # names at the 100-byte limit (two-byte characters crossing it), sizes at the last one that
    # octal digits hold and beyond it (base-256): byte for byte what TarInfo.tobuf writes
    expected = _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
    assert _header(name, size) == expected


def test_shard_specs(tmp_path):
    for i in range(3):
        _write_shard(tmp_path, i, 2)
    folder = expand_shards(str(tmp_path))
    braces = expand_shards(str(tmp_path / "{00000000..00000002}.tar"))
    assert folder == braces and len(folder) == 3
    assert expand_shards([str(tmp_path / "00000001.tar"), str(tmp_path)])[0].endswith(
        "00000001.tar"
    )
    assert len(expand_shards([str(tmp_path / "0000000[01].tar")])) == 2
    with pytest.raises(ShardSpecError):
        expand_shards(str(tmp_path / "{00000000..00000005}.tar"))
    with pytest.raises(ShardSpecError):
        expand_shards(str(tmp_path / "empty_dir_missing"))
    # webdataset has no s3 opener: said before any work, with the command that reads them
    with pytest.raises(ShardSpecError, match="pipe:aws s3 cp s3://b/x.tar -"):
        expand_shards("s3://b/x.tar")
    assert expand_shards("pipe:cat {a,b}.tar") == ["pipe:cat a.tar", "pipe:cat b.tar"]
    # `**` spans folders; a folder's compressed tars are shards too
    nested = tmp_path / "nested"
    (nested / "b" / "c").mkdir(parents=True)
    (nested / "a").mkdir()
    for where in (nested / "a" / "0.tar", nested / "b" / "c" / "0.tar", nested / "d.tar.gz"):
        where.write_bytes(b"")
    assert expand_shards(str(nested / "**" / "*.tar")) == [
        str(nested / "a" / "0.tar"),
        str(nested / "b" / "c" / "0.tar"),
    ]
    assert expand_shards(str(nested)) == [str(nested / "d.tar.gz")]


def test_a_list_file_names_shards_one_spec_a_line(tmp_path, monkeypatch):
    """``--shards urls.txt`` (or ``@list``) reads the shards it lists; it was read as a tar."""
    monkeypatch.chdir(tmp_path)  # relative lines are read from the current folder
    for i in range(3):
        _write_shard(tmp_path, i, 2)
    listed = tmp_path / "urls.txt"
    listed.write_text(
        "# web shards\nhttp://h/{a,b}.tar\n\n  00000002.tar  \n"
        + str(tmp_path / "0000000[01].tar\n")
    )
    want = ["http://h/a.tar", "http://h/b.tar", "00000002.tar"]
    want += [str(tmp_path / f"0000000{i}.tar") for i in range(2)]
    assert expand_shards("urls.txt") == want
    (tmp_path / "shards.list").write_text(listed.read_text())
    assert expand_shards(["@shards.list", "00000000.tar"]) == [*want, "00000000.tar"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "nested.txt").write_text("urls.txt\n")
    (tmp_path / "missing.txt").write_text("00000009.tar\n")
    for spec, said in (
        ("empty.txt", "names no shards"),
        ("nested.txt", "cannot name another list"),
        ("@nope.list", "shard list not found: nope.list"),
        ("nope.txt", "shard not found: nope.txt"),
        ("missing.txt", "shard not found: 00000009.tar"),
    ):
        with pytest.raises(ShardSpecError, match=said):
            expand_shards(spec)


def test_a_usage_error_met_in_a_shard_is_marked_as_this_ranks_own(tmp_path):
    """Under torchrun only the rank that produced the shard knows of it: the command line must
    not take it for a check every rank made alike (and leave it to rank 0 to say)."""
    from capfilt.config import ConfigError

    def produce(index, writer):
        raise ConfigError(f"scores of shard {index} do not match its captions")

    with pytest.raises(ConfigError) as caught:
        run_shard_stage(tmp_path, 2, produce, stage="t", config_hash="h")
    assert caught.value.rank_local


def test_stage_resumes_and_writes_sizes(tmp_path):
    calls = []

    def produce(index, writer):
        calls.append(index)
        for i in range(index + 1):
            writer.write(
                build_sample(make_key("k", index, i), _jpeg(), [caption_entry("t", "human")])
            )
        return None

    run_shard_stage(tmp_path, 3, produce, stage="t", config_hash="h1")
    assert calls == [0, 1, 2]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "00000000.tar": 1,
        "00000001.tar": 2,
        "00000002.tar": 3,
    }
    assert count_samples(expand_shards(str(tmp_path))) == 6
    first = (tmp_path / "00000001.tar").read_bytes()
    (tmp_path / "00000001_stats.json").unlink()  # as if killed before the done-marker
    calls.clear()
    run_shard_stage(tmp_path, 3, produce, stage="t", config_hash="h1")
    assert calls == [1]
    assert (tmp_path / "00000001.tar").read_bytes() == first
    calls.clear()
    run_shard_stage(
        tmp_path, 3, produce, stage="t", config_hash="h2"
    )  # new config: everything again
    assert calls == [0, 1, 2]


def test_stage_counts_failed_shards_as_partial(tmp_path):
    def produce(index, writer):
        if index == 1:
            raise OSError("disk hiccup")
        writer.write(build_sample(make_key("k", index), _jpeg(), [caption_entry("t", "human")]))

    result = run_shard_stage(tmp_path, 3, produce, stage="t", config_hash="h")
    assert result.partial and list(result.failed) == [1]
    assert result.done == [0, 2]


def _one_sample(index, writer):
    writer.write(build_sample(make_key("k", index), _jpeg(), [caption_entry("t", "human")]))


def test_a_shard_is_published_while_the_next_one_is_produced(tmp_path, monkeypatch):
    """Shard 0's commit (its fsyncs) runs while shard 1 is produced; with commits in line it would
    wait here for a produce that cannot start."""
    produced = {i: threading.Event() for i in range(3)}
    overlapped, commit = [], ShardWriter.commit

    def slow_commit(self, extra=None):
        if self.index + 1 in produced:
            overlapped.append(produced[self.index + 1].wait(timeout=10))
        return commit(self, extra)

    def produce(index, writer):
        produced[index].set()
        _one_sample(index, writer)

    monkeypatch.setattr(ShardWriter, "commit", slow_commit)
    result = run_shard_stage(tmp_path, 3, produce, stage="t", config_hash="h")
    assert overlapped == [True, True]
    assert result.done == [0, 1, 2] and not result.failed
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        f"0000000{i}.tar": 1 for i in range(3)
    }
    assert [p.name for p in tmp_path.glob(".*")] == []  # no temporaries left


def test_a_commit_that_fails_fails_its_shard_only(tmp_path, monkeypatch):
    commit = ShardWriter.commit

    def failing_commit(self, extra=None):
        if self.index == 1:
            raise OSError(errno.EIO, "I/O error")
        return commit(self, extra)

    monkeypatch.setattr(ShardWriter, "commit", failing_commit)
    result = run_shard_stage(tmp_path, 3, _one_sample, stage="t", config_hash="h")
    assert list(result.failed) == [1] and "I/O error" in result.failed[1]
    assert result.done == [0, 2]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000000.tar", "00000002.tar"]
    assert [p.name for p in tmp_path.glob(".*")] == []


def test_a_full_disk_at_a_commit_stops_the_stage_after_that_shard(tmp_path, monkeypatch):
    """The next shard is produced meanwhile, but never published, and leaves no temporary."""
    calls, commit = [], ShardWriter.commit

    def full_disk(self, extra=None):
        calls.append(self.index)
        if self.index == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return commit(self, extra)

    produced = []

    def produce(index, writer):
        produced.append(index)
        _one_sample(index, writer)

    monkeypatch.setattr(ShardWriter, "commit", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_shard_stage(tmp_path, 4, produce, stage="t", config_hash="h")
    assert calls == [0, 1] and produced == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000000.parquet",
        "00000000.tar",
        "00000000_stats.json",
    ]


def test_ctrl_c_lets_the_shard_in_flight_finish_publishing(tmp_path, monkeypatch):
    """Interrupted while producing shard 1, the stage first finishes publishing shard 0 (slowed
    here), so a re-run skips it; shard 1 leaves nothing behind."""
    commit = ShardWriter.commit

    def slow_commit(self, extra=None):
        time.sleep(0.5)
        return commit(self, extra)

    def produce(index, writer):
        _one_sample(index, writer)
        if index == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "commit", slow_commit)
    with pytest.raises(KeyboardInterrupt):
        run_shard_stage(tmp_path, 3, produce, stage="t", config_hash="h")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000000.parquet",
        "00000000.tar",
        "00000000_stats.json",
    ]
    assert is_shard_done(tmp_path, 0, "h")


def test_stage_with_only_bad_samples_fails_clearly(tmp_path):
    def produce(index, writer):
        writer.skip("undecodable_image", {"uid": "x"})

    with pytest.raises(StageError, match="every input sample was rejected"):
        run_shard_stage(tmp_path, 1, produce, stage="t", config_hash="h")


def test_reader_skips_and_counts_bad_samples(tmp_path):
    """A truncated tar, an undecodable jpg, a sample without caption and non-UTF-8 text are skipped; the rest are intact."""
    good = [(make_key("g", i), _jpeg((10 * i, 100, 50))) for i in range(6)]
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for key, jpg in good[:3]:
            add(f"{key}.jpg", jpg)
            add(f"{key}.txt", f"text of {key}".encode())
        add("broken.jpg", b"\xff\xd8 this is not a jpeg")
        add("broken.txt", b"a caption")
        add("nocap.jpg", _jpeg())
        add("nocap.json", json.dumps({"uid": "nocap"}).encode())
        add("latin.jpg", _jpeg())
        add("latin.txt", "caf\xe9".encode("latin-1"))
        for key, jpg in good[3:]:
            add(f"{key}.jpg", jpg)
            add(f"{key}.txt", f"text of {key}".encode())
    data = path.read_bytes()
    # Cut the tar inside the last good sample's jpg member (its data follows a 512-byte header).
    cut = data.index(f"{good[5][0]}.jpg".encode()) + 512 + 100
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:cut])
    counter = SkipCounter()
    samples = list(read_samples([str(truncated)], counter))
    assert [s.key for s in samples] == [k for k, _ in good[:5]]
    for sample, (key, jpg) in zip(samples, good):
        assert sample.image_bytes == jpg and sample.text == f"text of {key}"
    assert counter.as_dict() == {
        "missing_caption": 1,
        "non_utf8_text": 1,
        "undecodable_image": 1,
    }
    assert counter.shard_events == {"truncated_tar": 1}  # damage to the tar is not a sample


def test_caption_texts_without_decoding_images(tmp_path):
    """Tokenizer training reads every caption of a sample, else its txt; broken images do not matter."""
    with ShardWriter(tmp_path, 0, stage="test", config_hash="h") as writer:
        captions = [
            caption_entry("a red circle", "human"),
            caption_entry("a big red circle", "human"),
        ]
        writer.write(build_sample(make_key("a", 0), _jpeg(), captions))
        writer.write(
            build_sample(make_key("a", 1), b"not a jpeg", [caption_entry("a blue square", "web")])
        )
        writer.commit()
    texts = list(read_caption_texts(expand_shards(str(tmp_path))))
    assert texts == ["a red circle", "a big red circle", "a blue square"]
    expected = [c["text"] for s in read_samples(expand_shards(str(tmp_path))) for c in s.captions]
    assert texts[:2] == expected  # same texts as the decoding reader where the image decodes


def test_clean_caption_follows_blip():
    assert clean_caption("A Dog (brown) runs:  on the   GRASS!!") == "a dog brown runs on the grass"
    assert clean_caption("one two three four", max_words=2) == "one two"
    assert clean_caption('"Hi"; ~#*.') == "hi"


def test_shards_without_sizes_json_are_counted_from_their_headers(tmp_path, monkeypatch):
    """Another tool's shards (img2dataset's, a hand-made tar) have no sizes.json: training
    weighs its sources by samples, not by shard count, and knows its epoch size."""
    from capfilt.data import sample_counts
    from capfilt.data.sample_counts import sample_count
    from capfilt.train.data import build_sources
    from tests.faults.conftest import good_members, make_tar

    foreign = tmp_path / "foreign"
    for i, n in enumerate((5, 7, 3)):  # 15 samples in 3 tars, each member pair a sample
        make_tar(foreign / f"{i:05d}.tar", good_members(n, prefix=f"s{i}_"))
    count = sample_count(expand_shards(str(foreign)))
    assert count.samples == 15 and "counted in 3 tar(s)" in count.how
    # many tars: a few are read, the rest estimated from their mean
    monkeypatch.setattr(sample_counts, "SCAN_SHARDS", 2)
    count = sample_count(expand_shards(str(foreign)))
    assert count.samples == (5 + 7) // 2 * 3 and "estimated from 2 of them" in count.how
    monkeypatch.undo()
    # capfilt's own shards: sizes.json, nothing read
    own = tmp_path / "own"
    make_tar(own / "00000000.tar", good_members(2))
    (own / "sizes.json").write_text('{"00000000.tar": 40}')
    sources = build_sources([str(foreign), str(own)])
    assert [(s.weight, s.samples) for s in sources] == [(15.0, 15), (40.0, 40)]
    assert sample_count([f"pipe:cat {foreign / '00000.tar'}"]).samples is None
