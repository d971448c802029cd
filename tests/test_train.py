"""Training: schedules, the resumable data stream, losses going down, exact resume after a stop or a kill."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capfilt.config import ConfigError, load_recipe
from capfilt.data.synth import write_synth
from capfilt.data.transforms import TrainTransform
from capfilt.model.folder import CONFIG
from capfilt.train.data import TrainStream, build_sources
from capfilt.train.optim import lr_at
from capfilt.train.trainer import TrainJob, finite_means, train


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, load_recipe("tiny").synth)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def test_lr_schedule_warmup_step_and_cosine():
    cfg = load_recipe(
        "tiny",
        [
            "train.warmup_steps=10",
            "train.warmup_lr=0",
            "train.lr=1.0",
            "train.schedule=step",
            "train.lr_decay_rate=0.5",
            "train.epochs=3",
        ],
    ).train
    assert lr_at(0, cfg, 20) == 0.0 and lr_at(5, cfg, 20) == pytest.approx(0.5)
    assert lr_at(10, cfg, 20) == 1.0 and lr_at(25, cfg, 20) == 0.5 and lr_at(45, cfg, 20) == 0.25
    cos = load_recipe(
        "tiny", ["train.warmup_steps=0", "train.lr=1.0", "train.min_lr=0.1", "train.epochs=1"]
    ).train
    assert lr_at(0, cos, 100) == 1.0
    assert lr_at(50, cos, 100) == pytest.approx(0.55)
    assert lr_at(100, cos, 100) == pytest.approx(0.1)


def _stream(synth_data, skip=0, epoch=0, **kw):
    sources = build_sources([str(synth_data / "human"), str(synth_data / "web")])
    return TrainStream(
        sources,
        TrainTransform(32, hflip=False),
        batch_size=4,
        seed=3,
        epoch=epoch,
        skip_batches=skip,
        shuffle_buffer=16,
        **kw,
    )


def test_stream_is_deterministic_and_resumable_mid_epoch(synth_data):
    full = iter(_stream(synth_data))
    batches = [next(full) for _ in range(7)]
    resumed = iter(_stream(synth_data, skip=4))
    for expected in batches[4:]:
        got = next(resumed)
        assert got["keys"] == expected["keys"] and got["texts"] == expected["texts"]
        assert torch.equal(got["images"], expected["images"])
    other_epoch = next(iter(_stream(synth_data, epoch=1)))
    assert other_epoch["keys"] != batches[0]["keys"]


def test_stream_splits_ranks_disjointly(synth_data):
    seen = []
    for rank in range(2):
        it = iter(_stream(synth_data, rank=rank, world_size=2))
        seen.append({k for _ in range(10) for k in next(it)["keys"]})
    assert not seen[0] & seen[1]


def test_fewer_shards_than_readers_each_reader_gets_its_positions_whole(synth_data):
    # every reader walks all the shards (seeking over the others' samples) and keeps
    # positions split, split + n_splits, ... counted across the shards
    import random

    from capfilt.data.reader import iter_tar_samples
    from capfilt.data.shards import expand_shards

    urls = expand_shards([str(synth_data / "human")])
    whole = [s for url in urls for s in iter_tar_samples(url)]
    n_splits = 3 * len(urls) + 1
    stream = _stream(synth_data)
    for split in range(n_splits):
        got = list(stream._split_samples(list(urls), split, n_splits, random.Random(0)))
        assert got == whole[split::n_splits]


def test_a_source_of_fewer_samples_than_readers_gives_every_reader_one(synth_data, tmp_path):
    # e.g. a 1-sample tar beside a large source under 2 ranks: the second reader repeats one
    # instead of failing the run part-way (it passed the up-front check of the source)
    import random
    import shutil

    from capfilt.data.reader import iter_tar_samples
    from capfilt.data.shards import expand_shards

    first = expand_shards([str(synth_data / "human")])[0]
    whole = list(iter_tar_samples(first))
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        for name, data in whole[0].items():
            if not name.startswith("__"):
                info = tarfile.TarInfo(f"{whole[0]['__key__']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shutil.copy(tmp_path / "one.tar", tmp_path / "two.tar")
    tarfile.open(tmp_path / "empty.tar", "w").close()
    one, two, empty = (str(tmp_path / f"{n}.tar") for n in ("one", "two", "empty"))
    stream = _stream(synth_data)
    # 1 shard for 2 readers; 2 shards of 1 sample for 3; a reader whose own shard is empty
    for urls, n_splits in (([one], 2), ([one, two], 3), ([one, empty], 2)):
        for split in range(n_splits):
            got = list(stream._split_samples(urls, split, n_splits, random.Random(0)))
            assert [s["__key__"] for s in got] == [whole[0]["__key__"]], (urls, split)
    assert not list(stream._split_samples([empty], 1, 2, random.Random(0)))
    # a large source whose second shard is empty: reader 1 takes every other sample of the first,
    # not one sample over and over
    got = list(stream._split_samples([first, empty], 1, 2, random.Random(0)))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in whole[1::2]]


def test_stream_uses_every_caption_of_an_image(synth_data):
    it = iter(_stream(synth_data))
    by_key: dict[str, set[str]] = {}
    for _ in range(150):
        batch = next(it)
        for key, text in zip(batch["keys"], batch["texts"]):
            by_key.setdefault(key, set()).add(text)
    assert max(len(texts) for key, texts in by_key.items() if key.startswith("synth-human")) > 1


def _job(synth_data, out, *overrides, stop_after=None, resume="never"):
    recipe = load_recipe(
        "tiny",
        [
            "train.epochs=1",
            "train.ckpt_every=4",
            "train.log_every=2",
            "data.batch_size=8",
            *overrides,
        ],
    )
    shards = [str(synth_data / "human"), str(synth_data / "web")]
    return TrainJob(
        stage="pretrain",
        recipe=recipe,
        shards=shards,
        out=out,
        stop_after=stop_after,
        resume=resume,
    )


def test_train_itm_negatives_reaches_the_sampler(synth_data, tmp_path, monkeypatch):
    import capfilt.model.med as med

    modes = []
    real = med.sample_itm_negatives

    def record(*args, mode="hard", **kwargs):
        modes.append(mode)
        return real(*args, mode=mode, **kwargs)

    monkeypatch.setattr(med, "sample_itm_negatives", record)
    train(_job(synth_data, tmp_path / "run", "train.itm_negatives=random", stop_after=2))
    assert modes == ["random", "random"]


def test_a_warmup_longer_than_the_run_is_said_in_its_log(synth_data, tmp_path):
    """A short run on few samples whose warm-up never ends trains at a fraction of its learning
    rate: the run's log says so (and a run whose warm-up ends does not)."""
    spe = "train.samples_per_epoch=32"  # 4 steps of 8
    train(_job(synth_data, tmp_path / "long", spe, "train.warmup_steps=4", stop_after=1))
    log_text = " ".join((tmp_path / "long" / "train.log").read_text().split())
    assert "train.warmup_steps (4) is not below this run's 4 steps" in log_text
    assert "never reaches train.lr (0.001)" in log_text
    train(_job(synth_data, tmp_path / "short", spe, "train.warmup_steps=3", stop_after=1))
    assert "warmup_steps" not in (tmp_path / "short" / "train.log").read_text()


