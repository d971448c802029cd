"""Where a stage's main process spends its time (``PhaseClock``) and what the stage then says:
which phase set the rate, and for a loader that did not keep up, which setting to change."""

from __future__ import annotations

import logging
import re
import time

import pytest

import capfilt.data.loader as loader_mod
from capfilt.data.loader import loader_hint
from capfilt.data.stage import run_shard_stage
from capfilt.utils.timing import PhaseClock


class FakeTime:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timed_counts_the_waits_for_items_not_the_loop_body():
    fake = FakeTime()
    clock = PhaseClock(now=fake)

    def slow_items():
        for i in range(3):
            fake.now += 2.0 + i  # waits of 2, 3 and 4 s
            yield i
        fake.now += 0.5  # finding there is no fourth

    seen = []
    for item in clock.timed("images", slow_items(), first_as="loader start"):
        seen.append(item)
        with clock.phase("model"):
            fake.now += 10.0
        fake.now += 7.0  # untimed work: the rest
    assert seen == [0, 1, 2]
    # the first wait is the loader's start, the later ones (and the last, empty one) the images
    assert clock.seconds == {"loader start": 2.0, "model": 30.0, "images": 7.5}
    assert clock.largest() == "model"
    total = fake.now - 100.0  # 2 + 3 + 4 + 0.5 + 3 * 17
    shares = clock.shares(total)
    assert list(shares) == ["model", "images", "loader start", "rest"]  # largest first, rest last
    assert shares["rest"] == pytest.approx(21.0 / total)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert clock.describe(total) == "model 50%, images 12%, loader start 3%, rest 35%"


def test_a_phase_that_raises_is_still_counted():
    fake = FakeTime()
    clock = PhaseClock(now=fake)
    with pytest.raises(ValueError), clock.phase("writing"):
        fake.now += 1.5
        raise ValueError("disk")
    assert clock.seconds == {"writing": 1.5}


def test_the_loader_hint_names_the_setting_to_change(monkeypatch):
    monkeypatch.setattr(loader_mod, "available_cores", lambda: 16)
    assert "--set caption.num_workers=N" in loader_hint("caption", 0)
    assert "16 CPU cores" in loader_hint("caption", 0)
    assert loader_hint("filter", 4).endswith("try --set filter.num_workers=8")
    assert loader_hint("filter", 12).endswith("try --set filter.num_workers=15")
    assert "already fill this machine's 16 CPU cores" in loader_hint("filter", 15)
    monkeypatch.setattr(loader_mod, "available_cores", lambda: 2)
    assert loader_hint("caption", 1).startswith("1 loader process already fills this machine's 2")


def _stage(tmp_path, produce, clock, **kwargs):
    return run_shard_stage(
        tmp_path / "out", 2, produce, stage="test", config_hash="h", clock=clock, **kwargs
    )


def _sample(writer, index: int) -> None:
    writer.write({"__key__": f"s{index}", "json": {"caption": "x"}, "txt": "x"})
    writer.record({"uid": f"s{index}"})


def _timed_stage(tmp_path, caplog, image_wait, model_seconds: float):
    """A 2-shard stage whose ``produce`` waits ``image_wait(index)`` s for its one batch
    (timed as "images", the first wait as "loader start"), then ``model_seconds`` on the model;
    (its result, its closing log line)."""
    caplog.set_level(logging.INFO, logger="capfilt")
    clock = PhaseClock()

    def loader(index):
        time.sleep(image_wait(index))
        yield index

    def produce(index, writer):
        for _ in clock.timed("images", loader(index), first_as="loader start"):
            with clock.phase("model"):
                time.sleep(model_seconds)
        with clock.phase("writing"):
            _sample(writer, index)
        return None

    result = _stage(tmp_path, produce, clock, timing_hints={"images": "more loader processes"})
    line = next(r.getMessage() for r in caplog.records if "samples in" in r.getMessage())
    return result, line


