"""Damage to whole tars: a tar cut inside a header or without its end block is reported as
``truncated_tar`` naming the file, an unreadable tar as one ``unreadable_shard``, an empty or
all-bad input fails with a message naming the files; a done-marker covers its input's content."""

from __future__ import annotations

import logging
import os
import tarfile

import pytest

from capfilt.config import load_recipe
from capfilt.data.reader import SkipCounter, read_samples
from capfilt.data.shards import expand_shards
from capfilt.data.stage import StageError
from capfilt.pipeline.caption import caption_shards

from .conftest import cli, good_members, make_tar


def _caption(models, shards, out):
    return caption_shards(
        models["captioner"], shards, out, load_recipe("tiny", ["caption.batch_size=4"]).caption
    )


def _header_offset(path, name):
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset


@pytest.mark.parametrize("cut_inside", [True, False], ids=["inside-header", "at-header"])
def test_tar_cut_at_a_header_is_truncated_not_quietly_short(tmp_path, caplog, cut_inside):
    full = make_tar(tmp_path / "full.tar", good_members(6))
    offset = _header_offset(full, "g4.jpg")  # samples g0..g3 lie wholly before the cut
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: offset + (100 if cut_inside else 0)])
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        keys = [s.key for s in read_samples([str(cut)], counter)]
    assert keys == ["g0", "g1", "g2", "g3"]
    assert counter.shard_events == {"truncated_tar": 1} and counter.total == 0
    assert any("truncated_tar" in r.message and str(cut) in r.message for r in caplog.records)
    # the intact tar ends with its end-of-archive block: no event
    intact = SkipCounter()
    assert len(list(read_samples([str(full)], intact))) == 6 and not intact.shard_events


def test_unreadable_shard_counts_as_one_shard_not_a_sample(tiny_models, tmp_path):
    make_tar(tmp_path / "in" / "00000000.tar", good_members(3))
    (tmp_path / "in" / "00000001.tar").write_bytes(os.urandom(3000))
    result = _caption(tiny_models, [str(tmp_path / "in")], tmp_path / "out")
    assert not result.failed and result.stats["count"] == result.stats["input_count"] == 3
    assert result.stats["skipped"] == {} and result.stats["shard_errors"] == {"unreadable_shard": 1}


def test_all_bad_input_names_the_files_and_the_first_rejected_sample(tiny_models, tmp_path):
    shard = make_tar(tmp_path / "bad.tar", [("a.jpg", b"not a jpeg"), ("a.txt", b"x")] * 1)
    with pytest.raises(StageError) as err:
        _caption(tiny_models, [str(shard)], tmp_path / "out")
    message = str(err.value)
    assert "every input sample was rejected (undecodable_image: 1)" in message
    assert str(shard) in message and "first: a: undecodable_image" in message


def test_empty_tar_exits_1_with_a_message_not_a_traceback(tiny_models, tmp_path):
    empty = make_tar(tmp_path / "empty.tar", [])
    run = cli(
        "filter", "tiny", "--model", str(tiny_models["filter"]), "--shards", str(empty),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    stderr = " ".join(run.stderr.split())  # the console wraps long lines
    assert "holds no samples" in stderr and "empty.tar" in stderr
    assert "Traceback" not in run.stderr


def test_replaced_input_reruns_its_shard(tiny_models, tmp_path):
    shard = make_tar(tmp_path / "in" / "00000000.tar", good_members(2, prefix="old"))
    first = _caption(tiny_models, [str(tmp_path / "in")], tmp_path / "out")
    assert first.done == [0]
    again = _caption(tiny_models, [str(tmp_path / "in")], tmp_path / "out")
    assert again.skipped_existing == [0] and again.done == []  # unchanged input: resumed
    make_tar(shard, good_members(3, prefix="new"))  # same path, new content
    third = _caption(tiny_models, [str(tmp_path / "in")], tmp_path / "out")
    assert third.done == [0]
    keys = [s.key for s in read_samples(expand_shards(str(tmp_path / "out")))]
    assert keys == ["new0", "new1", "new2"]
