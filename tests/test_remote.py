"""http(s) shards (capfilt/data/remote.py): read through webdataset's curl command with a stall
limit, so a server that accepts and never answers fails the shard instead of hanging a stage."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from capfilt.data import remote
from capfilt.data.reader import ShardFetchError, iter_tar_samples, open_shard
from tests.conftest import subprocess_env

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None, reason="webdataset reads http with curl"
)


@pytest.fixture
def silent_server():
    """A server that accepts connections and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/shard.tar"
    listener.close()
    for conn in held:
        conn.close()


@pytest.fixture
def file_server(tmp_path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_a_server_that_never_answers_fails_the_read_naming_the_url(silent_server, monkeypatch):
    monkeypatch.setenv(remote.STALL_ENV, "2")
    failure: list[BaseException] = []

    def read_all():
        try:
            with open_shard(silent_server) as stream:
                while stream.read(1 << 16):
                    pass
        except OSError as err:
            failure.append(err)

    reader = threading.Thread(target=read_all, daemon=True)  # a hang fails, not blocks, the test
    reader.start()
    reader.join(timeout=20)  # the stall limit (and no retry after it), not forever
    assert not reader.is_alive(), "still waiting for a server that never answers"
    assert failure and str(failure[0]) == (
        "curl exit 28 (timed out or stalled, see CAPFILT_HTTP_STALL_S)"
    )


def test_an_answering_server_is_read_whole(file_server):
    base, folder = file_server
    (folder / "a.tar").write_bytes(bytes(range(256)) * 4000)
    with open_shard(f"{base}/a.tar") as stream:
        assert stream.read() == (folder / "a.tar").read_bytes()


def test_a_missing_file_and_a_refused_connection_say_so(file_server):
    """The reader names the URL once, and what curl's exit status means."""
    base, _ = file_server
    closed = socket.create_server(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}/a.tar"
    closed.close()
    for url, said in (
        (f"{base}/nope.tar", "curl exit 22 (HTTP error status, e.g. 404)"),
        (refused, "curl exit 7 (connection refused)"),
    ):
        with pytest.raises(ShardFetchError) as failed:
            list(iter_tar_samples(url))
        assert str(failed.value) == f"{url}: its transfer failed: {said}"


def test_the_curl_command_is_webdatasets_with_a_stall_limit(monkeypatch):
    monkeypatch.setenv(remote.STALL_ENV, "7")
    command = remote.curl_command("http://h/x.tar")
    assert command[:7] == ["curl", "--connect-timeout", "30", "--retry", "30", "--retry-delay", "2"]
    assert command[-4:] == ["-f", "-s", "-L", "http://h/x.tar"]
    assert command[command.index("--speed-time") + 1] == "7"
    monkeypatch.setenv(remote.STALL_ENV, "0")
    assert "--speed-time" not in remote.curl_command("http://h/x.tar")
    for bad in ("soon", "-1"):
        monkeypatch.setenv(remote.STALL_ENV, bad)
        with pytest.raises(ValueError, match=remote.STALL_ENV):
            remote.curl_command("http://h/x.tar")


def test_a_bad_stall_limit_is_a_usage_error_before_anything_runs(tmp_path):
    """Not a failure of each remote shard, which a re-run could not mend."""
    out = tmp_path / "syn"
    done = subprocess.run(
        [sys.executable, "-m", "capfilt", "data", "synth", "tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env=subprocess_env(**{remote.STALL_ENV: "soon"}),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"{remote.STALL_ENV}='soon': expected a whole number" in " ".join(done.stderr.split())
    assert not out.exists()


def test_a_failed_fetch_names_its_url_once_where_the_stage_says_it(file_server):
    from capfilt.data.loader import ShardImages, ShardReadError
    from capfilt.data.reader import SkipCounter
    from capfilt.data.transforms import EvalTransform

    url = f"{file_server[0]}/nope.tar"
    with ShardImages([url], EvalTransform(16), batch_size=2, num_workers=0) as stream:
        with pytest.raises(ShardReadError) as failed:
            list(stream.batches(0, SkipCounter("test")))
    assert str(failed.value).count(url) == 1, str(failed.value)
    assert "its transfer failed: curl exit 22" in str(failed.value)
