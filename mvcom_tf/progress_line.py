"""A periodic progress line for long work outside training (detection, embedding, rendering synthetic data), in
the training log's form: `[task] done/total units, rate units/s, ETA hh:mm:ss` through absl logging, at most every
few seconds."""

from __future__ import annotations

import time

from absl import logging


class ProgressLine:
    """Counts finished items and logs a line with the count, the rate and the ETA (none when the total is unknown)."""

    def __init__(self, task: str, total: int | None, unit: str = "images", every_seconds: float = 10.0) -> None:
        self.task, self.total, self.unit, self.every = task, total, unit, every_seconds
        self.done, self.start = 0, time.perf_counter()
        self.logged = self.start

    def advance(self, count: int) -> None:
        """Adds `count` finished items; logs when --every_seconds have passed since the last line, or at the end."""
        self.done += count
        now = time.perf_counter()
        if now - self.logged >= self.every or (self.total is not None and self.done >= self.total):
            self.logged = now
            logging.info("%s", self.line(now))

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        if self.total is None:
            return f"[{self.task}] {self.done:,} {self.unit}, {rate:.1f} {self.unit}/s"
        eta = time.strftime("%H:%M:%S", time.gmtime(max(self.total - self.done, 0) / max(rate, 1e-9)))
        return f"[{self.task}] {self.done:,}/{self.total:,} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta}"
