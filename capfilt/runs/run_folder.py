"""Run folders: resolved ``config.yaml``, ``metrics.jsonl``, a log, ``checkpoints/`` and ``latest``.

A run folder is never overwritten by accident: starting a stage in a folder that already holds a
run needs ``--resume auto`` (continue it) or a new ``--out``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from capfilt.config import ConfigError, dump_yaml, recipe_identity
from capfilt.utils.dist import DistInfo
from capfilt.utils.files import atomic_write_bytes
from capfilt.utils.lock import folder_lock


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.log_path = self.path / "train.log"
        self.checkpoints = self.path / "checkpoints"
        self.latest_path = self.checkpoints / "latest"
        self.model_dir = self.path / "model"

    def lock(self, dist: DistInfo | None = None):
        """Hold the folder for one training job (a second one on it fails at once); a context manager."""
        return folder_lock(self.path, dist)

    def exists(self) -> bool:
        return self.config_path.is_file()

    def prepare(self, run_config: dict[str, Any], resume: str) -> bool:
        """Create or re-open the folder; True when an existing run is continued.

        ``resume``: ``never`` refuses an existing run, ``auto`` continues it when its config
        matches (only the shard lists and progress-unrelated fields may differ).
        """
        if self.exists():
            if resume != "auto":
                raise ConfigError(
                    f"{self.path} already holds a run; pass --resume auto to continue it, or choose another --out"
                )
            saved = yaml.safe_load(self.config_path.read_text()) or {}
            same_recipe = recipe_identity(saved.get("recipe") or {}) == recipe_identity(
                run_config.get("recipe") or {}
            )
            if not same_recipe or saved.get("stage") != run_config.get("stage"):
                raise ConfigError(
                    f"{self.path} holds a run with a different stage or recipe; use a new --out to start another run"
                )
            was, now = saved.get("world_size"), run_config.get("world_size")
            if was is not None and now is not None and was != now:
                # the global batch is data.batch_size per process: another count would change it,
                # the schedule's steps and the order the data is read in, half-way through
                raise ConfigError(
                    f"{self.path} holds a run trained by {was} process(es), this one has {now}: "
                    f"resume it with {was} (torchrun --nproc_per_node {was}, or {was} ranks over "
                    "several nodes), or start another run with a new --out"
                )
            return True
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        atomic_write_bytes(self.config_path, dump_yaml(run_config).encode())
        return False

    def recipe_name(self) -> str | None:
        """The name of the recipe this run was made with (None: no run here, or unreadable)."""
        try:
            saved = yaml.safe_load(self.config_path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        name = (saved.get("recipe") or {}).get("name") if isinstance(saved, dict) else None
        return name if isinstance(name, str) else None

    def latest_checkpoint(self) -> Path | None:
        try:
            name = self.latest_path.read_text().strip()
        except OSError:
            return None
        path = self.checkpoints / name
        return path if (path / "trainer_state.pt").is_file() else None

    def set_latest(self, checkpoint: Path) -> None:
        atomic_write_bytes(self.latest_path, (checkpoint.name + "\n").encode())

    def log_metrics(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past ``after_step`` (written after the checkpoint a resume starts from)."""
        if not self.metrics_path.is_file():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= after_step
        ]
        atomic_write_bytes(self.metrics_path, ("\n".join(kept) + "\n" if kept else "").encode())
