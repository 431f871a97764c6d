"""What a replica step reports, as typed containers the loop reduces, accumulates and logs.

A replica step returns a `StepOutput`: `sums` are per-replica sums (added over replicas and
over steps), `samples` are per-sample values (gathered over replicas; the latest step's are
kept). Both are NamedTuples, so a renamed field fails where it is read, not silently in
TensorBoard. `()` stands for a part a step does not report (a warm-up has no identity loss).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf


class IdentitySums(NamedTuple):
    """Sums over a batch of the identity margin loss: divided by `count` for the progress line."""

    loss: Any
    correct: Any
    margin: Any
    margin_sq: Any
    count: Any  # the samples in these sums (0 for a skipped step)
    skipped: Any  # 1 on every replica of a step skipped by --nan_policy=skip

    def scalars(self) -> dict[str, float]:
        """loss, accuracy and the margin's mean and spread over the samples summed."""
        count = max(float(self.count), 1.0)
        mean, std = mean_and_std(self.margin, self.margin_sq, count)
        return {"loss": float(self.loss) / count, "accuracy": float(self.correct) / count,
                "margin/mean": mean, "margin/std": std}


class StepSums(NamedTuple):
    """A step's summed figures: images seen, the identity loss's sums, the stage's own."""

    images: Any
    identity: IdentitySums | tuple = ()
    stage: Any = ()


class StepOutput(NamedTuple):
    """What a replica step returns."""

    sums: StepSums
    samples: Any = ()


def sums_of_samples(per_sample_loss: tf.Tensor, correct: tf.Tensor, margins: tf.Tensor,
                    applied: tf.Tensor | None = None) -> IdentitySums:
    """The identity loss's per-replica sums from per-sample losses, whether each sample's class scores highest
    without its margin, and margins; a skipped step (`applied` 0) adds nothing but `skipped`."""
    sums = IdentitySums(loss=tf.reduce_sum(per_sample_loss), correct=tf.reduce_sum(tf.cast(correct, tf.float32)),
                        margin=tf.reduce_sum(margins), margin_sq=tf.reduce_sum(tf.square(margins)),
                        count=tf.cast(tf.size(margins), tf.float32), skipped=tf.constant(0.0))
    if applied is None:
        return sums
    kept = IdentitySums(*(tf.where(applied > 0, tf.cast(value, tf.float32), 0.0) for value in sums[:-1]),
                        skipped=1.0 - applied)
    return kept


def mean_and_std(total: float, total_sq: float, count: float) -> tuple[float, float]:
    """Mean and population standard deviation from a running sum and sum of squares."""
    mean = float(total) / count
    return mean, math.sqrt(max(float(total_sq) / count - mean ** 2, 0.0))


def accumulate(total: Any, new: Any) -> Any:
    """total + new, field by field; a part absent (`()`) on one side takes the other's."""
    if isinstance(total, tuple) and not total:
        return new
    if isinstance(new, tuple) and not new:
        return total
    if isinstance(new, tuple):  # a NamedTuple
        return type(new)(*(accumulate(a, b) for a, b in zip(total, new)))
    if isinstance(new, dict):
        return {key: accumulate(total.get(key, ()), value) for key, value in new.items()}
    return total + new


def reduce_over_replicas(strategy: tf.distribute.Strategy, output: StepOutput) -> StepOutput:
    """Sums added over replicas, samples gathered along the batch."""
    return StepOutput(
        sums=tf.nest.map_structure(lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), output.sums),
        samples=tf.nest.map_structure(lambda v: strategy.gather(v, axis=0), output.samples))


def to_numpy(structure: Any) -> Any:
    """The structure with float64 numpy arrays for tensors (for sums over many steps)."""
    return tf.nest.map_structure(lambda v: np.asarray(v, np.float64), structure)
