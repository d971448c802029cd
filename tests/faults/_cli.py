"""Running the ``capfilt`` entry point in-process (the exit-code mapping of ``capfilt.cli.main``
included) and building the small inputs the fault tests need."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> CliResult:
    """``capfilt ARGS`` through ``capfilt.cli.main.main``, as the console script runs it."""
    from capfilt.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return CliResult(0 if code is None else int(code), captured.out, captured.err)


def image_folder(path: Path, n: int = 3) -> Path:
    """``n`` small JPEGs with a sidecar caption each (what ``capfilt data import folder`` takes)."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(buf, format="JPEG")
        (path / f"img{i}.jpg").write_bytes(buf.getvalue())
        (path / f"img{i}.txt").write_text(f"a blue square number {i}\n")
    return path


def no_traceback(result: CliResult) -> bool:
    return "Traceback" not in result.output and 'File "' not in result.output


__all__ = ["CliResult", "image_folder", "no_traceback", "run_cli"]
