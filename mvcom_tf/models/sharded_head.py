"""The identity head's class centres split over the replicas, with Partial FC sampling (insightface's partial_fc_v2).

Replica i of N holds the contiguous classes [start_i, start_i + C // N + (i < C % N)), as
partial_fc_v2 splits them. Each step the embeddings, labels and margins of the global batch are
all-gathered; every replica computes the margin logits of its own classes (the margin applied
where the positive class lives), and the softmax cross-entropy over all classes comes from
all-reduced maxima, sums of exponentials and positive logits. Each replica's loss covers its
own samples, so the all-gather's and all-reduces' gradients bring every embedding gradient
back to the replica that owns the sample, and every centre gradient to the replica that owns
the class.

With sample_rate r < 1 a replica keeps the positive classes of the global batch that it owns
and a uniform sample of the others, max(ceil(r * C_i), B) classes in all (insightface keeps
int(r * C_i) unless the positives outnumber them: a fixed count keeps the shapes static). As in
partial_fc_v2, where the centres are one parameter that SGD updates whole, an unsampled centre
gets a zero gradient that step, so its momentum keeps decaying and moving it, and weight decay
still applies.
"""

from __future__ import annotations

import math

import tensorflow as tf
from tensorflow.python.trackable import base as trackable

from mvcom_tf.models.heads import MARGIN_LOSSES, margin_target


class ShardLayout:
    """Which classes each of `shards` replicas owns: contiguous ranges, the first C % N one larger."""

    def __init__(self, num_classes: int, shards: int) -> None:
        self.num_classes, self.shards = num_classes, shards

    def size(self, shard: int) -> int:
        return self.num_classes // self.shards + int(shard < self.num_classes % self.shards)

    def start(self, shard: int) -> int:
        return self.num_classes // self.shards * shard + min(shard, self.num_classes % self.shards)

    def sizes(self) -> list[int]:
        return [self.size(shard) for shard in range(self.shards)]


class ShardedCentres(trackable.Trackable):
    """The centres W [E, C] and their SGD momentum, as one shard per replica, each on its replica's device.

    Checkpoints hold the whole W and momentum ([E, C], gathered when saving), so a run saved
    with N replicas restores with any other number: the tensors are split anew on restore.
    Under MultiWorkerMirroredStrategy a process holds the shards of its own replicas only
    (`first_shard` on); saving then gathers the others' with the strategy (a collective that
    every worker runs at the same save, as they all save), and restoring keeps this process's part.
    """

    def __init__(self, num_classes: int, embedding_size: int, devices: list[str], seed: int = 0,
                 dtype: str = "float32", *, shards: int | None = None, first_shard: int = 0,
                 strategy: tf.distribute.Strategy | None = None, initial: tf.Tensor | None = None) -> None:
        self.layout = ShardLayout(num_classes, shards or len(devices))
        self.embedding_size, self.devices = embedding_size, list(devices)
        self.first_shard, self.strategy = first_shard, strategy
        self.kernels, self.momentums = [], []
        parts = None if initial is None else tf.split(initial, self.layout.sizes(), axis=1)
        for local, device in enumerate(self.devices):  # this process's replica i holds shard first_shard + i
            shard = first_shard + local
            with tf.device(device):
                if parts is not None:  # its part of a given W [E, C]
                    initial_part = tf.cast(parts[shard], dtype)
                else:  # drawn on its own, N(0, 0.01): the whole W never exists in one place
                    initial_part = tf.random.stateless_normal([embedding_size, self.layout.size(shard)],
                                                              seed=[seed, shard], stddev=0.01, dtype=dtype)
                # A plain trainable tf.Variable: tapes watch it, and no Keras optimizer holds it (its SGD is sgd_update).
                self.kernels.append(tf.Variable(initial_part, name=f"centres_{shard}"))
                self.momentums.append(tf.Variable(tf.zeros_like(initial_part), trainable=False,
                                                  name=f"momentum_{shard}"))

    @classmethod
    def for_strategy(cls, strategy: tf.distribute.Strategy, num_classes: int, embedding_size: int, seed: int = 0,
                     dtype: str = "float32", initial: tf.Tensor | None = None) -> "ShardedCentres":
        """One shard per replica of the strategy, this process creating those of its own replicas."""
        ids = strategy.experimental_distribute_values_from_function(lambda c: c.replica_id_in_sync_group)
        first = min(int(v) for v in strategy.experimental_local_results(ids))  # 0 unless another worker's precede
        return cls(num_classes, embedding_size, default_devices(strategy), seed, dtype,
                   shards=strategy.num_replicas_in_sync, first_shard=first, strategy=strategy, initial=initial)

    @property
    def holds_every_shard(self) -> bool:
        return len(self.kernels) == self.layout.shards

    def local_kernel(self) -> tf.Variable:
        """The shard of the replica that calls (in replica context)."""
        return self.kernels[replica_index() - self.first_shard]

    def local_momentum(self) -> tf.Variable:
        """The momentum of the calling replica's shard."""
        return self.momentums[replica_index() - self.first_shard]

    def assign_full(self, kernel: tf.Tensor) -> None:
        """Sets W [E, C] (for example a replicated head's kernel): this process's shards take their part."""
        self._assign_parts(self.kernels, kernel)

    def full(self) -> tf.Tensor:
        """W [E, C] gathered from every shard (from every worker under MultiWorkerMirroredStrategy)."""
        return self._gathered(self.kernels)

    def _gathered(self, variables: list[tf.Variable]) -> tf.Tensor:
        if self.holds_every_shard:
            return tf.concat([tf.convert_to_tensor(v) for v in variables], axis=1)
        parts = self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.convert_to_tensor(variables[context.replica_id_in_sync_group - self.first_shard]))
        return self.strategy.gather(parts, axis=1)  # the shards differ in width by one at most: gather allows it

    def _assign_parts(self, variables: list[tf.Variable], value: tf.Tensor) -> list:
        parts = tf.split(value, self.layout.sizes(), axis=1)
        return [variable.assign(parts[self.first_shard + local]) for local, variable in enumerate(variables)]

    def _serialize_to_tensors(self):
        with tf.device("/cpu:0"):
            return {"kernel": self._gathered(self.kernels), "momentum": self._gathered(self.momentums)}

    def _restore_from_tensors(self, restored_tensors):
        kernel, momentum = restored_tensors["kernel"], restored_tensors["momentum"]
        if kernel.shape[1] != self.layout.num_classes:
            raise ValueError(f"the checkpoint's identity head has {kernel.shape[1]} classes, this run "
                             f"{self.layout.num_classes}")
        return tf.group(self._assign_parts(self.kernels, kernel) + self._assign_parts(self.momentums, momentum))