def test_the_stage_says_which_phase_set_its_rate(tmp_path, caplog):
    result, line = _timed_stage(tmp_path, caplog, lambda index: 0.01, model_seconds=0.25)
    phases = result.phase_seconds
    assert set(phases) == {
        "loader start",
        "images",
        "model",
        "writing",
        "publishing",
        "last commit",
    }
    assert phases["model"] >= 0.5
    assert sum(phases.values()) <= result.seconds
    assert "main process: model" in line and line.endswith("the model set the rate")
    assert "after the loader's start" not in line  # a start of under 5% of the time
    assert "more loader processes" not in line  # a hint only for the phase that set the rate


def test_a_stage_waiting_on_images_gives_the_loader_hint(tmp_path, caplog):
    _, line = _timed_stage(tmp_path, caplog, lambda index: 0.25, model_seconds=0.01)
    assert line.endswith("the loader set the rate; more loader processes")


def test_a_stage_that_times_nothing_says_nothing_of_phases(tmp_path, caplog):
    """Stages without phases of their own (import, synth) keep their closing line as it was."""
    caplog.set_level(logging.INFO, logger="capfilt")

    def produce(index, writer):
        _sample(writer, index)
        return None

    result = _stage(tmp_path, produce, None)
    line = next(r.getMessage() for r in caplog.records if "samples in" in r.getMessage())
    assert line.endswith("samples/s)") and "main process" not in line
    assert set(result.phase_seconds) == {"publishing", "last commit"}


def test_a_short_run_whose_loader_start_took_the_most_names_the_steady_phase(tmp_path, caplog):
    """More loader processes would not start the loader sooner: the rate is the steady state's,
    and the line says the start took the most time."""
    result, line = _timed_stage(tmp_path, caplog, lambda i: 0.6 if i == 0 else 0.01, 0.1)
    assert line.endswith(
        "the loader's start took the most time (a short run); after it, the model set the rate"
    )
    # the rate a longer run would see: the samples over the time after the loader's start
    rate, steady = re.search(
        r"\(([0-9.]+) samples/s, ([0-9.]+) after the loader's start\)", line
    ).groups()
    start = result.phase_seconds["loader start"]
    assert float(steady) == pytest.approx(2 / (result.seconds - start), rel=0.01)
    assert float(steady) > 1.5 * float(rate)


def test_a_short_run_whose_last_commit_took_the_most_does_not_blame_the_disk(
    tmp_path, caplog, monkeypatch
):
    """The last shard's commit overlaps nothing: in a run of two shards it can take the most
    time on a disk that never held the stage back; the line names the steady state's phase."""
    from capfilt.data.writer import ShardWriter

    commit = ShardWriter.commit

    def slow_commit(self, *args, **kwargs):
        time.sleep(0.5)
        return commit(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "commit", slow_commit)
    result, line = _timed_stage(tmp_path, caplog, lambda index: 0.0, model_seconds=0.2)
    phases = result.phase_seconds
    # shard 0's commit overlapped shard 1's model time (0.3 s left to wait), shard 1's nothing
    assert phases["last commit"] >= 0.45 and phases["publishing"] < phases["last commit"]
    assert "disk slow" not in line
    assert line.endswith(
        "the last shard's commit took the most time (a short run); before it, the model set "
        "the rate"
    )


def test_shares_count_the_phase_running_now():
    """A stage prints a shard's progress while it still waits in "publishing": that wait is
    counted up to now, not left in "rest" (which the stage's closing line then contradicted)."""
    t = [0.0]
    clock = PhaseClock(now=lambda: t[0])
    with clock.phase("model"):
        t[0] += 2.0
    with clock.phase("publishing"):
        t[0] += 1.0
        assert clock.shares(4.0) == {"model": 0.5, "publishing": 0.25, "rest": 0.25}
    t[0] += 1.0
    assert clock.seconds == {"model": 2.0, "publishing": 1.0}
    assert clock.shares(4.0) == {"model": 0.5, "publishing": 0.25, "rest": 0.25}