def test_a_finetune_resumes_from_its_checkpoint_when_its_init_is_gone(synth_data, tmp_path):
    """--init is looked for before a new run's folder exists, but a run resumed from its own
    checkpoint never reads it: moving the pretrain away must not stop the resume."""
    spe = "train.samples_per_epoch=16"
    pre = train(_job(synth_data, tmp_path / "pre", spe))
    recipe = load_recipe("tiny", ["finetune.captioner.samples_per_epoch=32", "data.batch_size=8",
                                  "finetune.captioner.ckpt_every=2"])  # fmt: skip
    job = dict(stage="captioner", recipe=recipe, shards=[str(synth_data / "human")],
               out=tmp_path / "cap", init=pre.parent)  # fmt: skip
    train(TrainJob(**job, stop_after=2))
    (tmp_path / "pre").rename(tmp_path / "pre-moved")
    assert (train(TrainJob(**job, resume="auto")) / CONFIG).is_file()
    with pytest.raises(ConfigError, match="no capfilt model at"):  # a new run still checks it
        train(TrainJob(**{**job, "out": tmp_path / "cap2"}))
    assert not (tmp_path / "cap2").exists()


def test_a_checkpoint_restores_the_cuda_state_of_this_device_only(monkeypatch):
    from capfilt.train import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: restored.append(state.tolist()))
    state = checkpoint.rng_state()
    assert state["cuda"].tolist() == [7]
    checkpoint.set_rng_state(state)
    # a checkpoint of the earlier layout (one state per visible device, saved by rank 0 with 8
    # GPUs visible) restores rank 0's device's state, even where fewer GPUs are visible now
    old = {**state, "cuda": [torch.tensor([d], dtype=torch.uint8) for d in range(8)]}
    checkpoint.set_rng_state(old)
    assert restored == [[7], [0]]


