"""ShardImages (capfilt/data/loader.py): batches read by one set of workers across shards come out
exactly as an in-process read gives them, whatever the worker count, with a shard abandoned
halfway skipped over."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from capfilt.data.loader import ShardImages, ShardReadError
from capfilt.data.reader import SkipCounter, iter_tar_samples
from capfilt.data.transforms import EvalTransform
from tests.conftest import subprocess_env
from tests.faults.conftest import good_members, make_tar

TRANSFORM = EvalTransform(16)
SIZES = [7, 0, 5, 9]  # an empty shard, and counts that no worker count divides evenly


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("loader")
    out = []
    for index, n in enumerate(SIZES):
        members = good_members(n, prefix=f"s{index}_")
        if n == 7:  # an undecodable image in the middle: a skip record at its position
            members[6] = (members[6][0], b"not a jpeg")
        out.append(str(make_tar(root / f"{index:08d}.tar", members)))
    return out


def read(urls, workers: int, order=None, stop_after: dict[int, int] | None = None):
    """{shard: (keys, images, skip reasons)} of ``order``'s shards; ``stop_after[i]``: batches of
    shard i taken before moving on (its stage failing there)."""
    order = list(range(len(urls))) if order is None else order
    out = {}
    with ShardImages(urls, TRANSFORM, batch_size=2, num_workers=workers) as stream:
        stream.plan(order)
        for index in order:
            counter = SkipCounter("test")
            keys, images = [], []
            for n, (samples, batch) in enumerate(stream.batches(index, counter)):
                if stop_after and n == stop_after.get(index):
                    break
                keys += [s.key for s in samples]
                images.append(batch)
            reasons = [r.reason for r in counter.records]
            out[index] = (keys, torch.cat(images) if images else None, reasons)
    return out


def assert_same(got, expected, shards):
    for index in shards:
        keys, images, reasons = got[index]
        assert keys == expected[index][0]
        assert reasons == expected[index][2]
        if images is None:
            assert expected[index][1] is None
        else:
            assert torch.equal(images, expected[index][1])


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_give_the_in_process_batches_of_every_shard(urls, workers):
    expected = read(urls, 0)
    assert [len(expected[i][0]) for i in range(4)] == [6, 0, 5, 9]
    assert expected[0][2] == ["undecodable_image"]
    assert_same(read(urls, workers), expected, range(4))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_is_said_once(urls, tmp_path, caplog, workers):
    """The loader's reading side counts quietly; the stage's counter, which the skip reaches
    through it, says it (each bad sample and damaged tar was logged twice)."""
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(Path(urls[3]).read_bytes()[:3000])
    not_a_tar = tmp_path / "urls.txt"
    not_a_tar.write_text("http://host/a.tar\n" * 100)
    with caplog.at_level("WARNING"):
        read([urls[0], str(truncated), str(not_a_tar)], workers)
    said = [r.getMessage() for r in caplog.records]
    assert sum("undecodable_image" in m for m in said) == 1, said
    assert sum("truncated_tar" in m for m in said) == 1, said
    # and says why: a 404, a refused connection and a text file are told apart by their detail
    events = [m for m in said if m.startswith(("truncated_tar", "unreadable_shard"))]
    assert events[0].startswith(f"truncated_tar: {truncated} (") and events[0].endswith(")")
    assert events[1].startswith(f"unreadable_shard: {not_a_tar} (") and events[1].endswith(")")


def test_a_shard_left_halfway_is_skipped_and_the_next_ones_are_whole(urls):
    expected = read(urls, 0)
    got = read(urls, 3, stop_after={0: 1, 2: 0})
    assert got[0][0] == expected[0][0][:2]  # the one batch taken of shard 0
    assert got[2][0] == []
    assert_same(got, expected, [1, 3])


def test_a_plan_reads_its_shards_in_its_order_and_refuses_others(urls):
    expected = read(urls, 0)
    assert_same(read(urls, 2, order=[3, 0]), expected, [3, 0])
    with ShardImages(urls, TRANSFORM, batch_size=2, num_workers=2) as stream:
        stream.plan([2, 3])
        list(stream.batches(3, SkipCounter("test")))
        with pytest.raises(RuntimeError, match="out of order"):
            list(stream.batches(2, SkipCounter("test")))


def _tars(tmp_path):
    """A clean tar, one with a repeated key and an unsafe path, and cuts of it inside a member's
    data and inside a header."""
    members = good_members(5)
    odd = [*members[:4], ("../up.jpg", b"x"), ("up.txt", b"y"), *members[:2], *members[4:]]
    full = make_tar(tmp_path / "odd.tar", odd)
    data = full.read_bytes()
    cuts = {}
    for name, at in (("in-data", len(data) // 2 + 700), ("in-header", len(data) // 2 + 100)):
        cuts[name] = tmp_path / f"cut-{name}.tar"
        cuts[name].write_bytes(data[:at])
    return {"clean": make_tar(tmp_path / "clean.tar", members), "odd": full, **cuts}


@pytest.mark.parametrize("case", ["clean", "odd", "in-data", "in-header"])
def test_a_worker_reading_its_own_samples_sees_the_same_tar(tmp_path, case):
    """``read`` leaves other workers' samples unread; keys, skip flags, every read sample's bytes
    and the tar's damage report are those of a full read."""
    url = str(_tars(tmp_path)[case])
    whole_counter, part_counter = SkipCounter(), SkipCounter()
    whole = list(iter_tar_samples(url, whole_counter))
    part = list(iter_tar_samples(url, part_counter, read=lambda p: p % 2 == 1))
    assert [s["__key__"] for s in part] == [s["__key__"] for s in whole]
    assert [s.get("__skip__") for s in part] == [s.get("__skip__") for s in whole]
    for position, (a, b) in enumerate(zip(part, whole)):
        if position % 2 == 1:
            assert a == b
        else:
            assert set(a) <= {"__key__", "__url__", "__skip__"}
    assert part_counter.shard_events == whole_counter.shard_events
    if case != "clean":
        assert any(s.get("__skip__") for s in whole) or whole_counter.shard_events


