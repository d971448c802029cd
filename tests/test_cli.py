"""The command line as a user meets it: help, dry runs, exit codes, synth determinism and resume after a kill."""

from __future__ import annotations

import filecmp
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import subprocess_env

STAGES = ("data", "pretrain", "finetune", "caption", "filter", "eval", "demo", "report", "config")


def capfilt(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", subprocess_env())  # this checkout importable from any cwd
    proc = subprocess.run(
        [sys.executable, "-m", "capfilt", *args], capture_output=True, text=True, **kw
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_help_lists_every_stage():
    proc = capfilt("--help", check=True)
    for stage in STAGES:
        assert stage in proc.stdout
    for group, subs in (
        ("finetune", ("captioner", "filter")),
        ("eval", ("retrieval", "caption", "filter")),
        ("data", ("synth", "import")),
    ):
        text = capfilt(group, "--help", check=True).stdout
        assert all(sub in text for sub in subs), text


def test_the_list_of_commands_gives_each_summary_unbroken():
    from capfilt.cli.main import app

    # wide enough that rich wraps nothing: a summary split over two lines came from its docstring
    listing = capfilt("--help", check=True, env=subprocess_env(COLUMNS="400")).stdout
    for command in app.registered_commands:
        first = inspect.cleandoc(command.callback.__doc__).split("\n\n")[0]
        assert " ".join(first.split()) in listing, command.name
    stages = capfilt("caption", "--help", check=True, env=subprocess_env(COLUMNS="400")).stdout
    assert "shipped name (blip-base, demo, real-cpu, tiny)" in stages


def test_dry_run_prints_the_resolved_recipe(tmp_path):
    proc = capfilt(
        "pretrain",
        "tiny",
        "--shards",
        "x",
        "--out",
        str(tmp_path / "r"),
        "--set",
        "train.lr=2e-4",
        "--dry-run",
        check=True,
    )
    data = yaml.safe_load(proc.stdout)
    assert data["train"]["lr"] == pytest.approx(2e-4) and data["name"] == "tiny"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("pretrain", "tiny", "--shards", "x", "--out", "y", "--set", "train.bogus=1"),
        ("pretrain", "tiny", "--shards", "x", "--out", "y", "--set", "train.epochs=abc"),
        ("data", "synth", "no-such-recipe", "--out", "y"),
        ("filter", "tiny", "--shards", "/nonexistent/dir", "--out", "y", "--model", "/nonexistent"),
        ("eval", "filter", "--scores", "/nonexistent"),
        ("demo", "--skip", "bogus-stage"),
    ],
)
def test_usage_and_config_errors_exit_2(args, tmp_path):
    proc = capfilt(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error" in (proc.stderr + proc.stdout).lower()


def test_scores_errors_keep_the_path_as_given(tmp_path):
    """A URL keeps both slashes in the message (a Path would make it http:/host), and the
    message says that --scores is read from local files."""
    url = "http://127.0.0.1:18431/out/filt_local"
    proc = capfilt("eval", "filter", "tiny", "--scores", url, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert url in proc.stderr and "must be a local folder" in proc.stderr
    proc = capfilt("eval", "filter", "tiny", "--scores", "no//such", cwd=tmp_path)
    assert proc.returncode == 2 and "--scores not found: no//such" in proc.stderr


def test_verbose_is_taken_after_the_command_too(tmp_path):
    from capfilt.cli.main import verbose_first

    assert verbose_first(["report", "x", "-v"]) == ["-v", "report", "x"]
    assert verbose_first(["-v", "report", "x"]) == ["-v", "report", "x"]
    assert verbose_first(["data", "import", "--verbose", "--", "-v"]) == [
        "--verbose", "data", "import", "--", "-v",
    ]  # fmt: skip
    # a mistyped recipe key: the one-line error, then (verbose) the traceback
    proc = capfilt("config", "show", "tiny", "--set", "train.lrr=1", "-v", cwd=tmp_path)
    assert proc.returncode == 2 and "No such option" not in proc.stderr
    assert "unknown config key 'train.lrr'" in proc.stderr


def test_bad_key_is_named(tmp_path):
    proc = capfilt("data", "synth", "tiny", "--out", str(tmp_path), "--set", "synth.n_wbe=3")
    assert proc.returncode == 2 and "synth.n_wbe" in proc.stderr


SYNTH = ("data", "synth", "tiny", "--set", "synth.n_web=600", "--set", "synth.shard_size=40")


def test_synth_is_byte_identical_by_seed_and_resumes_after_a_kill(tmp_path):
    capfilt(*SYNTH, "--out", str(tmp_path / "a"), check=True)
    capfilt(*SYNTH, "--out", str(tmp_path / "b"), check=True)
    other = tmp_path / "other"
    capfilt(*SYNTH, "--set", "synth.seed=1", "--out", str(other), check=True)
    web_a, web_c = tmp_path / "a" / "web", tmp_path / "kill" / "web"
    names = sorted(p.name for p in web_a.iterdir())
    assert not filecmp.cmpfiles(web_a, tmp_path / "b" / "web", names, shallow=False)[1]
    assert (web_a / "00000000.tar").read_bytes() != (other / "web" / "00000000.tar").read_bytes()

    proc = subprocess.Popen(
        [sys.executable, "-m", "capfilt", *SYNTH, "--out", str(tmp_path / "kill")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(web_c.glob("*_stats.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(web_c.glob("*_stats.json"))) < 15, "the kill should land mid-way"
    capfilt(*SYNTH, "--out", str(tmp_path / "kill"), check=True)
    for split in ("human", "web", "test"):
        left, right = tmp_path / "a" / split, tmp_path / "kill" / split
        files = sorted(p.name for p in left.iterdir())
        assert files == sorted(p.name for p in right.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(left, right, files, shallow=False)
        assert not mismatch and not errors, (split, mismatch)


def test_ctrl_c_says_how_to_resume(tmp_path):
    """typer turns Ctrl-C into exit 130 without a word; capfilt says what to run next."""
    from capfilt.cli.main import _interrupted

    out = tmp_path / "synth"
    proc = subprocess.Popen(
        [sys.executable, "-m", "capfilt", *SYNTH, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((out / "web").glob("*_stats.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().endswith("interrupted; re-run the same command to resume")
    assert "with --resume auto" in _interrupted(["pretrain", "tiny", "--out", "x"])
    assert "with --resume auto" in _interrupted(["-v", "finetune", "captioner", "tiny"])
    assert "--resume auto" not in _interrupted(["pretrain", "tiny", "--resume", "auto"])


def test_sigterm_is_one_ctrl_c_in_the_process_that_asked_and_the_default_in_a_forked_one():
    from capfilt.utils import signals

    before = signal.getsignal(signal.SIGTERM)
    try:
        signals.terminate_as_interrupt()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
        assert signals.terminated()
        os.kill(os.getpid(), signal.SIGTERM)  # a second one (torchrun's after the scheduler's)
        time.sleep(0.01)  # is not raised in the cleanup the first one started
        child = os.fork()
        if child == 0:  # a worker forked from the process: SIGTERM ends it, as by default
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)
        signals._received = False


def test_console_script_and_module_agree():
    script = Path(sys.executable).with_name("capfilt")
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    a = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert a == capfilt("--version", check=True).stdout


def test_a_rank_other_than_zero_says_only_its_own_errors(capsys):
    import torch.distributed  # noqa: F401  (as under torchrun: the collectives' errors exist)

    from capfilt.cli import common

    common.quiet_unless_main(1)
    try:
        common.out.print("table of results")
        common.print_warning("--threshold is not used")
        common.print_error("shard not found: data/nope", common.EXIT_USAGE)
        common.print_error("shard source x gives no samples to reader 1 of 2")
        common.print_error("scores of shard 3 do not match", common.EXIT_USAGE, rank_local=True)
    finally:
        common.quiet_unless_main(0)
    captured = capsys.readouterr()
    # results, the command's warnings and usage errors are the job's: rank 0 says them; a usage
    # error of this rank's own shard only this rank can say
    assert captured.out == ""
    assert captured.err == (
        "error [rank 1]: shard source x gives no samples to reader 1 of 2\n"
        "error [rank 1]: scores of shard 3 do not match\n"
    )
    # rank 0, whose collective fails because that rank stopped, says why instead of gloo's text
    gloo = RuntimeError("[../third_party/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    code, message = common.describe_error(gloo)
    assert code == common.EXIT_FAILURE and message.startswith("another process of this torchrun")
    assert common.describe_error(RuntimeError("boom"))[1].startswith("RuntimeError: boom")
