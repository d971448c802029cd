"""Training on CPU runs with torch's deterministic kernels (two runs, or a resumed and an
uninterrupted one, are then bit-identical whatever the thread count) and leaves the process's
setting as it found it."""

from __future__ import annotations

import torch

from capfilt.config import load_recipe
from capfilt.train import trainer as trainer_module


def test_training_on_cpu_uses_deterministic_kernels_and_restores_the_setting(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        trainer_module.Trainer,
        "fit",
        lambda self: seen.append((self.device.type, torch.are_deterministic_algorithms_enabled())),
    )
    monkeypatch.setattr(trainer_module, "default_device", lambda: torch.device("cpu"))
    job = trainer_module.TrainJob(
        stage="pretrain", recipe=load_recipe("tiny"), shards=[], out=tmp_path / "run"
    )
    assert not torch.are_deterministic_algorithms_enabled()
    trainer_module.train(job)
    assert seen == [("cpu", True)]
    assert not torch.are_deterministic_algorithms_enabled()
