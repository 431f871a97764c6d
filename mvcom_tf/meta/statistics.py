"""What the meta stage reports beside the identity loss: variation-head figures and the learned residuals."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.training.metrics import mean_and_std


class VariationSums(NamedTuple):
    """Per factor: the variation loss summed over the meta batch, and its correct and known labels."""

    loss: dict[str, Any]
    correct: dict[str, Any]
    known: dict[str, Any]


class ResidualSums(NamedTuple):
    """Per factor, per class of that factor: sum, sum of squares and count of r^k; and over all `samples`."""

    samples: Any
    by_class: dict[str, Any]
    by_class_sq: dict[str, Any]
    count: dict[str, Any]
    total: dict[str, Any]
    total_sq: dict[str, Any]


class TailSums(NamedTuple):
    """Running sums for the correlation of a sample's summed residual r with its tail membership t."""

    count: Any
    r: Any
    r_sq: Any
    t: Any
    rt: Any


class MetaSums(NamedTuple):
    """StepSums.stage of the meta stage (residuals and tail: absent in its warm-ups; weight and weight_tail: the
    learned loss weights of --meta_target weights or both, in every factor's columns alike)."""

    variation: VariationSums
    residual: ResidualSums | tuple = ()
    tail: TailSums | tuple = ()
    weight: ResidualSums | tuple = ()
    weight_tail: TailSums | tuple = ()


class MetaSamples(NamedTuple):
    """Per-sample values of a meta step: final margins, residuals per factor, and faces for the figure."""

    margin: Any
    residual: dict[str, Any]
    faces: Any


def residual_sums(residuals: tf.Tensor, batch: dict[str, tf.Tensor]) -> ResidualSums:
    """Per factor, the sum and count of r^k over the training samples of each class of that factor."""
    sums = ResidualSums(tf.cast(tf.shape(residuals)[0], residuals.dtype), {}, {}, {}, {}, {})
    for index, factor in enumerate(schema.FACTORS):
        onehot = tf.one_hot(batch[factor], schema.NUM_CLASSES[factor], dtype=residuals.dtype)  # -1: a zero row
        values = residuals[:, index]
        sums.by_class[factor] = tf.linalg.matvec(onehot, values, transpose_a=True)
        sums.by_class_sq[factor] = tf.linalg.matvec(onehot, tf.square(values), transpose_a=True)
        sums.count[factor] = tf.reduce_sum(onehot, axis=0)
        sums.total[factor] = tf.reduce_sum(values)
        sums.total_sq[factor] = tf.reduce_sum(tf.square(values))
    return sums


def tail_sums(residuals: tf.Tensor, batch: dict[str, tf.Tensor], heads: dict[str, int]) -> TailSums:
    """Sums for the correlation of a sample's summed residual with its tail membership (a known label
    outside its factor's head class, for any factor)."""
    tail = tf.zeros_like(batch["identity"], tf.bool)
    for factor in schema.FACTORS:
        labels = batch[factor]
        tail |= (labels >= 0) & (labels != heads[factor])
    summed, tail = tf.reduce_sum(residuals, axis=1), tf.cast(tail, residuals.dtype)
    return TailSums(count=tf.cast(tf.size(summed), residuals.dtype), r=tf.reduce_sum(summed),
                    r_sq=tf.reduce_sum(tf.square(summed)), t=tf.reduce_sum(tail), rt=tf.reduce_sum(summed * tail))


def correlation(count, sum_x, sum_x_sq, sum_t, sum_xt) -> float:
    """Pearson's correlation of x with a 0/1 indicator t, from running sums (t^2 = t); NaN if either is constant."""
    count = float(count)
    if not count:
        return float("nan")
    mean_x, share = float(sum_x) / count, float(sum_t) / count
    variance = float(sum_x_sq) / count - mean_x ** 2
    covariance = float(sum_xt) / count - mean_x * share
    denominator = np.sqrt(max(variance, 0.0) * share * (1.0 - share))
    return float(covariance / denominator) if denominator > 0 else float("nan")


def class_residual_summary(factor: str, sums: ResidualSums, head: int | None,
                           name: str = "margin") -> dict[str, float]:
    """Per class of a factor: the mean residual (`margin/<factor>/<class>`; `name` = weight: the mean learned
    weight), its standard error and count; with the factor's head class known, the correlation of r^k with
    membership of the factor's tail (`tail/<factor>/correlation`, or `weight_tail/...`)."""
    totals, squares, counts = sums.by_class[factor], sums.by_class_sq[factor], sums.count[factor]
    scalars = {}
    for cls in range(schema.NUM_CLASSES[factor]):
        if counts[cls]:
            mean, std = mean_and_std(totals[cls], squares[cls], counts[cls])
            scalars[f"{name}/{factor}/{cls}"] = mean
            # std divides by n: sqrt(var_n / (n - 1)) is the standard error of the mean.
            scalars[f"{name}_se/{factor}/{cls}"] = float(std / np.sqrt(max(counts[cls] - 1, 1)))
            scalars[f"{name}_count/{factor}/{cls}"] = float(counts[cls])
    if head is not None:
        tail = np.arange(len(counts)) != head
        scalars[f"{'tail' if name == 'margin' else name + '_tail'}/{factor}/correlation"] = correlation(
            counts.sum(), totals.sum(), squares.sum(), counts[tail].sum(), totals[tail].sum())
    return scalars


def meta_scalars(sums: MetaSums, head_classes: dict[str, int]) -> dict[str, float]:
    """TensorBoard scalars of the meta stage: variation losses and accuracies, residual spread and per class."""
    scalars = {}
    variation = sums.variation
    for factor in schema.FACTORS:
        known = float(variation.known[factor])
        if known:
            scalars[f"variation/{factor}/loss"] = float(variation.loss[factor]) / known
            scalars[f"variation/{factor}/accuracy"] = float(variation.correct[factor]) / known
        if sums.residual:
            residual = sums.residual
            _, std = mean_and_std(residual.total[factor], residual.total_sq[factor], float(residual.samples))
            scalars[f"residual/{factor}/std"] = std
            scalars.update(class_residual_summary(factor, sums.residual, head_classes.get(factor)))
        if sums.weight:
            scalars.update(class_residual_summary(factor, sums.weight, head_classes.get(factor), name="weight"))
    for key, tail in (("tail/correlation", sums.tail), ("weight_tail/correlation", sums.weight_tail)):
        if tail:
            scalars[key] = correlation(tail.count, tail.r, tail.r_sq, tail.t, tail.rt)
    return scalars