def _piped(url: str, log, head_bytes: int | None = None, status: int = 0) -> str:
    """A ``pipe:`` URL streaming ``url`` (or its first ``head_bytes`` bytes, then exiting with
    ``status``), that appends a line to ``log`` each time it is opened."""
    body = f"cat {url}" if head_bytes is None else f"head -c {head_bytes} {url}; exit {status}"
    return f"pipe:echo {url} >> {log}; {body}"


def _read_all(urls, workers):
    """{shard: (keys, images, skip records as (reason, where), shard events)} of every shard."""
    out = {}
    with ShardImages(urls, TRANSFORM, batch_size=2, num_workers=workers) as stream:
        for index in range(len(urls)):
            counter = SkipCounter("test")
            keys, images = [], []
            for samples, batch in stream.batches(index, counter):
                keys += [s.key for s in samples]
                images.append(batch)
            records = [(r.reason, r.url) for r in counter.records]
            out[index] = (
                keys,
                torch.cat(images) if images else None,
                records,
                counter.shard_events,
            )
    return out


def test_workers_fetch_each_remote_shard_once_and_read_what_one_stream_gives(
    urls, tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the copies go
    log = tmp_path / "opened.log"
    remote = [_piped(u, log) for u in urls]
    expected = _read_all(remote, 0)
    assert [len(expected[i][0]) for i in range(4)] == [6, 0, 5, 9]
    assert expected[0][2] == [("undecodable_image", f"{remote[0]}:s0_3")]
    log.unlink()
    got = _read_all(remote, 3)
    for index in range(4):
        assert got[index][0] == expected[index][0] and got[index][2] == expected[index][2]
        assert (got[index][1] is None) == (expected[index][1] is None)
        assert got[index][1] is None or torch.equal(got[index][1], expected[index][1])
    # one fetch per shard, not one per worker; the copies are gone once the loader closes
    assert sorted(log.read_text().split()) == sorted(urls)
    assert not list(tmp_path.glob("capfilt-shard-copies-*"))


def test_a_remote_shard_that_breaks_off_reads_the_same_with_workers(urls, tmp_path):
    whole = _read_all([urls[3]], 0)[0][0]
    size = Path(urls[3]).stat().st_size
    for cut in (size // 2, 0):  # some samples, then the end; nothing at all
        remote = [_piped(urls[3], tmp_path / "log", head_bytes=cut)]
        expected, got = _read_all(remote, 0)[0], _read_all(remote, 3)[0]
        assert got[0] == expected[0] and got[2] == expected[2] and got[3] == expected[3]
        assert expected[3] == {"truncated_tar" if cut else "unreadable_shard": 1}
        assert expected[0] == whole[: len(expected[0])] and (expected[0] != []) == (cut > 0)
    # a command that fails: a failed transfer, not damage in the tar: the shard fails (a re-run
    # fetches it again), one process or several
    remote = [_piped(urls[3], tmp_path / "log", head_bytes=size // 2, status=3)]
    for workers in (0, 3):
        with pytest.raises(ShardReadError, match=r"its transfer failed: .*exit 3"):
            _read_all(remote, workers)


def test_remote_shards_benchmark_counts_one_fetch_per_shard():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "remote_shards.py"
    args = ["--shards", "2", "--images", "6", "--side", "32", "--rate", "50", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines()}
    assert "fetched 2.00x the shards' bytes" in lines["a stream per worker"]
    assert "fetched 1.00x the shards' bytes" in lines["one shared copy"]


def test_a_shard_copy_fails_on_a_failed_transfer_or_a_local_write_failure(urls, tmp_path):
    from capfilt.data.shard_copies import ShardCopies, ShardCopyError

    copies = ShardCopies(tmp_path)
    log = tmp_path / "opened.log"
    copies.prefetch(0, _piped(urls[0], log))
    path = copies.local(0, _piped(urls[0], log))  # waits for the prefetch, no 2nd fetch
    assert Path(path).read_bytes() == Path(urls[0]).read_bytes()
    assert log.read_text().split() == [urls[0]]
    # the stream's command fails: the shard fails (no partial copy), as a stream reader's would
    with pytest.raises(ShardCopyError, match=r"pipe:exit 3: its transfer failed: .*exit 3"):
        copies.local(1, "pipe:exit 3")
    assert not (tmp_path / "00000001.tar").exists()
    # the copy cannot be written (here: its file name is taken by a folder): the shard fails
    (tmp_path / "00000002.part").mkdir()
    with pytest.raises(ShardCopyError, match=r"could not write its local copy.*\$TMPDIR"):
        copies.local(2, _piped(urls[0], log))
    copies.remove(0)
    with pytest.raises(ShardCopyError, match="missing"):  # removed, not fetched again
        copies.local(0, _piped(urls[0], log))
    assert log.read_text().split() == [urls[0]]  # shard 2 failed before opening its stream


def test_the_worker_server_can_start_before_torch_is_imported_and_preloads_the_loader():
    """A command starts the workers' fork server before its own imports (capfilt/data/workers.py):
    the module that starts it imports no torch, and the server imports this loader's module."""
    import subprocess
    import sys

    import capfilt.data.loader as loader_mod
    from capfilt.data.workers import LOADER_MODULE

    assert LOADER_MODULE == loader_mod.__name__
    check = (
        "import sys; import capfilt.data.workers as w; "
        "assert 'torch' not in sys.modules, 'imports torch'; "
        "w.start_worker_server(0); w.start_worker_server(2); "
        "assert 'torch' not in sys.modules, 'starting the server imports torch'"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