class ShardedMarginHead:
    """The margin loss over sharded centres, called per replica (CosFace or ArcFace, per-sample margins)."""

    def __init__(self, centres: ShardedCentres, loss: str = "cosface", scale: float = 64.0,
                 sample_rate: float = 1.0, global_batch: int = 0, seed: int = 0) -> None:
        if loss not in MARGIN_LOSSES:
            raise ValueError(f"unknown margin loss {loss!r}; expected one of {MARGIN_LOSSES}")
        self.centres, self.loss, self.scale = centres, loss, scale
        self.sample_rate, self.global_batch, self.seed = sample_rate, global_batch, seed

    def sample_count(self, shard: int) -> int:
        """Classes a replica keeps per step: all of its own at r = 1, else max(ceil(r C_i), B), at most C_i."""
        size = self.centres.layout.size(shard)
        if self.sample_rate >= 1.0:
            return size
        return min(size, max(math.ceil(self.sample_rate * size), self.global_batch))

    def sampled_classes(self, shard: int, local_labels: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """The shard's classes used this step, sorted (local indices): its positives and a uniform sample."""
        size, count = self.centres.layout.size(shard), self.sample_count(shard)
        if count == size:
            return tf.range(size)
        scores = tf.random.stateless_uniform([size], seed=tf.stack([tf.cast(step, tf.int32), self.seed + shard]))
        owned = local_labels >= 0
        positives = tf.boolean_mask(local_labels, owned)
        scores = tf.tensor_scatter_nd_update(scores, positives[:, None], tf.fill(tf.shape(positives), 2.0))
        return tf.sort(tf.math.top_k(scores, k=count).indices)

    def per_sample_loss(self, embeddings: tf.Tensor, labels: tf.Tensor, margins: tf.Tensor,
                        step: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """This replica's samples' losses [b], whether each sample's class scores highest without its margin
        [b], and the sampled classes (global indices) of this replica, from its local embeddings [b, E]."""
        context = tf.distribute.get_replica_context()
        shard = replica_index()
        layout = self.centres.layout
        all_embeddings = context.all_gather(embeddings, axis=0)
        # tf.identity places the labels on this replica's device: a traced input may carry none, and
        # MultiWorkerMirroredStrategy's gather needs one as its destination.
        all_labels = context.all_gather(tf.identity(labels), axis=0)
        all_margins = context.all_gather(tf.cast(margins, all_embeddings.dtype), axis=0)
        start, size = layout.start(shard), layout.size(shard)
        local = all_labels - start
        local = tf.where((local >= 0) & (local < size), local, -1)
        classes = self.sampled_classes(shard, local, step)
        kernel = self.centres.local_kernel()
        if self.sample_count(shard) < size:  # at r = 1 the shard itself: no copy of it, nor of its gradient
            kernel = tf.gather(kernel, classes, axis=1)
        target = tf.where(local >= 0, tf.searchsorted(classes, tf.maximum(local, 0)), -1)
        logits, positive, plain_positive = self.margin_logits(all_embeddings, kernel, target, all_margins)
        peak = _maximum_over_replicas(context, tf.reduce_max(logits, axis=1))
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(tf.exp(logits - peak[:, None]), axis=1))
        positive, plain_positive = context.all_reduce(tf.distribute.ReduceOp.SUM, [positive, plain_positive])
        others = tf.where(tf.one_hot(target, tf.shape(kernel)[1]) > 0, tf.cast(-1e30, logits.dtype), logits)
        best_other = _maximum_over_replicas(context, tf.reduce_max(others, axis=1))
        losses = tf.math.log(total) + peak - positive
        batch = tf.shape(embeddings)[0]
        mine = tf.range(shard * batch, (shard + 1) * batch)
        return tf.gather(losses, mine), tf.gather(plain_positive > best_other, mine), classes + start

    def margin_logits(self, embeddings, kernel, target, margins) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Scaled logits [B, k] against the kept centres (the margin at each owned target), and each sample's
        target logit with and without its margin where this replica owns its class (0 elsewhere)."""
        normalized = embeddings / tf.maximum(tf.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        # x . (w / |w|) as (x . w) / |w|: no normalised copy of the centres (nor of its gradient).
        cosine = tf.matmul(normalized, kernel) / tf.maximum(tf.norm(kernel, axis=0, keepdims=True), 1e-12)
        onehot = tf.one_hot(target, tf.shape(kernel)[1], dtype=cosine.dtype)  # -1: a zero row
        target_cos = tf.reduce_sum(cosine * onehot, axis=-1)
        target_logit = margin_target(target_cos, margins, self.loss)
        logits = (cosine + onehot * (target_logit - target_cos)[:, None]) * self.scale
        owned = tf.cast(target >= 0, logits.dtype)
        return logits, target_logit * self.scale * owned, target_cos * self.scale * owned


def replica_index() -> int:
    """The calling replica's index in its sync group (a Python int: each replica traces its own step)."""
    return int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))


