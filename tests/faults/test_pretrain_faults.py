"""Pretrain on bad sources: fails fast with the source named (never hangs), before its run folder
exists; the stream itself gives up on a hopeless source; skip counts land in the run folder."""

from __future__ import annotations

import json
import signal

import pytest

from capfilt.config import load_recipe
from capfilt.data.stage import StageError
from capfilt.data.transforms import TrainTransform
from capfilt.train.data import TrainStream, build_sources
from capfilt.train.trainer import SKIPPED_FILE, TrainJob, train

from .conftest import cli, good_members, make_tar


def _undecodable(path, n=6):
    return make_tar(
        path, [m for i in range(n) for m in ((f"b{i}.jpg", b"junk"), (f"b{i}.txt", b"a cat"))]
    )


@pytest.mark.parametrize("bad", ["undecodable", "empty"])
def test_pretrain_on_a_source_without_usable_samples_exits_1_before_its_run_folder(tmp_path, bad):
    make_tar(tmp_path / "good" / "00000000.tar", good_members(8))
    if bad == "undecodable":
        _undecodable(tmp_path / "bad" / "00000000.tar")
    else:
        make_tar(tmp_path / "bad" / "00000000.tar", [])
    run = cli(
        "pretrain", "tiny", "--shards", str(tmp_path / "good"), "--shards", str(tmp_path / "bad"),
        "--out", str(tmp_path / "run"), "--set", "train.samples_per_epoch=16", timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    stderr = " ".join(run.stderr.split())  # the console wraps long lines
    assert f"shard source {tmp_path / 'bad'} has no usable sample" in stderr
    assert ("undecodable_image: 6" if bad == "undecodable" else "no samples") in stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "run").exists()  # the fixed command is not refused as an existing run


def test_a_mistyped_init_or_an_unknown_epoch_size_exits_2_before_the_run_folder(tmp_path):
    """The folder would hold the typo's config: the corrected command would be refused as
    another run ("already holds a run", then "a different stage or recipe")."""
    make_tar(tmp_path / "human" / "00000000.tar", good_members(8))
    run = cli(
        "finetune", "captioner", "tiny", "--init", str(tmp_path / "runs" / "pre"),
        "--shards", str(tmp_path / "human"), "--out", str(tmp_path / "cap"), timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert f"no capfilt model at {tmp_path / 'runs' / 'pre'}" in " ".join(run.stderr.split())
    assert not (tmp_path / "cap").exists()
    # the same for an epoch size it cannot know (a remote shard without sizes.json)
    remote = f"pipe:cat {tmp_path / 'human' / '00000000.tar'}"
    run = cli(
        "pretrain", "tiny", "--shards", remote, "--out", str(tmp_path / "pre"), timeout=120,
    )  # fmt: skip
    said = " ".join(run.stderr.split())
    assert run.returncode == 2 and "train.samples_per_epoch: the size of a remote" in said
    assert not (tmp_path / "pre").exists()


def test_stream_gives_up_on_a_hopeless_source_instead_of_hanging(tmp_path):
    make_tar(tmp_path / "good.tar", good_members(4))
    _undecodable(tmp_path / "bad.tar")
    sources = build_sources([str(tmp_path / "good.tar"), str(tmp_path / "bad.tar")], [1.0, 1.0])
    stream = TrainStream(
        sources, TrainTransform(32), batch_size=4, seed=0, epoch=0, shuffle_buffer=4
    )

    def hang(*_):
        raise TimeoutError("the stream hangs")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        with pytest.raises(StageError, match=f"shard source {tmp_path / 'bad.tar'}"):
            for _ in stream:
                pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_skip_counts_are_saved_in_the_run_folder(tmp_path):
    make_tar(
        tmp_path / "data" / "00000000.tar",
        [*good_members(7), ("b.jpg", b"junk"), ("b.txt", b"a cat")],
    )
    recipe = load_recipe(
        "tiny", ["train.samples_per_epoch=16", "train.epochs=1", "data.batch_size=8"]
    )
    train(TrainJob("pretrain", recipe, [str(tmp_path / "data")], tmp_path / "run"))
    skipped = json.loads((tmp_path / "run" / SKIPPED_FILE).read_text())
    assert skipped.get("undecodable_image", 0) >= 1 and set(skipped) == {"undecodable_image"}


def test_training_reads_a_remote_source_it_stops_early_without_false_damage(
    tmp_path, caplog, monkeypatch
):
    """Training stops reading a stream before its end (the source check takes one sample), so
    curl exits 23 and a pipe 141: no failure, no ``truncated_tar`` and no generator noise. A
    transfer that does fail mid-shard is counted with its cause, and training goes on."""
    import gc
    import logging
    import os
    import sys

    from capfilt.data.reader import SkipCounter, iter_tar_samples
    from capfilt.train.data import check_sources

    # members past the pipe's buffer, so the command is still writing when the reader stops
    members = good_members(4) + [(f"pad{i}.bin", os.urandom(1 << 16)) for i in range(8)]
    tar = make_tar(tmp_path / "big.tar", members)
    early = f"pipe:cat {tar} || exit 23"  # curl's exit status when its output is closed
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with caplog.at_level(logging.WARNING):
        check_sources(build_sources([early], [1.0]))
        gc.collect()
    assert not [r for r in caplog.records if "truncated_tar" in r.message], caplog.text
    assert not unraisable, [u.exc_value for u in unraisable]
    # a shard whose transfer breaks off: its samples before the break, counted with the cause
    whole = [s["__key__"] for s in iter_tar_samples(str(tar))]
    broken = f"pipe:head -c {tar.stat().st_size // 2} {tar}; exit 7"
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING):
        keys = [s["__key__"] for s in iter_tar_samples(broken, counter, fetch_errors_fail=False)]
    assert keys and keys == whole[: len(keys)] and len(keys) < len(whole)
    assert counter.shard_events == {"fetch_failed": 1} and "exit 7" in caplog.text
