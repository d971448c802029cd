"""Training checkpoints: a self-describing model folder plus the trainer state beside it.

    checkpoints/step_00000200/  a model folder (model/folder.py: weights, config, tokenizer, meta)
                                trainer_state.pt  (optimizer, RNG, step/epoch: tensors and plain types only)
    checkpoints/latest          name of the newest complete checkpoint

The trainer state is loaded with ``torch.load(weights_only=True)``: no pickled code is executed.
A checkpoint is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from capfilt.model import load_model_folder, save_model_folder
from capfilt.runs.run_folder import RunFolder


def rng_state() -> dict[str, Any]:
    """The random states a resumed run continues from: torch's CPU generator, Python's, and the
    CUDA generator of the current device (this rank's GPU). Every rank starts from the same seed
    and draws the same shapes, so rank 0's state, which the checkpoint keeps, is every rank's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; the CUDA state goes to the current device only (not one state
    per device: a rank uses one GPU, and a resume may see fewer GPUs than the run that saved)."""
    torch.set_rng_state(state["torch"])
    version = random.getstate()[0]
    random.setstate((version, tuple(state["python"]), None))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints before: one state per visible device,
            cuda = cuda[0] if cuda else None  # of which rank 0 (on device 0) advanced the first
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def save_checkpoint(
    run: RunFolder,
    *,
    model,
    tokenizer,
    model_cfg,
    stage: str,
    optimizer: torch.optim.Optimizer,
    trainer: dict[str, Any],
    keep: int = 2,
    preprocess: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step_{step:08d}``, point ``latest`` at it, keep the newest ``keep``."""
    name = f"step_{trainer['step']:08d}"
    final = run.checkpoints / name
    tmp = run.checkpoints / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(
        tmp,
        model,
        tokenizer,
        model_cfg,
        stage,
        extra={"step": trainer["step"]},
        preprocess=preprocess,
    )
    torch.save(
        {"optimizer": optimizer.state_dict(), "rng": rng_state(), "trainer": trainer},
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    run.set_latest(final)
    done = sorted(p for p in run.checkpoints.glob("step_*") if (p / "trainer_state.pt").is_file())
    for old in done[: max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, model_cfg, meta, trainer_state) of a checkpoint folder."""
    model, tokenizer, model_cfg, meta = load_model_folder(path, device=device)
    state = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=True)
    return model, tokenizer, model_cfg, meta, state
