"""Shards served over http count like the same shards on disk: the ``sizes.json`` in their remote
folder gives training its source weights, shuffle buffers and epoch size (README: Shard format)."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from capfilt.data.sample_counts import sample_count
from capfilt.data.shards import expand_shards, shard_sizes
from capfilt.data.transforms import TrainTransform
from capfilt.train.data import TrainStream, build_sources
from tests.faults.conftest import good_members, make_tar


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request would flood the test output
        pass


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[Path, str]]:
    """(a folder, the http URL it is served at) on a free local port."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _shards(folder: Path, counts: list[int], prefix: str, sizes: bool = True) -> None:
    for i, n in enumerate(counts):
        make_tar(folder / f"{i:08d}.tar", good_members(n, prefix=f"{prefix}{i}_"))
    if sizes:
        listing = {f"{i:08d}.tar": n for i, n in enumerate(counts)}
        (folder / "sizes.json").write_text(json.dumps(listing))


def _keys(sources, batches: int = 12) -> list[str]:
    stream = TrainStream(
        sources, TrainTransform(32, hflip=False), batch_size=4, seed=5, epoch=0, shuffle_buffer=16
    )
    it = iter(stream)
    return [key for _ in range(batches) for key in next(it)["keys"]]


def test_http_shards_read_the_sizes_json_of_their_remote_folder(served):
    root, base = served
    _shards(root / "human", [5, 4, 3], "h")
    _shards(root / "bare", [2], "b", sizes=False)
    remote = f"{base}/human/{{00000000..00000002}}.tar"
    assert shard_sizes(expand_shards(remote)) == [5, 4, 3]
    assert sample_count(expand_shards(remote)).samples == 12
    # a server folder without sizes.json (or a missing folder): unknown, not an error
    assert shard_sizes([f"{base}/bare/00000000.tar", f"{base}/none/00000000.tar"]) == [None, None]


def test_remote_and_local_copies_of_the_same_shards_train_alike(served):
    """A remote human source against a local web source: weights by samples (12 vs 40, not
    3 shards vs 40 samples), the same shuffle buffer, so the very same sample order."""
    root, base = served
    _shards(root / "human", [5, 4, 3], "h")
    _shards(root / "web", [20, 20], "w")
    local = build_sources([str(root / "human"), str(root / "web")])
    remote = build_sources([f"{base}/human/{{00000000..00000002}}.tar", str(root / "web")])
    assert [s.weight for s in remote] == [s.weight for s in local] == [12.0, 40.0]
    assert _keys(remote) == _keys(local)


def test_sources_of_unknown_size_mix_every_source_by_shard_count(tmp_path, caplog):
    """A pipe: source has no sizes.json to read: the sources are not weighed samples against
    shards (3 shards would count as 3 samples beside 40), and the log says how they mix."""
    _shards(tmp_path / "human", [5, 4, 3], "h")
    _shards(tmp_path / "web", [20, 20], "w")
    human = f"pipe:cat {tmp_path}/human/{{00000000..00000002}}.tar"
    with caplog.at_level(logging.WARNING, logger="capfilt"):
        sources = build_sources([human, str(tmp_path / "web")])
    assert [s.weight for s in sources] == [3.0, 2.0]
    said = " ".join(caplog.text.split())
    assert f"the size of {human} is unknown" in said and "mixed by shard count" in said


def test_bootstrap_names_every_epoch_size_it_needs_before_its_first_stage(tmp_path, served):
    """A remote --human of unknown size: one message with all three settings, not three failed
    runs that each reveal the next; shards served with their sizes.json need none."""
    from capfilt.config import ConfigError, load_recipe
    from capfilt.pipeline.bootstrap import (
        BootstrapInputs,
        BootstrapLayout,
        plan_steps,
        run_bootstrap,
    )
    from capfilt.pipeline.epoch_sizes import check_epoch_sizes

    root, base = served
    _shards(root / "human", [5, 4, 3], "h")
    _shards(tmp_path / "web", [20, 20], "w")
    human = f"pipe:cat {root}/human/{{00000000..00000002}}.tar"
    inputs = BootstrapInputs(human=[human], web=[str(tmp_path / "web")])
    with pytest.raises(ConfigError) as err:
        run_bootstrap(load_recipe("tiny"), inputs, tmp_path / "boot")
    said = str(err.value)
    assert f"the size of {human} is unknown" in said
    assert "train.samples_per_epoch (for pretrain-baseline, pretrain-capfilt)" in said
    assert "finetune.captioner.samples_per_epoch (for finetune-captioner)" in said
    assert "finetune.filter.samples_per_epoch (for finetune-filter)" in said
    assert not (tmp_path / "boot").exists()  # refused before any stage (or manifest)
    # what is set already, or stages that do not train, are not asked for
    recipe = load_recipe("tiny", ["train.samples_per_epoch=64"])
    with pytest.raises(ConfigError) as err:
        run_bootstrap(recipe, inputs, tmp_path / "boot", skip=("finetune-filter",))
    assert "train.samples_per_epoch" not in str(err.value)
    assert "finetune.captioner" in str(err.value) and "finetune.filter" not in str(err.value)
    steps = plan_steps(load_recipe("tiny"), inputs, BootstrapLayout(tmp_path / "boot"))
    check_epoch_sizes(load_recipe("tiny"), [s for s in steps if s.stage == "caption"])
    # served over http with the sizes.json beside the shards: every size is known
    inputs.human = [f"{base}/human/{{00000000..00000002}}.tar"]
    check_epoch_sizes(
        load_recipe("tiny"),
        plan_steps(load_recipe("tiny"), inputs, BootstrapLayout(tmp_path / "boot")),
    )
