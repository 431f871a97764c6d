"""Losses and margins: the identity loss on margin logits, the class-aware margin prior, variation losses."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def identity_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Per-sample softmax cross-entropy [B] of scaled margin logits [B, C] against identity labels [B]."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


def wins_without_margin(logits: tf.Tensor, labels: tf.Tensor, plain_target: tf.Tensor) -> tf.Tensor:
    """Whether each sample's class would score highest without its margin: s cos(theta_y) [B] above every other
    class's logit in the margin logits [B, C] (training accuracy as a user reads it; the margin makes it lower)."""
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    others = tf.where(onehot, tf.cast(-1e30, logits.dtype), logits)
    return tf.cast(plain_target, logits.dtype) > tf.reduce_max(others, axis=-1)


def class_aware_margins(images_per_identity, base: float = 0.35, power: float = 0.25,
                        minimum: float = 0.25, maximum: float = 0.45) -> np.ndarray:
    """m_y = base * (n_ref / n_y) ** power clipped to [minimum, maximum]; n_ref is the geometric mean.

    Identities with no image get the base margin (they never appear in a batch).
    """
    counts = np.asarray(images_per_identity, np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class_aware_margins needs at least one identity with images")
    reference = np.exp(np.mean(np.log(counts[present])))
    margins = np.full(counts.shape, base, np.float64)
    margins[present] = base * (reference / counts[present]) ** power
    return np.clip(margins, minimum, maximum).astype(np.float32)


def head_classes(histograms: dict[str, list[int]]) -> dict[str, int]:
    """Each factor's most frequent class in a dataset's label histograms (its head class)."""
    return {factor: int(np.argmax(counts)) for factor, counts in histograms.items()}


def tail_class_offsets(histograms: dict[str, list[int]], deltas: dict[str, float],
                       side: str = "tail") -> dict[str, np.ndarray]:
    """Per factor k, a margin offset per class: side `tail`, delta_k for every class but the head class and 0 for
    it; side `head`, -delta_k for the head class and 0 for the others.

    The bias study's oracle arms: margins from the ground-truth variation labels of each sample.
    """
    if side not in ("tail", "head"):
        raise ValueError(f"unknown oracle side {side!r}; expected tail or head")
    heads = head_classes(histograms)
    offsets = {}
    for factor, delta in deltas.items():
        if delta:
            is_head = np.arange(len(histograms[factor])) == heads[factor]
            offsets[factor] = np.where(is_head if side == "head" else ~is_head,
                                       -delta if side == "head" else delta, 0.0).astype(np.float32)
    return offsets


def variation_losses(logits: dict[str, tf.Tensor], labels: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Per-sample cross-entropy [B] of each variation head; samples labelled UNKNOWN (-1) give 0."""
    losses = {}
    for factor, factor_logits in logits.items():
        known = labels[factor] >= 0
        safe_labels = tf.where(known, labels[factor], 0)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=factor_logits)
        losses[factor] = tf.where(known, loss, tf.zeros_like(loss))
    return losses

