"""The training loop shared by ``pretrain`` and ``finetune captioner|filter``.

    capfilt pretrain demo --shards data/human --shards data/web --out runs/pretrain
    torchrun --nproc_per_node 2 -m capfilt pretrain demo --shards ... --out runs/pretrain

One process: plain CPU/GPU training. Under torchrun: every rank holds a full model wrapped in
``DistributedDataParallel``, ITC momentum features and ITM negatives come from the global batch
(inside the model), and DDP averages the gradients in buckets while backward runs (only on the
last micro-batch of an accumulated step), so a run on W ranks with batch b takes the same steps as
one process with batch W·b (docs/architecture.md "Scale").
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capfilt.config import ConfigError, Recipe, TrainConfig, to_dict
from capfilt.data.reader import read_caption_texts
from capfilt.data.transforms import TrainTransform, preprocess_spec
from capfilt.model import (
    build_model,
    build_tokenizer,
    check_image_ids,
    load_model_folder,
    prompt_length,
    save_model_folder,
    tokenize_with_prompt,
)
from capfilt.runs.resolve import resolve_model_dir
from capfilt.runs.run_folder import RunFolder
from capfilt.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from capfilt.train.data import Source, TrainStream, build_sources, check_sources, make_loader
from capfilt.train.optim import build_optimizer, lr_at, set_lr
from capfilt.utils.device import autocast, default_device, to_device
from capfilt.utils.dist import DistInfo, barrier, init_distributed, mean_over_ranks
from capfilt.utils.files import atomic_write_json
from capfilt.utils.logging import get_logger, setup_logging
from capfilt.utils.progress import ProgressReporter
from capfilt.utils.threads import use_threads
from capfilt.utils.timing import PhaseClock

log = get_logger("train")

STAGE_LOSSES = {"pretrain": ("itc", "itm", "lm"), "captioner": ("lm",), "filter": ("itc", "itm")}
"""Losses per stage (docs/architecture.md §3: the captioner fine-tunes with LM only, the filter with ITC + ITM)."""

SKIPPED_FILE = "skipped.json"
"""Run-folder file with the counts of bad input samples met while training, by reason."""

TOKENIZER_TEXTS = 200_000
"""Captions read to train a WordPiece tokenizer (plenty for a vocabulary of a few thousand)."""


@dataclass
class TrainJob:
    """What to train, on what, where."""

    stage: str
    recipe: Recipe
    shards: list[str]
    out: Path
    init: Path | None = None
    resume: str = "never"
    stop_after: int | None = None
    """Stop after this optimiser step (the schedule still spans the whole run): for tests and benchmarks."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_cfg(self) -> TrainConfig:
        if self.stage == "pretrain":
            return self.recipe.train
        return getattr(self.recipe.finetune, self.stage)


def _tokenizer_texts(sources: list[Source], limit: int = TOKENIZER_TEXTS):
    count = 0
    for source in sources:
        for text in read_caption_texts(source.urls):
            yield text
            count += 1
            if count >= limit:
                return


def wrap_for_training(
    model: nn.Module,
    losses: tuple[str, ...],
    info: DistInfo,
    device: torch.device,
    compile: bool = False,
) -> nn.Module:
    """The module a training step calls: ``model`` itself, or DDP around it under torchrun; compiled
    with ``torch.compile`` when asked. ``MED.forward`` is ``forward_pretrain``.

    Fine-tune stages leave parts of the model out of the loss (docs/architecture.md §3: the
    captioner has no ITC/ITM heads or encoder self-attention in its graph, the filter no decoder
    self-attention or LM head), so DDP looks for unused parameters there; their gradients stay
    None on every rank and AdamW skips them, as in a single process. Buffers (the ITC queues) are
    filled from the global batch identically on every rank, so DDP does not re-broadcast them.

    BatchNorm (``model.vision_stem``) becomes SyncBatchNorm on CUDA, so its statistics are the
    global batch's as in one process; torch syncs them on accelerators only, so CPU ranks (gloo)
    normalise by their own part of the batch and save rank 0's running statistics.
    """
    module: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place

        module = DistributedDataParallel(
            model,
            # no device_ids: the trainer puts each input where it belongs, and DDP with device_ids
            # would copy every tensor argument to the GPU, the image ids that are checked on the
            # host included (two host syncs per micro-step then)
            device_ids=None,
            **_no_buffer_sync(DistributedDataParallel),
            # a fine-tune leaves out the same parameters at every step, but static_graph=True,
            # DDP's way to learn them once, is not an option: under no_sync() (train.grad_accum)
            # its first backward fails an internal assert (torch 2.14, pytorch/pytorch#187732)
            find_unused_parameters=set(losses) != set(STAGE_LOSSES["pretrain"]),
        )
    if compile:
        # compile outside DDP so that its optimiser splits graphs at bucket boundaries
        module = torch.compile(module)
    return module


