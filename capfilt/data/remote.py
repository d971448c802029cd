"""http(s) shards read through curl with a stall limit.

webdataset reads an http(s) shard from ``curl --connect-timeout 30``: a server that accepts the
connection and then never sends a byte keeps a stage waiting forever, without a word. Its opener
here is webdataset's curl command with a low-speed limit added: a transfer slower than 1 byte/s
for ``CAPFILT_HTTP_STALL_S`` seconds (default 60; 0: no limit) fails, naming the URL, and the
shard counts as unreadable (or cut short) like any other bad shard.

webdataset's ``gopen_schemes`` is read at each open, but importing ``webdataset.gopen`` imports
torch (seconds), which a command's start (``capfilt.cli``, the loader's fork server) must not
wait for: the opener is registered when webdataset's module is imported, wherever that happens.
Standard library only.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

STALL_ENV = "CAPFILT_HTTP_STALL_S"
"""Environment variable: seconds an http(s) shard may stay under 1 byte/s before it fails."""

DEFAULT_STALL_S = 60

GOPEN_MODULE = "webdataset.gopen"
SCHEMES = ("http", "https")


def stall_seconds() -> int:
    """The stall limit in seconds from :data:`STALL_ENV` (0: none)."""
    raw = os.environ.get(STALL_ENV, "").strip()
    if not raw:
        return DEFAULT_STALL_S
    try:
        return max(int(raw), 0)
    except ValueError:
        raise ValueError(f"{STALL_ENV}={raw!r}: expected a whole number of seconds") from None


def curl_command(url: str) -> list[str]:
    """webdataset's curl command for reading ``url`` (same flags: retries, -f -s -L), with the
    stall limit; retries stop once a stall's worth of time has passed (a stalled server is not
    waited for 30 times)."""
    stall = stall_seconds()
    limit = ["--speed-limit", "1", "--speed-time", str(stall), "--retry-max-time", str(stall)]
    return [
        "curl",
        "--connect-timeout",
        "30",
        "--retry",
        "30",
        "--retry-delay",
        "2",
        *(limit if stall else []),
        "-f",
        "-s",
        "-L",
        url,
    ]


CURL_EXITS = {
    6: "host name not resolved",
    7: "connection refused",
    22: "HTTP error status, e.g. 404",
    28: "timed out or stalled, see CAPFILT_HTTP_STALL_S",
    35: "TLS handshake failed",
    52: "empty reply from server",
    56: "connection reset while receiving",
}
"""What curl's exit status means, for the errors a shard's URL meets most (curl's man page)."""


def curl_failure(url: str, status: int) -> str:
    """The message for curl ending with ``status`` on ``url`` (webdataset's names only the
    number, inside the whole command)."""
    meaning = CURL_EXITS.get(status)
    return f"{url}: curl exit {status}" + (f" ({meaning})" if meaning else "")


def gopen_curl(url: str, mode: str = "rb", bufsize: int = 8192, **_kw):
    """webdataset's ``gopen_curl`` with :func:`curl_command` for reading (writes unchanged)."""
    from webdataset.gopen import Pipe
    from webdataset.gopen import gopen_curl as webdataset_curl

    if mode[0] != "r":
        return webdataset_curl(url, mode, bufsize)

    class CurlPipe(Pipe):
        def wait_for_child(self):
            try:
                super().wait_for_child()
            except OSError:
                raise OSError(curl_failure(url, self.status)) from None

    # 141: SIGPIPE, 23: write error, both from a reader closing the pipe early (as webdataset)
    return CurlPipe(curl_command(url), mode=mode, bufsize=bufsize, ignore_status=[141, 23])


def register(module) -> None:
    """Make ``module`` (webdataset.gopen) open http(s) URLs with :func:`gopen_curl`."""
    for scheme in SCHEMES:
        module.gopen_schemes[scheme] = gopen_curl


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds webdataset.gopen as the import system would, and registers once it has run."""

    def find_spec(self, name, path, target=None):
        if name != GOPEN_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def run_and_register(module):
            run(module)
            register(module)

        spec.loader.exec_module = run_and_register  # this spec's own loader object
        return spec


def install() -> None:
    """Register now if webdataset.gopen is imported, else when it is (once per process)."""
    if GOPEN_MODULE in sys.modules:
        register(sys.modules[GOPEN_MODULE])
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
