"""The verification meta objective (our extension, METHOD.md): a supervised contrastive loss over a meta batch
of P identities x K images, reduced per variation factor with every class of the factor weighted equally."""

from __future__ import annotations

import tensorflow as tf

from mvcom_tf.data import schema


def contrastive_losses(embeddings: tf.Tensor, identities: tf.Tensor, scale: float) -> tf.Tensor:
    """Per-anchor supervised contrastive loss [B] (Khosla et al. 2020) on cosine similarities times `scale`.

    For anchor i with positives P(i) (the other images of its identity in the batch):
    l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s cos_ip) / sum_{j != i} exp(s cos_ij) ).
    An anchor without a positive gives 0: it has nothing to be pulled towards.
    """
    normalized = tf.math.l2_normalize(embeddings, axis=-1)
    logits = scale * tf.matmul(normalized, normalized, transpose_b=True)
    size = tf.shape(identities)[0]
    not_self = tf.logical_not(tf.eye(size, dtype=tf.bool))
    positive = tf.logical_and(tf.equal(identities[:, None], identities[None, :]), not_self)
    # The anchor itself leaves the denominator: a large negative instead of -inf keeps the gradient finite.
    masked = tf.where(not_self, logits, tf.cast(-1e9, logits.dtype))
    log_probability = masked - tf.reduce_logsumexp(masked, axis=1, keepdims=True)
    positive = tf.cast(positive, logits.dtype)
    count = tf.reduce_sum(positive, axis=1)
    summed = tf.reduce_sum(tf.where(positive > 0, log_probability, tf.zeros_like(log_probability)), axis=1)
    return tf.where(count > 0, -summed / tf.maximum(count, 1.0), tf.zeros_like(count))


def class_balanced_sums(per_sample: tf.Tensor, labels: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Per factor: this replica's share of the mean over the factor's classes (present in the global batch) of
    the mean loss of the samples in each class; summed over replicas it is the global class-balanced loss.

    Unknown labels (-1) count for no class. The class counts are all-reduced constants, so the gradient is
    that of the replica's own samples, as it is for the variation losses' sums.
    """
    context = tf.distribute.get_replica_context()
    sums = {}
    for factor in schema.FACTORS:
        one_hot = tf.one_hot(labels[factor], schema.NUM_CLASSES[factor], dtype=per_sample.dtype)  # -1: zero row
        counts = tf.reduce_sum(one_hot, axis=0)
        if context is not None and context.num_replicas_in_sync > 1:
            counts = context.all_reduce(tf.distribute.ReduceOp.SUM, counts)
        present = tf.reduce_sum(tf.cast(counts > 0, per_sample.dtype))
        class_sums = tf.reduce_sum(one_hot * per_sample[:, None], axis=0)
        sums[factor] = tf.reduce_sum(tf.math.divide_no_nan(class_sums, counts)) / tf.maximum(present, 1.0)
    return sums
