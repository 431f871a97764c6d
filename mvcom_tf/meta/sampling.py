"""Meta batch sampling: keep the pool's examples most distinct from the training batch (METHOD.md, step 3)."""

from __future__ import annotations

import tensorflow as tf

from mvcom_tf.data import schema


def label_histograms(labels: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Per-factor class frequencies of the global training batch, with add-one smoothing.

    Counts are summed over replicas, so every replica scores against the whole batch.
    """
    context = tf.distribute.get_replica_context()
    histograms = {}
    for factor in schema.FACTORS:
        # one_hot rather than bincount: unknown labels (-1) give zero rows, and XLA compiles it.
        counts = tf.reduce_sum(tf.one_hot(labels[factor], schema.NUM_CLASSES[factor], dtype=tf.float32), axis=0)
        if context is not None and context.num_replicas_in_sync > 1:
            counts = context.all_reduce(tf.distribute.ReduceOp.SUM, counts)
        counts += 1.0
        histograms[factor] = counts / tf.reduce_sum(counts)
    return histograms


def rarity_scores(pool_labels: dict[str, tf.Tensor], histograms: dict[str, tf.Tensor]) -> tf.Tensor:
    """sum_k -log p_k(mu^k) for each pool example; a factor with an unknown label adds 0."""
    score = 0.0
    for factor in schema.FACTORS:
        labels = pool_labels[factor]
        known = labels >= 0
        surprise = -tf.math.log(tf.gather(histograms[factor], tf.where(known, labels, 0)))
        score += tf.where(known, surprise, 0.0)
    return score


def select_meta_batch(pool: dict[str, tf.Tensor], train_labels: dict[str, tf.Tensor], keep: int,
                      rule: str, group_size: int = 1) -> dict[str, tf.Tensor]:
    """The meta batch V: the `keep` rarest pool examples (rule `hard`, ties to the earlier) or the first `keep`.

    With `group_size` K > 1 the pool is runs of K images of one identity, kept or left whole: a run
    scores the mean rarity of its images.
    """
    if rule == "random":
        return {key: value[:keep] for key, value in pool.items()}
    scores = rarity_scores(pool, label_histograms(train_labels))
    groups = tf.reduce_mean(tf.reshape(scores, [-1, group_size]), axis=1)
    chosen = tf.math.top_k(groups, k=keep // group_size, sorted=True).indices
    indices = tf.reshape(chosen[:, None] * group_size + tf.range(group_size)[None, :], [-1])
    return {key: tf.gather(value, indices) for key, value in pool.items()}
