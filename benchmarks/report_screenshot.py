"""Render a run's report.html in headless Chromium: a screenshot to look at, and a DOM/console check.

    python benchmarks/report_screenshot.py RUN_DIR [--png out.png] [--html report.html] [--no-build]

Builds ``RUN_DIR/report.html`` first (unless ``--no-build``), installs Debian's ``chromium`` with
apt when ``/usr/bin/chromium`` is missing, then runs Chromium twice with networking features off:
``--dump-dom`` (the page must contain both tables, and unless ``--allow-missing`` the charts and
the thumbnails) and
``--screenshot``. Console messages at warning level or above (``--enable-logging=stderr``) that
come from the page are reported as errors. Exit code 0 when the page loaded cleanly.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root in a container; the sandbox refuses to start there
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
TABLES = {
    "retrieval table": r'<table[^>]*id="retrieval-table"',
    "filter table": r'<table[^>]*id="filter-table"',
}
CONTENT = {
    "a chart": r"<svg",
    "a histogram": r'class="chart histogram"',
    "a thumbnail": r'<img src="data:image/',
}


def ensure_chromium() -> Path:
    found = (
        CHROMIUM if CHROMIUM.exists() else (Path(p) if (p := shutil.which("chromium")) else None)
    )
    if found:
        return found
    print("chromium not found: installing Debian's chromium with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    if not CHROMIUM.exists():
        sys.exit("apt-get finished but /usr/bin/chromium is still missing")
    return CHROMIUM


def run_chromium(
    chromium: Path, url: str, extra: list[str], profile: str, timeout: int = 120
) -> subprocess.CompletedProcess:
    cmd = [str(chromium), *FLAGS, f"--user-data-dir={profile}", *extra, url]
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def page_errors(stderr: str) -> list[str]:
    """Console lines from the page (CONSOLE messages, failed loads), not Chromium's own chatter."""
    bad = []
    for line in stderr.splitlines():
        if re.search(r"CONSOLE|Uncaught|Failed to load|net::ERR_|Refused to", line):
            bad.append(line.strip())
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument(
        "--png", type=Path, default=None, help="Screenshot path (default: RUN_DIR/report.png)."
    )
    ap.add_argument(
        "--html", type=Path, default=None, help="Report file (default: RUN_DIR/report.html)."
    )
    ap.add_argument(
        "--no-build", action="store_true", help="Use the existing report file; do not rebuild it."
    )
    ap.add_argument(
        "--allow-missing",
        action="store_true",
        help="Only require the tables (a partial run has no charts or images).",
    )
    ap.add_argument("--size", default="1280,3000", help="Window size WIDTH,HEIGHT.")
    args = ap.parse_args(argv)

    html = (args.html or args.run_dir / "report.html").resolve()
    if not args.no_build:
        from capfilt.report import write_report

        write_report(args.run_dir, html)
        print(f"wrote {html}")
    if not html.is_file():
        sys.exit(f"{html} not found")
    png = (args.png or args.run_dir / "report.png").resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    chromium = ensure_chromium()
    url = html.as_uri()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="capfilt-chromium-") as profile:
        dom = run_chromium(
            chromium, url, ["--dump-dom", "--enable-logging=stderr", "--v=0"], profile
        )
        if dom.returncode != 0:
            problems.append(f"chromium --dump-dom exited {dom.returncode}: {dom.stderr[-2000:]}")
        expected = TABLES if args.allow_missing else {**TABLES, **CONTENT}
        for what, pattern in expected.items():
            if not re.search(pattern, dom.stdout):
                problems.append(f"rendered DOM lacks {what}")
        problems += [f"console: {line}" for line in page_errors(dom.stderr)]
        shot = run_chromium(
            chromium, url, [f"--screenshot={png}", f"--window-size={args.size}"], profile
        )
        if shot.returncode != 0 or not png.is_file():
            problems.append(f"screenshot failed (exit {shot.returncode}): {shot.stderr[-2000:]}")
    print(
        f"DOM: {len(dom.stdout):,} characters; tables: {dom.stdout.count('<table')}, svg: {dom.stdout.count('<svg')}, "
        f"images: {dom.stdout.count('<img ')}"
    )
    if png.is_file():
        print(f"screenshot: {png} ({png.stat().st_size:,} bytes)")
    for p in problems:
        print(f"PROBLEM: {p}")
    print("OK: the page loaded without errors" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
