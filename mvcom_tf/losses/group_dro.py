"""GroupDRO (Sagawa et al. 2020) over the variation labels: online exponential weights on the groups' losses.

Each factor k keeps a distribution q^k over its classes (the groups). A step first moves it
towards the groups that did worst on the global batch, q^k_c <- q^k_c exp(eta_q Lbar^k_c), then
trains on sum_c q^k_c Lbar^k_c averaged over the factors (over the classes present in the batch,
q renormalised over them). As a per-sample weight: w_j = mean_k q^k_{c_jk} B / (Q^k n^k_{c_jk}),
with n the class's count in the global batch and Q^k the mass of the present classes; an unknown
label weighs 1. The q^k are variables of the checkpoint, identical on every replica.
"""

from __future__ import annotations

import tensorflow as tf

from mvcom_tf.data import schema


class GroupDRO(tf.Module):
    """The groups' weights q^k (uniform at the start) and the per-sample loss weights they give."""

    def __init__(self, step_size: float, name: str = "group_dro") -> None:
        super().__init__(name=name)
        self.step_size = step_size
        # ONLY_FIRST_REPLICA: every replica computes the same new q (from all-reduced group losses).
        self.q = {factor: tf.Variable(tf.fill([schema.NUM_CLASSES[factor]], 1.0 / schema.NUM_CLASSES[factor]),
                                      trainable=False, name=f"q_{factor}",
                                      synchronization=tf.VariableSynchronization.ON_WRITE,
                                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                  for factor in schema.FACTORS}

    def weights(self, batch: dict[str, tf.Tensor], losses: tf.Tensor, global_batch: int,
                commit: bool = True) -> tf.Tensor:
        """Per-sample weights [B] (mean about 1) from this replica's samples' `losses` (no gradient flows
        through them); `commit` stores the moved q (the real update), else it is only used (a pseudo-update)."""
        losses = tf.stop_gradient(tf.cast(losses, tf.float32))
        context = tf.distribute.get_replica_context()
        terms, updates = [], []
        for factor in schema.FACTORS:
            labels = batch[factor]
            onehot = tf.one_hot(labels, schema.NUM_CLASSES[factor], dtype=tf.float32)  # unknown: a zero row
            sums = tf.stack([tf.linalg.matvec(onehot, losses, transpose_a=True), tf.reduce_sum(onehot, axis=0)])
            if context is not None and context.num_replicas_in_sync > 1:
                sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
            loss_sums, counts = sums[0], sums[1]
            present = counts > 0
            mean_losses = loss_sums / tf.maximum(counts, 1.0)
            q = self.q[factor]
            moved = q * tf.exp(self.step_size * tf.where(present, mean_losses, 0.0))
            moved = moved / tf.reduce_sum(moved)
            present_mass = tf.reduce_sum(tf.where(present, moved, 0.0))
            per_class = tf.where(present, moved * global_batch / (present_mass * tf.maximum(counts, 1.0)), 0.0)
            terms.append(tf.where(labels >= 0, tf.gather(per_class, tf.maximum(labels, 0)), 1.0))
            updates.append((q, moved))
        if commit:
            for variable, value in updates:
                variable.assign(value)
        return tf.add_n(terms) / len(schema.FACTORS)