def test_metrics_say_what_share_of_each_window_waited_for_the_loader(
    synth_data, tmp_path, monkeypatch
):
    """``data_wait``: the fraction of a logging window the main process spent blocked on the
    loader's next batch. A loader that sleeps 0.2 s per batch holds most of a tiny model's
    window; each window counts its own waits only."""
    import time

    from capfilt.train import trainer as trainer_mod

    make_loader = trainer_mod.make_loader

    def slow_loader(*args, **kwargs):
        for batch in make_loader(*args, **kwargs):
            time.sleep(0.2)
            yield batch

    train(_job(synth_data, tmp_path / "fast", stop_after=4))
    monkeypatch.setattr(trainer_mod, "make_loader", slow_loader)
    train(_job(synth_data, tmp_path / "slow", stop_after=4))
    fast, slow = (
        [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("fast", "slow")
    )
    assert [x["step"] for x in slow] == [2, 4]
    for record in slow:  # 2 steps of 0.2 s waits in each window, its elapsed time at most ~0.6 s
        elapsed = 2 * 8 / record["samples_per_s"]
        assert record["data_wait"] * elapsed >= 0.4 - 1e-3 and record["data_wait"] <= 1.0
    assert all(0.0 <= x["data_wait"] < y["data_wait"] for x, y in zip(fast, slow))


@pytest.fixture
def on_cpu(monkeypatch):
    """Train on the CPU even where a GPU is visible: a resumed run equals an uninterrupted one to
    the bit where the kernels are deterministic, which capfilt asks for on CPUs only."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resume_after_stop_equals_uninterrupted_run(synth_data, tmp_path, on_cpu):
    train(_job(synth_data, tmp_path / "a", "train.samples_per_epoch=96"))  # 12 steps
    train(_job(synth_data, tmp_path / "b", "train.samples_per_epoch=96", stop_after=5))
    assert not (tmp_path / "b" / "model").exists()
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    with pytest.raises(ConfigError, match="--resume auto"):
        train(_job(synth_data, tmp_path / "b", "train.samples_per_epoch=96"))
    train(_job(synth_data, tmp_path / "b", "train.samples_per_epoch=96", resume="auto"))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines_a] == [x["step"] for x in lines_b] == [2, 4, 6, 8, 10, 12]
    # windows that lie wholly before the stop or after the resume are the same figures
    for x, y in zip(lines_a, lines_b):
        if x["step"] not in (6,):
            assert x["loss"] == y["loss"], x["step"]


def _pretrain_cmd(synth_data, out):
    return [
        sys.executable,
        "-m",
        "capfilt",
        "pretrain",
        "tiny",
        "--shards",
        str(synth_data / "human"),
        "--shards",
        str(synth_data / "web"),
        "--out",
        str(out),
        "--resume",
        "auto",
        "--set",
        "train.epochs=1",
        "--set",
        "train.samples_per_epoch=240",
        "--set",
        "train.ckpt_every=3",
        "--set",
        "data.batch_size=8",
    ]


def test_killed_pretrain_resumes_to_the_same_weights(synth_data, tmp_path):
    # on the CPU even where a GPU is visible (see on_cpu)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        _pretrain_cmd(synth_data, tmp_path / "ref"), check=True, capture_output=True, env=env
    )
    proc = subprocess.Popen(
        _pretrain_cmd(synth_data, tmp_path / "kill"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    latest = tmp_path / "kill" / "checkpoints" / "latest"
    while time.monotonic() < deadline and not (
        latest.is_file() and latest.read_text().strip() >= "step_00000006"
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "kill" / "model").exists(), "the kill should land before the end"
    subprocess.run(
        _pretrain_cmd(synth_data, tmp_path / "kill"), check=True, capture_output=True, env=env
    )
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "kill")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_tiny_pretrain_lowers_every_loss_and_retrieves_above_chance(synth_data, tmp_path):
    from capfilt.eval.retrieval import evaluate_retrieval

    recipe = load_recipe(
        "tiny",
        ["train.epochs=1", "train.samples_per_epoch=4800", "data.batch_size=16", "train.log_every=25", "train.ckpt_every=1000",
         "train.warmup_steps=20", "train.lr=2e-3", "model.alpha=0.0"],
    )  # fmt: skip
    out = tmp_path / "run"
    train(TrainJob(stage="pretrain", recipe=recipe, shards=[str(synth_data / "human")], out=out))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 300
    for part in ("loss_itc", "loss_itm", "loss_lm"):
        first = sum(x[part] for x in lines[:2]) / 2
        last = sum(x[part] for x in lines[-2:]) / 2
        assert last < first, (part, first, last)
    result = evaluate_retrieval(out / "model", str(synth_data / "test"), k=0, batch_size=32)
    n_images = result["n_images"]
    chance_r5 = 100 * 5 / n_images  # text->image: 5 of n images
    assert result["ir_r5"] > 2 * chance_r5, result
    assert result["tr_r5"] > 2 * chance_r5, result


def test_threads_are_chosen_for_the_stage_and_restored(synth_data, tmp_path, monkeypatch):
    from capfilt.utils.threads import available_cores, choose_threads

    with pytest.raises(ConfigError, match="runtime.threads"):
        load_recipe("tiny", ["runtime.threads=-1"])
    assert choose_threads(3, num_workers=2) == 3  # asked for: taken as is
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose_threads(0, num_workers=2) == 5  # auto honours an explicit environment
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cores = available_cores()
    assert choose_threads(0) == max(1, cores - 1)  # one core left for the rest
    assert choose_threads(0, num_workers=1) == max(1, cores - 2)
    assert choose_threads(0, num_workers=cores + 4) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # a rank per core: one thread each
    assert choose_threads(0) == 1

    before = torch.get_num_threads()
    train(
        _job(synth_data, tmp_path / "run", "runtime.threads=2", "data.num_workers=0", stop_after=1)
    )
    assert torch.get_num_threads() == before
    assert "2 intra-op threads, 0 loader workers" in (tmp_path / "run" / "train.log").read_text()


def test_train_compile_wraps_the_step_module_lazily():
    from contextlib import nullcontext

    from capfilt.train.trainer import STAGE_LOSSES, sync_unless_last, wrap_for_training
    from capfilt.utils.dist import DistInfo

    assert load_recipe("tiny").train.compile is False  # off unless asked for
    assert load_recipe("tiny", ["train.compile=true"]).train.compile is True
    model = torch.nn.Linear(2, 2)
    plain = wrap_for_training(model, STAGE_LOSSES["pretrain"], DistInfo(), torch.device("cpu"))
    assert plain is model  # one process: no DDP, no wrapper
    compiled = wrap_for_training(
        model, STAGE_LOSSES["pretrain"], DistInfo(), torch.device("cpu"), compile=True
    )
    assert compiled is not model and compiled._orig_mod is model  # compiles on first call only
    assert isinstance(sync_unless_last(compiled, 0, 2), nullcontext)  # nothing to hold back


def test_resume_accepts_another_thread_count_but_not_another_recipe(tmp_path):
    from capfilt.config import ConfigError, load_recipe, to_dict
    from capfilt.runs.run_folder import RunFolder

    recipe = to_dict(load_recipe("tiny", ["runtime.threads=1"]))
    RunFolder(tmp_path / "run").prepare({"stage": "pretrain", "recipe": recipe}, "never")
    more_threads = to_dict(load_recipe("tiny", ["runtime.threads=2"]))
    assert RunFolder(tmp_path / "run").prepare(
        {"stage": "pretrain", "recipe": more_threads}, "auto"
    )
    other_lr = to_dict(load_recipe("tiny", ["runtime.threads=1", "train.lr=0.123"]))
    with pytest.raises(ConfigError, match="different stage or recipe"):
        RunFolder(tmp_path / "run").prepare({"stage": "pretrain", "recipe": other_lr}, "auto")


def test_resume_refuses_another_number_of_processes(tmp_path):
    """2 ranks of batch b train with global batch 2b: a 1-process resume would halve it mid-run."""
    from capfilt.config import ConfigError, load_recipe, to_dict
    from capfilt.runs.run_folder import RunFolder

    run = {"stage": "pretrain", "recipe": to_dict(load_recipe("tiny")), "world_size": 2}
    RunFolder(tmp_path / "run").prepare(run, "never")
    assert RunFolder(tmp_path / "run").prepare(run, "auto")
    with pytest.raises(
        ConfigError, match=r"trained by 2 process\(es\), this one has 1: resume it with 2"
    ):
        RunFolder(tmp_path / "run").prepare({**run, "world_size": 1}, "auto")


@pytest.mark.parametrize(
    ("command", "target"),
    [
        (
            ["caption", "tiny", "--model", "m", "--shards", "s", "--out", "o"],
            "capfilt.pipeline.caption.caption_shards",
        ),
        (
            ["filter", "tiny", "--model", "m", "--shards", "s", "--out", "o"],
            "capfilt.pipeline.filter.filter_shards",
        ),
    ],
)
def test_inference_stages_run_with_the_recipes_thread_count(command, target, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from capfilt.cli.main import app

    seen = []

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise RuntimeError("recorded")

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(__import__(module, fromlist=[name]), name, record)
    before = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--set", "runtime.threads=3"])
    assert seen == [3], result.output
    assert torch.get_num_threads() == before


def test_logged_means_are_the_step_sums_over_the_window_and_a_nan_stops_training():
    """The trainer sums each step's losses on the device and reads them once per logged window."""
    window = {"loss": torch.tensor(6.0), "loss_itc": torch.tensor(1.5)}  # 3 steps summed
    assert finite_means(window, 3) == {"loss": 2.0, "loss_itc": 0.5}
    assert finite_means({}, 1) == {}
    with pytest.raises(FloatingPointError, match="non-finite loss in the last 2 step"):
        finite_means({"loss": torch.tensor(float("nan"))}, 2)
