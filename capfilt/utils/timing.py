"""Where a loop's wall time goes: seconds per named phase of the thread that runs it.

Why: a GPU stage runs only as fast as its main process hands batches over. When it is slow, the
question at 2 a.m. is which part holds it up: waiting for the loader's images, the model (on a
GPU: waiting for the device), writing the output, or publishing shards. The stages time those
phases and say which one set the rate (:func:`~capfilt.data.stage.run_shard_stage`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


class PhaseClock:
    """Wall seconds spent in each named phase (``seconds``), in the order phases first ran.

    Phases are timed on one thread and must not nest: each second counts in one phase only.
    ``now``: the clock read (seconds).
    """

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.seconds: dict[str, float] = {}
        self.now = now
        self._open: tuple[str, float] | None = None
        """The phase running now and when it started: :meth:`shares` counts it up to now (a
        shard's progress line is printed while its stage still waits in "publishing")."""

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as ``name`` (also when it raises)."""
        started = self.now()
        self._open = (name, started)
        try:
            yield
        finally:
            self._open = None
            self.add(name, self.now() - started)

    def timed(self, name: str, items: Iterable[T], first_as: str | None = None) -> Iterator[T]:
        """``items``, each wait for the next one timed as ``name`` (the loop body is not).

        ``first_as``: the clock's very first wait for ``name`` counts as that phase instead (a
        loader's start-up: its processes starting and decoding their first images, which more
        processes would not shorten)."""
        iterator, end = iter(items), object()
        while True:
            phase = name
            if first_as is not None and name not in self.seconds and first_as not in self.seconds:
                phase = first_as
            with self.phase(phase):
                item = next(iterator, end)
            if item is end:
                return
            yield item

    def largest(self) -> str | None:
        """The phase that took the most time (None before any ran)."""
        return max(self.seconds, key=self.seconds.__getitem__) if self.seconds else None

    def shares(self, total: float) -> dict[str, float]:
        """Each phase's fraction of ``total`` seconds, largest first, and last ``"rest"``: what
        no phase covers."""
        total = max(total, 1e-9)
        seconds = dict(self.seconds)
        if self._open is not None:
            name, started = self._open
            seconds[name] = seconds.get(name, 0.0) + self.now() - started
        ranked = sorted(seconds.items(), key=lambda item: -item[1])
        out = {name: s / total for name, s in ranked}
        out["rest"] = max(0.0, 1.0 - sum(out.values()))
        return out

    def describe(self, total: float) -> str:
        """``"images 62%, model 30%, writing 5%, rest 3%"``: the phases' shares of ``total``,
        largest first."""
        return ", ".join(f"{name} {share:.0%}" for name, share in self.shares(total).items())
