"""User errors as the command line reports them: one line naming the problem, the documented exit
code, no traceback (``--verbose`` prints it), and no temporary file left behind."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.faults._cli import image_folder, no_traceback, run_cli


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def test_a_read_only_out_folder_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    src = image_folder(tmp_path / "src")
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "shards"
    if os.geteuid() == 0:  # root ignores permission bits: the kernel's answer on a read-only mount
        real_mkdir = os.mkdir

        def read_only_mkdir(path, *args, **kwargs):
            if Path(path).is_relative_to(parent):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    else:
        parent.chmod(0o555)
    try:
        result = run_cli(capsys, "data", "import", "folder", src, "--out", out)
    finally:
        parent.chmod(0o755)
    assert result.code == 2, result.output
    reason = "read-only file system" if os.geteuid() == 0 else "permission denied"
    assert f"error: {out}: {reason}" in result.stderr
    assert no_traceback(result)


def test_a_full_disk_exits_1_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    src = image_folder(tmp_path / "src", n=4)
    out = tmp_path / "out"
    calls = []

    def full_disk(fd):  # the first data written to disk is reported as not fitting
        calls.append(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    result = run_cli(capsys, "data", "import", "folder", src, "--out", out, "--shard-size", "2")
    assert result.code == 1, result.output
    assert "error: no space left on device" in result.stderr
    assert "re-run the same command" in result.stderr
    assert no_traceback(result)
    assert len(calls) == 1  # the stage stopped at the first shard instead of failing each
    assert leftovers(out) == [] and not list(out.glob("*.tar"))


def test_atomic_writes_remove_their_temporary_on_any_error(tmp_path, monkeypatch):
    from capfilt.utils.files import atomic_write_bytes

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_a_shard_writer_that_fails_removes_its_temporary(tmp_path):
    from capfilt.data.writer import ShardWriter

    with pytest.raises(RuntimeError, match="produce failed"):
        with ShardWriter(tmp_path, 0, stage="t", config_hash="h") as writer:
            writer.write({"__key__": "a", "txt": "x"})
            raise RuntimeError("produce failed")
    assert list(tmp_path.iterdir()) == []


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch hacked",))


@pytest.mark.parametrize(
    "content",
    [b"hello, this is not a checkpoint", b"", pickle.dumps(Hostile())],
    ids=["text", "empty", "hostile-pickle"],
)
def test_convert_of_a_file_that_is_not_a_checkpoint_exits_2(content, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.pth").write_bytes(content)
    result = run_cli(capsys, "convert", "model.pth", tmp_path / "out")
    assert result.code == 2, result.output
    assert "error: model.pth: not a readable PyTorch checkpoint" in result.stderr
    assert no_traceback(result)
    assert not (tmp_path / "hacked").exists() and not (tmp_path / "out").exists()


def test_an_unexpected_error_is_one_line_and_verbose_shows_the_traceback(capsys, monkeypatch):
    import capfilt.cli.common as common

    def broken(*args, **kwargs):
        raise RuntimeError("internal detail\nsecond line")

    monkeypatch.setattr(common, "load_recipe", broken)
    result = run_cli(capsys, "config", "show", "tiny")
    assert result.code == 1, result.output
    assert "error: RuntimeError: internal detail (capfilt --verbose" in result.stderr
    assert "second line" not in result.stderr and no_traceback(result)

    result = run_cli(capsys, "--verbose", "config", "show", "tiny")
    assert result.code == 1 and "Traceback" in result.stderr
    assert "error: RuntimeError: internal detail" in result.stderr


def test_the_console_script_prints_no_traceback_for_a_config_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "capfilt",
            "pretrain",
            "tiny",
            "--shards",
            "x",
            "--out",
            "y",
            "--set",
            "train.log_every=0",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(),  # this checkout importable from tmp_path
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "error: train.log_every: must be >= 1, got 0"
    assert not (tmp_path / "y").exists()


def test_settings_a_command_does_not_use_are_named(capsys, tmp_path):
    """An override or option that changes nothing for this command is said, not dropped
    silently (the commands then fail on their missing inputs, after the warnings)."""
    result = run_cli(
        capsys, "finetune", "captioner", "tiny", "--init", tmp_path / "pre",
        "--shards", tmp_path / "human", "--out", tmp_path / "cap", "--set", "train.epochs=3",
    )  # fmt: skip
    said = " ".join(result.stderr.split())
    assert "train.epochs: pretraining's settings, not used by finetune captioner" in said
    assert "(its own: finetune.captioner.epochs)" in said
    result = run_cli(
        capsys, "filter", "tiny", "--scores-from", tmp_path / "scores", "--model", tmp_path / "m",
        "--threshold", "0.4", "--set", "filter.keep_fraction=0.3",
        "--shards", tmp_path / "web", "--out", tmp_path / "out",
    )  # fmt: skip
    said = " ".join(result.stderr.split())
    assert "--threshold (the ITM threshold) is not used: filter.keep_fraction sets" in said
    assert "--model is not used: --scores-from re-decides the stored scores" in said
    result = run_cli(
        capsys, "filter", "tiny", "--model", tmp_path / "m", "--threshold", "0.4",
        "--set", "filter.rule=itc", "--shards", tmp_path / "web", "--out", tmp_path / "out",
    )  # fmt: skip
    assert "rule itc decides on the cosine" in " ".join(result.stderr.split())
    # a section the command never reads: the override has no effect, and is said to have none
    result = run_cli(
        capsys, "caption", "tiny", "--model", tmp_path / "m", "--set", "train.lr=1e-4",
        "--set", "caption.top_p=0.8", "--shards", tmp_path / "web", "--out", tmp_path / "out",
    )  # fmt: skip
    said = " ".join(result.stderr.split())
    assert "train.lr: not used by this command, which reads caption.*, runtime.*" in said
    assert "caption.top_p" not in said
    result = run_cli(
        capsys, "eval", "retrieval", "tiny", "--model", tmp_path / "m", "--set", "data.max_words=9",
        "--set", "filter.threshold=0.1", "--shards", tmp_path / "test",
    )  # fmt: skip
    said = " ".join(result.stderr.split())
    assert "filter.threshold: not used by this command, which reads eval.*, data.*" in said
    assert "data.max_words" not in said


def test_stage_lists_may_be_comma_separated_and_resume_names_its_choices(capsys, tmp_path):
    result = run_cli(capsys, "demo", "--skip", "synth,bogus", "--out", tmp_path / "d")
    assert result.code == 2 and "unknown stage(s) bogus;" in result.stderr
    result = run_cli(
        capsys, "bootstrap", "tiny", "--human", tmp_path / "h", "--web", tmp_path / "w",
        "--out", tmp_path / "b", "--only", "caption, nope",
    )  # fmt: skip
    assert result.code == 2 and "--only: unknown stage(s) nope;" in result.stderr
    result = run_cli(capsys, "pretrain", "tiny", "--out", tmp_path / "p", "--resume", "bogus")
    said = " ".join(result.output.replace("│", " ").split())
    assert result.code == 2 and "'bogus' is not one of 'auto', 'never'" in said
    assert not (tmp_path / "d").exists() and not (tmp_path / "b").exists()
