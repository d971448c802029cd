"""Progress for long work: a rich bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from capfilt.utils.logging import get_logger

log = get_logger("progress")


class ProgressReporter:
    """``advance(n, **metrics)`` per unit of work; rank 0 shows it, other ranks stay quiet.

    On a terminal: a rich bar with rate and ETA. Otherwise: a log line every ``log_interval``
    seconds with the same figures, so cluster logs stay readable.
    """

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "samples",
        enabled: bool = True,
        log_interval: float = 30.0,
        use_bar: bool | None = None,
    ):
        self.desc = desc
        self.total = total
        self.unit = unit
        self.enabled = enabled
        self.log_interval = log_interval
        self.done = 0
        self.metrics: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last_log = self._start
        self._logged = 0
        self._bar = None
        self._task = None
        if use_bar is None:
            use_bar = sys.stderr.isatty()
        if enabled and use_bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                transient=False,
            )

    def __enter__(self) -> ProgressReporter:
        if self._bar is not None:
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, rate="", metrics="")
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and self.done and self.done != self._logged:
            # the closing line, unless the last periodic line already said the same
            self._log_line(final=True)

    @property
    def shows_bar(self) -> bool:
        """True when progress is drawn as a bar (so periodic log lines would only repeat it)."""
        return self._bar is not None

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _metrics_text(self) -> str:
        parts = []
        for key, value in self.metrics.items():
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(parts)

    def _log_line(self, final: bool = False) -> None:
        self._logged = self.done
        rate = self.rate
        total = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and not final:
            eta = f" eta {max(0.0, (self.total - self.done) / rate):.0f}s"
        log.info(
            "%s: %d%s %s, %.1f %s/s%s %s",
            self.desc,
            self.done,
            total,
            self.unit,
            rate,
            self.unit,
            eta,
            self._metrics_text(),
        )

    def advance(self, n: int = 1, **metrics: Any) -> None:
        self.done += n
        self.metrics.update(metrics)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(
                self._task,
                advance=n,
                rate=f"{self.rate:.1f} {self.unit}/s",
                metrics=self._metrics_text(),
            )
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            self._last_log = now
            self._log_line()
