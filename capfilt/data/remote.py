"""http(s) shards read through curl with a stall limit.

webdataset reads an http(s) shard from ``curl --connect-timeout 30``: a server that accepts the
connection and then never sends a byte keeps a stage waiting forever, without a word. Its opener
here is webdataset's curl command with a low-speed limit added: a transfer slower than 1 byte/s
for ``CAPFILT_HTTP_STALL_S`` seconds (default 60; 0: no limit) fails as any failed transfer
does (``reader.ShardFetchError``: a stage fails the shard and a re-run retries it; training
counts it as ``fetch_failed``), and curl's exit status is said in words.

Every shard is opened by ``capfilt.data.reader.open_shard``, which sends http(s) URLs here and
the other streams (``pipe:``, gs://, hf://) to webdataset.
"""

from __future__ import annotations

import os

STALL_ENV = "CAPFILT_HTTP_STALL_S"
"""Environment variable: seconds an http(s) shard may stay under 1 byte/s before it fails."""

DEFAULT_STALL_S = 60


def stall_seconds() -> int:
    """The stall limit in seconds from :data:`STALL_ENV` (0: none)."""
    raw = os.environ.get(STALL_ENV, "").strip()
    if not raw:
        return DEFAULT_STALL_S
    try:
        seconds = int(raw)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise ValueError(f"{STALL_ENV}={raw!r}: expected a whole number of seconds (0: no limit)")
    return seconds


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


def curl_failure(status: int) -> str:
    """The message for curl ending with ``status`` (webdataset's names only the number, inside
    the whole command); its reader names the URL."""
    meaning = CURL_EXITS.get(status)
    return f"curl exit {status}" + (f" ({meaning})" if meaning else "")


def open_http(url: str, bufsize: int = 8192):
    """An http(s) shard for reading: webdataset's ``gopen_curl`` with :func:`curl_command`."""
    from webdataset.gopen import Pipe

    class CurlPipe(Pipe):
        def wait_for_child(self):
            try:
                super().wait_for_child()
            except OSError:
                raise OSError(curl_failure(self.status)) from None

    # 141: SIGPIPE, 23: write error, both from a reader closing the pipe early (as webdataset)
    return CurlPipe(curl_command(url), mode="rb", bufsize=bufsize, ignore_status=[141, 23])
