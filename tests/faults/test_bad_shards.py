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


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_transfer_fails_its_shard_and_a_rerun_fetches_it_again(
    tiny_models, tmp_path, workers, caplog
):
    """A remote shard whose fetch breaks off (here a pipe that exits 7 halfway, as curl does on a
    dropped connection) is not the tar's damage: no output and no done-marker for it (the stage
    is partial, exit 3), so the run once the source is back makes it whole. A tar that came
    whole but is itself cut (the command exits 0) stays damage, kept as a local tar's is."""
    full = make_tar(tmp_path / "in" / "00000000.tar", good_members(6))
    half = full.stat().st_size // 2
    flag = tmp_path / "broken"
    flag.touch()
    # fails while the flag exists; then streams the whole tar
    fetch = f"pipe:if [ -e {flag} ]; then head -c {half} {full}; exit 7; else cat {full}; fi"
    good = make_tar(tmp_path / "in" / "00000001.tar", good_members(2, prefix="h"))
    recipe = load_recipe("tiny", ["caption.batch_size=4", f"caption.num_workers={workers}"])

    def run():
        return caption_shards(
            tiny_models["captioner"], [fetch, str(good)], tmp_path / "out", recipe.caption
        )

    with caplog.at_level(logging.ERROR):
        first = run()
    assert first.partial and list(first.failed) == [0] and first.done == [1]
    assert "its transfer failed" in first.failed[0] and "exit 7" in first.failed[0]
    assert not list((tmp_path / "out").glob("00000000*"))
    flag.unlink()  # the source is back
    second = run()
    assert second.done == [0] and second.skipped_existing == [1] and not second.failed
    keys = [s.key for s in read_samples([str(tmp_path / "out" / "00000000.tar")])]
    assert keys == [f"g{i}" for i in range(6)]
    # whole transfer, cut tar: the tar's damage, kept with the samples before it
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[:half])
    third = caption_shards(
        tiny_models["captioner"], [f"pipe:cat {cut}"], tmp_path / "out2", recipe.caption
    )
    assert not third.failed and third.stats["shard_errors"] == {"truncated_tar": 1}
