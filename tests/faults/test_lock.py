"""One job per output folder: a second stage or training run on a folder another capfilt process
holds stops at once (exit 2) naming the holder, and writes nothing there."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from tests.faults._cli import image_folder, no_traceback, run_cli


def hold_lock(folder: Path):
    """Lock ``folder`` the way a running capfilt job does (a separate open file description, so
    this process counts as another job)."""
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".capfilt.lock", "a+")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.truncate(0)
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def test_a_second_shard_stage_on_a_held_folder_exits_2_and_leaves_it_alone(tmp_path, capsys):
    src = image_folder(tmp_path / "src")
    out = tmp_path / "out"
    holder = hold_lock(out)
    (out / ".00000000.tar.tmp999").write_bytes(b"the other job's half-written shard")
    try:
        result = run_cli(capsys, "data", "import", "folder", src, "--out", out)
    finally:
        holder.close()
    assert result.code == 2, result.output
    assert f"{out} is in use by another capfilt process (pid {os.getpid()})" in result.stderr
    assert no_traceback(result)
    # the other job's temporary survives and nothing was written
    assert (out / ".00000000.tar.tmp999").is_file()
    assert not list(out.glob("*.tar")) and not (out / "sizes.json").exists()

    # once the holder is gone the same command runs (its own stale temporary is cleaned up)
    result = run_cli(capsys, "data", "import", "folder", src, "--out", out)
    assert result.code == 0, result.output
    assert (out / "00000000.tar").is_file() and (out / "sizes.json").is_file()
    assert not (out / ".00000000.tar.tmp999").exists()
    assert not (out / ".capfilt.lock").exists()  # a finished job leaves only its output


def test_a_second_training_run_on_a_held_run_folder_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        result = run_cli(capsys, "pretrain", "tiny", "--shards", tmp_path / "none", "--out", out)
    finally:
        holder.close()
    assert result.code == 2, result.output
    assert f"in use by another capfilt process (pid {os.getpid()})" in result.stderr
    assert no_traceback(result)
    assert not (out / "config.yaml").exists()  # the holder's run was not touched


def test_the_lock_is_released_when_the_job_fails(tmp_path):
    from capfilt.utils.lock import FolderInUseError, folder_lock

    with pytest.raises(KeyError):
        with folder_lock(tmp_path):
            with pytest.raises(FolderInUseError, match=rf"pid {os.getpid()}\)"):
                with folder_lock(tmp_path):
                    pass
            raise KeyError("the job failed")
    with folder_lock(tmp_path):  # free again
        assert (tmp_path / ".capfilt.lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".capfilt.lock").exists()


def test_a_lock_file_removed_under_a_waiting_job_is_not_trusted(tmp_path, monkeypatch):
    """A job that opened the lock file just before its holder removed it must not count the
    orphan it then locks: it locks the file at the path."""
    from capfilt.utils import lock

    real_open = open
    opened = []

    def open_then_lose_the_race(path, *args, **kwargs):
        fh = real_open(path, *args, **kwargs)
        if not opened:  # the first open's file is removed before we lock it
            Path(path).unlink()
        opened.append(path)
        return fh

    monkeypatch.setattr(lock, "open", open_then_lose_the_race, raising=False)
    with lock.folder_lock(tmp_path):
        assert len(opened) == 2
        assert (tmp_path / ".capfilt.lock").read_text().strip() == str(os.getpid())
        assert hold_lock_fails(tmp_path)


def hold_lock_fails(folder: Path) -> bool:
    """True when ``folder``'s lock file is held (a non-blocking lock on it fails)."""
    with open(folder / ".capfilt.lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
