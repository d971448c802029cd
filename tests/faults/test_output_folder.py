"""An output folder that already holds other shards: a stage refuses it (exit 2) before writing
anything, instead of overwriting its input or another stage's shards, or leaving stale shards to
be read along with its own."""

from __future__ import annotations

from pathlib import Path

from tests.faults._cli import image_folder, no_traceback, run_cli


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _import(capsys, images: Path, out: Path, *extra: str):
    return run_cli(capsys, "data", "import", "folder", images, "--out", out, *extra)


def test_an_import_over_a_larger_earlier_import_is_refused_and_leaves_it_whole(capsys, tmp_path):
    out = tmp_path / "shards"
    assert _import(capsys, image_folder(tmp_path / "many", 3), out, "--shard-size", "1").code == 0
    before = _files(out)
    assert sum(name.endswith(".tar") for name in before) == 3

    result = _import(capsys, image_folder(tmp_path / "one", 1), out, "--shard-size", "1")
    assert result.code == 2 and no_traceback(result)
    assert "2 shard(s) of an earlier import run past the 1 this run writes" in result.stderr
    assert "00000001.tar, 00000002.tar" in result.stderr
    assert _files(out) == before  # nothing written, nothing removed

    # the same import again resumes (every shard done), as before
    again = _import(capsys, tmp_path / "many", out, "--shard-size", "1")
    assert again.code == 0 and _files(out) == before


def test_a_caption_stage_refuses_another_stages_shards_and_its_own_input(capsys, tmp_path):
    human = tmp_path / "human"
    assert _import(capsys, image_folder(tmp_path / "images", 2), human).code == 0
    before = _files(human)
    # refused before the model loads: the model path need not exist
    for out in (human, tmp_path / "imported"):
        if out != human:
            assert _import(capsys, tmp_path / "images", out).code == 0
        args = ("caption", "tiny", "--model", tmp_path / "no-model", "--shards", human)
        result = run_cli(capsys, *args, "--out", out)
        assert result.code == 2 and no_traceback(result), result.output
        if out == human:
            assert "holds this caption stage's input (00000000.tar)" in result.stderr
        else:
            assert "holds shards another stage wrote (1 of stage 'import'" in result.stderr
    assert _files(human) == before


def test_a_folder_with_tars_capfilt_did_not_write_is_refused(capsys, tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "data-000.tar").write_bytes(b"")
    result = _import(capsys, image_folder(tmp_path / "images", 1), out)
    assert result.code == 2 and no_traceback(result)
    assert "holds tars capfilt did not write (data-000.tar)" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["data-000.tar"]
