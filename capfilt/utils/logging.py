"""Logging set-up and a rate-limited logger for per-sample warnings."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

LOGGER_NAME = "capfilt"


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_logging(
    level: str | int = "INFO", log_file: str | Path | None = None, rank: int = 0
) -> None:
    """Log to stderr (rank 0 only, others warn and above) and, when given, to a file."""
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_capfilt", False):
            root.removeHandler(handler)
            handler.close()
    fmt = logging.Formatter(
        f"%(asctime)s {'' if rank == 0 else f'[rank {rank}] '}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    console._capfilt = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(fmt)
        file_handler._capfilt = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)
    root.propagate = False


class RateLimitedLog:
    """Logs at most ``burst`` messages, then one per ``interval`` seconds, counting the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 30.0):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self._sent = 0
        self._suppressed = 0
        self._last = 0.0

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        if self._sent < self.burst or now - self._last >= self.interval:
            if self._suppressed:
                msg = f"{msg} (+{self._suppressed} similar messages suppressed)"
                self._suppressed = 0
            self.logger.warning(msg, *args)
            self._sent += 1
            self._last = now
        else:
            self._suppressed += 1