def _no_buffer_sync(ddp_class) -> dict[str, bool]:
    """DDP's option to leave buffers unsynchronised at each forward: ``forward_sync_buffers``
    since torch 2.13, which warns (on every rank) at the older ``broadcast_buffers``."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(ddp_class).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def sync_unless_last(module: nn.Module, micro: int, grad_accum: int):
    """``no_sync()`` for every micro-batch but the last of an accumulated step: gradients are
    all-reduced once per optimiser step, during the last backward."""
    ddp = getattr(module, "_orig_mod", module)  # under torch.compile
    if micro < grad_accum - 1 and hasattr(ddp, "no_sync"):
        return ddp.no_sync()
    return nullcontext()


class Trainer:
    def __init__(self, job: TrainJob):
        if job.stage not in STAGE_LOSSES:
            raise ConfigError(
                f"unknown training stage '{job.stage}' (one of {', '.join(STAGE_LOSSES)})"
            )
        self.job = job
        self.cfg = job.train_cfg
        self.recipe = job.recipe
        self.dist: DistInfo = init_distributed()
        self.device = default_device()
        self.run = RunFolder(job.out)
        self.losses = STAGE_LOSSES[job.stage]
        self.skipped: Counter[str] = Counter()
        """Bad input met by the batches trained on so far (this rank's share), by reason."""

    # -- set-up ---------------------------------------------------------------------------------

    def _run_config(self) -> dict[str, Any]:
        return {
            "stage": self.job.stage,
            "shards": list(self.job.shards),
            "init": str(self.job.init) if self.job.init else None,
            "world_size": self.dist.world_size,
            "recipe": to_dict(self.recipe),
        }

    def _prepare_folder(self) -> bool:
        resumed = False
        if self.dist.is_main:
            resumed = self.run.prepare(self._run_config(), self.job.resume)
        barrier()
        if not self.dist.is_main:
            resumed = self.run.exists() and self.job.resume == "auto"
        setup_logging(log_file=self.run.log_path, rank=self.dist.rank)
        return resumed

    def _build(self, sources: list[Source]):
        mcfg = self.recipe.model
        if self.job.init is not None:
            model, tokenizer, mcfg, meta = load_model_folder(
                resolve_model_dir(self.job.init), device="cpu"
            )
            log.info("initialised from %s (stage %s)", self.job.init, meta.get("stage"))
            return model, tokenizer, mcfg
        tok_dir = self.run.path / "tokenizer"
        if self.dist.is_main and not tok_dir.is_dir():
            texts = None if mcfg.tokenizer else _tokenizer_texts(sources)
            tokenizer = build_tokenizer(mcfg, texts)
            tokenizer.save_pretrained(str(tok_dir))
            log.info("tokenizer: %d tokens, saved to %s", len(tokenizer), tok_dir)
        barrier()
        from capfilt.model import load_tokenizer

        tokenizer = load_tokenizer(str(tok_dir))
        torch.manual_seed(self.recipe.seed)  # identical initial weights on every rank
        return build_model(mcfg, tokenizer), tokenizer, mcfg

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> Path:
        data_cfg = self.recipe.data
        with use_threads(self.recipe.runtime.threads, data_cfg.num_workers) as threads:
            return self._fit(threads)

    def _fit(self, threads: int) -> Path:
        job, cfg, data_cfg = self.job, self.cfg, self.recipe.data
        # the shards and the model to start from are checked before the run folder exists, so a
        # fixed command can be re-run (a folder made with the typo would be refused as another run)
        sources = build_sources(job.shards, data_cfg.weights or None)
        check_sources(sources)
        if job.init is not None and (job.resume != "auto" or self.run.latest_checkpoint() is None):
            resolve_model_dir(job.init)  # (a run resumed from a checkpoint does not read --init)
        samples_per_epoch = cfg.samples_per_epoch
        if samples_per_epoch <= 0:
            from capfilt.data.sample_counts import sample_count

            counts = [
                s.samples if s.samples is not None else sample_count(s.urls).samples
                for s in sources
            ]
            if any(n is None for n in counts):
                key = "train" if job.stage == "pretrain" else f"finetune.{job.stage}"
                raise ConfigError(
                    f"{key}.samples_per_epoch: the size of a remote source is unknown (no "
                    "sizes.json beside its shards); set it explicitly"
                )
            samples_per_epoch = int(sum(counts))  # type: ignore[arg-type]
        resumed = self._prepare_folder()
        log.info("%d intra-op threads, %d loader workers", threads, data_cfg.num_workers)
        global_batch = data_cfg.batch_size * self.dist.world_size
        steps_per_epoch = max(1, samples_per_epoch // (global_batch * cfg.grad_accum))
        total_steps = cfg.epochs * steps_per_epoch
        ramp_steps = max(1, int(cfg.alpha_ramp_epochs * steps_per_epoch))
        if cfg.warmup_steps >= total_steps and cfg.warmup_lr < cfg.lr and self.dist.is_main:
            section = "train" if job.stage == "pretrain" else f"finetune.{job.stage}"
            log.warning(
                "%s.warmup_steps (%d) is not below this run's %d steps: the learning rate "
                "never reaches %s.lr (%g); lower warmup_steps or train for more steps",
                section, cfg.warmup_steps, total_steps, section, cfg.lr,
            )  # fmt: skip

        checkpoint = self.run.latest_checkpoint() if resumed else None
        random.seed(self.recipe.seed)
        if checkpoint is not None:
            model, tokenizer, mcfg, _, state = load_checkpoint(checkpoint)
            step = int(state["trainer"]["step"])
            self.skipped = Counter(state["trainer"].get("skipped", {}))
            log.info("resuming from %s (step %d of %d)", checkpoint, step, total_steps)
        else:
            model, tokenizer, mcfg = self._build(sources)
            state, step = None, 0
        model.to(self.device).train()
        optimizer = build_optimizer(model, cfg)
        step_module = wrap_for_training(
            model, self.losses, self.dist, self.device, compile=cfg.compile
        )
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            if self.dist.is_main:
                self.run.truncate_metrics(step)
        params = [p for p in model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        log.info(
            "%s: %d steps (%d epochs x %d), global batch %d, %.2fM trainable parameters, device %s, world %d",
            job.stage,
            total_steps,
            cfg.epochs,
            steps_per_epoch,
            global_batch * cfg.grad_accum,
            n_params / 1e6,
            self.device,
            self.dist.world_size,
        )
        prompt = self.recipe.caption.prompt if job.stage == "captioner" else ""
        prompt_len = prompt_length(tokenizer, prompt)
        transform = TrainTransform(
            mcfg.image_size, data_cfg.crop_scale, data_cfg.hflip, data_cfg.mean, data_cfg.std
        )
        last = total_steps if job.stop_after is None else min(total_steps, job.stop_after)

        window: dict[str, float] = {}
        window_n, window_start = 0, time.monotonic()
        # the main process's time blocked on the loader's next batch, per logging window: how far
        # the loader falls behind the model (data_wait in metrics.jsonl)
        loader_clock = PhaseClock()
        progress = ProgressReporter(
            f"{job.stage}",
            total=(last - step) * global_batch * cfg.grad_accum,
            enabled=self.dist.is_main,
        )
        with progress:
            while step < last:
                epoch, in_epoch = divmod(step, steps_per_epoch)
                stream = TrainStream(
                    sources,
                    transform,
                    batch_size=data_cfg.batch_size,
                    seed=self.recipe.seed,
                    epoch=epoch,
                    skip_batches=in_epoch * cfg.grad_accum,
                    rank=self.dist.rank,
                    world_size=self.dist.world_size,
                    shuffle_buffer=data_cfg.shuffle_buffer,
                    max_words=data_cfg.max_words,
                )
                batches = loader_clock.timed(
                    "data",
                    make_loader(
                        stream,
                        data_cfg.num_workers,
                        seed=self.recipe.seed + epoch,
                        pin_memory=self.device.type == "cuda",
                    ),
                )
                epoch_end = min(last, (epoch + 1) * steps_per_epoch)
                while step < epoch_end:
                    lr = lr_at(step, cfg, steps_per_epoch)
                    set_lr(optimizer, lr)
                    alpha = mcfg.alpha * min(1.0, step / ramp_steps)
                    parts = self._step(
                        model,
                        step_module,
                        tokenizer,
                        mcfg,
                        batches,
                        transform,
                        optimizer,
                        params,
                        alpha,
                        prompt,
                        prompt_len,
                        step,
                    )
                    step += 1
                    # summed on the device: a float() per step would wait for the GPU each step
                    for key, value in parts.items():
                        window[key] = window[key] + value if key in window else value
                    window_n += 1
                    progress.advance(global_batch * cfg.grad_accum, lr=lr)
                    if step % cfg.log_every == 0 or step == total_steps:
                        elapsed = time.monotonic() - window_start
                        record = finite_means(window, window_n)
                        data_wait = loader_clock.seconds.get("data", 0.0) / max(elapsed, 1e-9)
                        progress.advance(0, loss=record["loss"], data_wait=round(data_wait, 2))
                        record.update(
                            step=step,
                            epoch=epoch,
                            lr=lr,
                            alpha=alpha,
                            temp=float(model.temp.item()),
                            samples_per_s=window_n
                            * global_batch
                            * cfg.grad_accum
                            / max(elapsed, 1e-9),
                            data_wait=data_wait,
                        )
                        if self.dist.is_main:
                            self.run.log_metrics(record)
                            if not progress.shows_bar:
                                log.info(
                                    "step %d/%d %s",
                                    step,
                                    total_steps,
                                    " ".join(
                                        f"{k}={v:.4g}"
                                        for k, v in record.items()
                                        if k.startswith("loss")
                                    ),
                                )
                        window, window_n, window_start = {}, 0, time.monotonic()
                        loader_clock.seconds.clear()
                    if step % cfg.ckpt_every == 0 or step == last:
                        if window_n:  # steps not logged yet: no checkpoint of a diverged model
                            finite_means(window, window_n)
                        self._checkpoint(model, tokenizer, mcfg, optimizer, step)
                del batches
        if step >= total_steps and self.dist.is_main:
            save_model_folder(
                self.run.model_dir,
                model,
                tokenizer,
                mcfg,
                job.stage,
                extra={"steps": step, "run": str(self.run.path)},
                preprocess=self._preprocess(mcfg),
            )
            self._save_skipped()
            log.info("%s done: model in %s", job.stage, self.run.model_dir)
        barrier()
        return self.run.model_dir

    def _step(
        self,
        model,
        step_module,
        tokenizer,
        mcfg,
        batches,
        transform: TrainTransform,
        optimizer,
        params,
        alpha,
        prompt,
        prompt_len,
        step,
    ) -> dict[str, torch.Tensor]:
        """One optimiser step; returns its losses (and ``grad_norm``) as 0-dim tensors on the
        device, so that nothing here waits for the GPU."""
        cfg = self.cfg
        optimizer.zero_grad(set_to_none=True)
        model.clamp_temp()
        totals: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            # ITM negatives from a generator keyed by (seed, step): the same on every rank and after a resume
            generator = torch.Generator(self.device).manual_seed(
                self.recipe.seed * 1_000_003 + step * 131 + micro
            )
            batch = next(batches)
            if cfg.compile:  # the compiled model leaves its data checks out (graph breaks)
                # one process holds the whole batch; across ranks only the model could tell
                check_image_ids(
                    batch["image_ids"],
                    distinct="itm" in self.losses and not self.dist.distributed,
                )
            self.skipped.update(batch.get("skips", {}))
            ids, mask = tokenize_with_prompt(tokenizer, batch["texts"], mcfg.max_text_len, prompt)
            with sync_unless_last(step_module, micro, cfg.grad_accum):
                with autocast(self.device, cfg.precision):
                    out = step_module(
                        transform.normalize(to_device(batch["images"], self.device)),
                        to_device(ids, self.device),
                        to_device(mask, self.device),
                        image_ids=batch["image_ids"],  # checked on the host, then copied
                        alpha=alpha,
                        weights=self.losses,
                        prompt_len=prompt_len,
                        generator=generator,
                        itm_negatives=cfg.itm_negatives,
                    )
                (out["loss"] / cfg.grad_accum).backward()
            for key, value in out.items():
                if key.startswith("loss") and torch.is_tensor(value):
                    part = value.detach().float() / cfg.grad_accum
                    totals[key] = totals[key] + part if key in totals else part
        if cfg.clip_grad > 0:
            totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad).detach()
        optimizer.step()
        if "itc" in self.losses or "itm" in self.losses:
            model.momentum_update()
        return totals

    def _preprocess(self, mcfg) -> dict[str, Any]:
        """The image preprocessing this run trains with, saved in every model folder it writes."""
        data_cfg = self.recipe.data
        return preprocess_spec(mcfg.image_size, data_cfg.mean, data_cfg.std)

    def _checkpoint(self, model, tokenizer, mcfg, optimizer, step: int) -> None:
        if self.dist.is_main:
            save_checkpoint(
                self.run,
                model=model,
                tokenizer=tokenizer,
                model_cfg=mcfg,
                stage=self.job.stage,
                optimizer=optimizer,
                trainer={"step": step, "skipped": dict(self.skipped)},
                keep=self.cfg.keep_checkpoints,
                preprocess=self._preprocess(mcfg),
            )
            self._save_skipped()
        barrier()

    def _save_skipped(self) -> None:
        """``skipped.json`` in the run folder: the bad input counts of the batches trained on (of
        rank 0's share under torchrun), with ``truncated_tar``/``unreadable_shard`` counted each
        time the stream met such a tar."""
        atomic_write_json(self.run.path / SKIPPED_FILE, dict(sorted(self.skipped.items())))


def finite_means(window: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    """The means over ``n`` steps of the summed step values in ``window`` (one host sync for all),
    averaged over the ranks under torchrun (each rank's losses are its share of the global batch,
    and every rank must agree whether training diverged); ``FloatingPointError`` when one is not
    finite (training diverged in these steps)."""
    keys = list(window)
    values = (
        mean_over_ranks(torch.stack([window[k].float() for k in keys])).cpu().tolist()
        if keys
        else []
    )
    means = {k: v / n for k, v in zip(keys, values)}
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(
            f"non-finite loss in the last {n} step(s): {means}; lower train.lr or enable "
            "train.clip_grad"
        )
    return means


@contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """torch's deterministic kernels while training on CPU, the previous setting restored after.

    With more than one intra-op thread, the default CPU kernels of some ops (measured: two 2-thread
    runs of the tiny recipe differ by up to 1e-5 after 16 steps) sum in a varying order, so two
    runs, or a resumed run and an uninterrupted one, differ in the last bits. With them on, those
    runs are bit-identical. On GPU the fast kernels stay: cuBLAS's deterministic mode needs a
    workspace setting made before CUDA starts, and bf16 autocast already rounds far above this.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def train(job: TrainJob) -> Path:
    """Run a training stage; returns the final model folder."""
    trainer = Trainer(job)
    with trainer.run.lock(trainer.dist), deterministic_on_cpu(trainer.device):
        return trainer.fit()
