"""Text from the user's data or command line prints as written: rich markup in a path or a caption
origin ("[bold]", "[/]") is neither parsed (a MarkupError) nor swallowed."""

from __future__ import annotations

import json

from tests.faults._cli import image_folder, no_traceback, run_cli
from tests.faults.test_lock import hold_lock


def test_a_path_with_markup_prints_verbatim(tmp_path, capsys):
    src = image_folder(tmp_path / "src")
    out = tmp_path / "[bold]shards[/]"
    result = run_cli(capsys, "data", "import", "folder", src, "--out", out)
    assert result.code == 0, result.output
    assert f"in {out}" in result.stdout

    holder = hold_lock(out)
    try:
        result = run_cli(capsys, "data", "import", "folder", src, "--out", out)
    finally:
        holder.close()
    assert result.code == 2
    assert f"error: {out} is in use" in result.stderr and no_traceback(result)


def test_a_missing_recipe_with_a_closing_tag_is_named(tmp_path, capsys):
    result = run_cli(capsys, "config", "show", "[/]nope[red]")
    assert result.code == 2, result.output
    assert "'[/]nope[red]'" in result.stderr and no_traceback(result)


def test_origins_and_skip_reasons_with_markup_print_verbatim(tmp_path, capsys):
    from capfilt.cli.common import report_origins, report_stage
    from capfilt.data.stage import StageResult

    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps({"origins": {"[/]": {"kept": 1, "texts": 2, "kept_fraction": 0.5}}})
    )
    report_origins(summary)
    result = StageResult(
        tmp_path / "[bold]x",
        stats={"count": 1, "input_count": 2, "skipped": {"bad [i]json[/i]": 1}},
    )
    report_stage(result, "filter")
    printed = capsys.readouterr().out
    assert "      [/]: kept 1 of 2 texts (50.0%)" in printed
    assert f"in {tmp_path / '[bold]x'}" in printed
    assert "skipped 1 bad input sample(s): bad [i]json[/i]" in printed
