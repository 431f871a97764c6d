"""The periodic progress line (step, loss, lr, images/s, ETA) and the stage's TensorBoard summaries."""

from __future__ import annotations

import time

import tensorflow as tf
from absl import logging

from mvcom_tf.data import figures
from mvcom_tf.data.tfrecord import DatasetInfo
from mvcom_tf.training.metrics import StepOutput, StepSums, accumulate, to_numpy


class Progress:
    """Adds up a stage's step outputs; every report logs a line and writes the scalars, histograms and
    pictures of the steps since the last one. `totals` covers the whole stage (since this process started it)."""

    def __init__(self, stage, total_steps: int, first_step: int, writer) -> None:
        self.stage, self.total_steps, self.writer = stage, total_steps, writer
        self.sums: StepSums | tuple = ()
        self.totals: StepSums | tuple = ()
        self.samples = ()
        self.since_step, self.since_time = first_step, time.perf_counter()

    def add(self, output: StepOutput) -> None:
        """Adds a call's output (its sums; its samples replace the previous ones)."""
        sums = to_numpy(output.sums)
        self.sums, self.totals = accumulate(self.sums, sums), accumulate(self.totals, sums)
        self.samples = to_numpy(output.samples)

    def stage_summary(self) -> dict[str, float]:
        """The stage's own scalars over the whole stage, for metrics.json."""
        return self.stage.scalars(self.totals.stage) if self.totals and self.totals.stage else {}

    def report(self, step: int, epoch: int, lr: float, dropped: dict[str, int] | None = None) -> None:
        """Logs the progress line and writes TensorBoard summaries for the steps since the last report; `dropped`:
        what the input has dropped so far (shown when not 0)."""
        elapsed = max(time.perf_counter() - self.since_time, 1e-9)
        steps_per_s = max(step - self.since_step, 1) / elapsed
        sums = self.sums
        scalars = {"lr": lr, "steps_per_s": steps_per_s, "images_per_s": float(sums.images) / elapsed}
        if sums.identity:
            scalars.update(sums.identity.scalars())
            state = f"loss {scalars['loss']:.4f} acc {scalars['accuracy']:.3f} lr {lr:.5g}"
        else:  # a warm-up without the identity loss says what it trains
            state = f"{self.stage.describe(step)},"
        if sums.stage:
            scalars.update(self.stage.scalars(sums.stage))
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) / steps_per_s))
        dropped = {name: count for name, count in (dropped or {}).items() if count}
        notes = "".join(f" {name.replace('_', ' ')} {count}" for name, count in dropped.items())
        logging.info("[%s] step %d/%d epoch %d %s images/s %.1f ETA %s%s", self.stage.name, step, self.total_steps,
                     epoch + 1, state, scalars["images_per_s"], eta, f" | dropped:{notes}" if notes else "")
        scalars.update({f"dropped/{name}": float(count) for name, count in dropped.items()})
        self._summaries(step, scalars)
        self.sums, self.samples = (), ()
        self.since_step, self.since_time = step, time.perf_counter()

    def _summaries(self, step: int, scalars: dict[str, float]) -> None:
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
            if self.samples:
                for name, picture in self.stage.figures(self.samples).items():
                    tf.summary.image(name, picture[None])
                for name, values in self.stage.histograms(self.samples).items():
                    tf.summary.histogram(name, values)


def log_distributions(writer, infos: dict[str, DatasetInfo]) -> None:
    """The datasets' Figs. 3-5 in TensorBoard, once per stage (at its first step), keyed by flag."""
    with writer.as_default():
        for flag, info in infos.items():
            figure = figures.distribution_figure(info, f"--{flag} ({info.split})")
            tf.summary.image(f"data/{flag}", figures.to_rgb(figure)[None], step=0)


def skipped_steps(sums: StepSums, replicas: int) -> int:
    """Steps skipped by --nan_policy=skip in these sums (every replica of a skipped step reports 1)."""
    return round(float(sums.identity.skipped) / replicas) if sums.identity else 0