def _maximum_over_replicas(context: tf.distribute.ReplicaContext, values: tf.Tensor) -> tf.Tensor:
    """The element-wise maximum over replicas (no gradient: ReduceOp has no MAX, so through an all-gather)."""
    gathered = context.all_gather(tf.stop_gradient(values)[None], axis=0)
    return tf.reduce_max(gathered, axis=0)


def sgd_update(variable: tf.Variable, momentum: tf.Variable, gradient: tf.Tensor, lr: tf.Tensor,
               momentum_rate: float, weight_decay: float | None) -> None:
    """Keras' SGD on one variable, in the order Keras applies it: decoupled weight decay, then momentum."""
    lr = tf.cast(lr, variable.dtype)
    # In place where the arithmetic allows: each line holds at most one shard-sized temporary.
    if weight_decay:
        variable.assign_sub(variable * (tf.cast(weight_decay, variable.dtype) * lr))
    momentum.assign(momentum * tf.cast(momentum_rate, variable.dtype))
    momentum.assign_sub(gradient * lr)
    variable.assign_add(momentum)


def default_devices(strategy: tf.distribute.Strategy) -> list[str]:
    """One device per replica of this process (MirroredStrategy's, or the only one)."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: one replica, placed where TensorFlow places it
        return [""]


def head_footprint(num_classes: int, embedding_size: int, replicas: int, global_batch: int, sharded: bool,
                   sample_rate: float = 1.0, value_bytes: int = 4) -> dict[str, float]:
    """Per replica: centres held, bytes of centres + momentum + gradient, bytes of logits, and bytes sent per step.

    Replicated: every replica holds all C centres, scores its B / N samples against them, and the
    centres' gradient is all-reduced (a ring sends 2 (N - 1) / N of it). Sharded: a replica holds
    ceil(C / N) centres and scores all B samples against its k sampled ones; the embeddings are
    all-gathered ((N - 1) / N of B x E) and their gradient all-reduced back (2 (N - 1) / N of B x E),
    plus five [B] vectors (labels, margins, maxima, sums, positive logits).
    """
    ring = (replicas - 1) / replicas
    if not sharded:
        held, scored_rows, scored_classes = num_classes, global_batch / replicas, num_classes
        sent = 2 * ring * num_classes * embedding_size * value_bytes
    else:
        held = math.ceil(num_classes / replicas)
        scored_rows = global_batch
        scored_classes = held if sample_rate >= 1.0 else min(held, max(math.ceil(sample_rate * held), global_batch))
        sent = (3 * ring * global_batch * embedding_size + 5 * ring * global_batch) * value_bytes
    return {"centres": float(held), "state_bytes": 3.0 * held * embedding_size * value_bytes,
            "logits_bytes": float(scored_rows * scored_classes * value_bytes), "sent_bytes": float(sent)}
