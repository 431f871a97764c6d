"""The margin-loss training step (pre-training, and the real update of the meta stage)."""

from __future__ import annotations

import keras
import tensorflow as tf

from mvcom_tf.losses.group_dro import GroupDRO
from mvcom_tf.losses.margins import identity_loss, wins_without_margin
from mvcom_tf.models.heads import MarginHead
from mvcom_tf.models.sharded_head import ShardedMarginHead, sgd_update
from mvcom_tf.training.metrics import StepOutput, StepSums, sums_of_samples


class MarginStep:
    """One SGD step on the identity margin loss with per-sample margins, run per replica.

    `class_margins[y]` is each identity's margin (constant for CosFace pre-training, the
    class-aware prior in the meta stage, which adds its residuals and reuses `forward`,
    `apply` and the head); `factor_offsets[k][c]`, if given, is added for samples of class c
    of factor k (the bias study's oracle arm). Losses are summed and divided by the global batch, so that the
    gradients that MirroredStrategy sums over replicas are those of the global mean. A sample's loss is
    multiplied by its weight: the batch's `weight` (--loss_weighting balanced or error_set, from the input
    pipeline) and GroupDRO's (`group_dro`), where given.
    """

    def __init__(self, backbone: keras.Model, head: MarginHead, optimizer: keras.optimizers.Optimizer,
                 class_margins: tf.Tensor, global_batch: int, skip_nonfinite: bool = False,
                 factor_offsets: dict[str, tf.Tensor] | None = None, group_dro: GroupDRO | None = None) -> None:
        self.backbone, self.head, self.optimizer = backbone, head, optimizer
        self.class_margins = class_margins
        self.factor_offsets = factor_offsets or {}
        self.global_batch = global_batch
        self.skip_nonfinite = skip_nonfinite
        self.group_dro = group_dro

    @property
    def checkpointed_head(self):
        """What a checkpoint keeps of the identity head (the `head` entry --init_checkpoint carries over)."""
        return self.head

    @property
    def head_variables(self) -> list:
        """The identity head's variables that this replica differentiates (after the backbone's in `apply`)."""
        return self.head.trainable_variables

    @property
    def variables(self) -> list:
        """What the Keras optimizer updates."""
        return self.backbone.trainable_variables + self.head.trainable_variables

    def margins(self, batch: dict[str, tf.Tensor]) -> tf.Tensor:
        """Each sample's margin: its identity's, plus the offsets of its variation classes (unknown adds 0)."""
        margins = tf.gather(self.class_margins, batch["identity"])
        for factor, offsets in self.factor_offsets.items():
            labels = batch[factor]
            margins += tf.where(labels >= 0, tf.gather(offsets, tf.maximum(labels, 0)), tf.zeros_like(margins))
        return margins

    def forward(self, images, trainable_values=None):
        """Embeddings at the current (or given) trainable values, and the BatchNorm statistics they produce.

        `stateless_call` keeps the moving statistics out of the forward pass: the step stores
        them once the update is done (`assign_statistics`), and the meta stage's pseudo-updated
        passes simply drop theirs.
        """
        if trainable_values is None:
            trainable_values = [v.value for v in self.backbone.trainable_variables]
        non_trainable_values = [v.value for v in self.backbone.non_trainable_variables]
        return self.backbone.stateless_call(trainable_values, non_trainable_values, images, training=True)

    def identity_losses(self, embeddings: tf.Tensor, labels: tf.Tensor,
                        margins: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-sample margin losses of this replica's samples, and whether each one's class scores highest
        without its margin."""
        logits = self.head(embeddings, labels, margins)
        plain_target = self.head.scale * self.head.target_cosine(embeddings, labels)
        return identity_loss(logits, labels), wins_without_margin(logits, labels, plain_target)

    def sample_weights(self, batch: dict[str, tf.Tensor], per_sample: tf.Tensor, commit: bool = True):
        """Each sample's loss weight (None: all 1): the batch's `weight` times GroupDRO's, whose q moves only if
        `commit` (the update that is applied, not a pseudo-update)."""
        weights = batch.get("weight")
        if self.group_dro is not None:
            dro = self.group_dro.weights(batch, per_sample, self.global_batch, commit)
            weights = dro if weights is None else weights * dro
        return weights

    def batch_loss(self, embeddings: tf.Tensor, batch: dict[str, tf.Tensor], margins: tf.Tensor,
                   extra_weights: tf.Tensor | None = None, weight_offsets: tf.Tensor | None = None,
                   commit: bool = True) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The loss this replica differentiates (its samples' weighted margin losses summed over the global batch
        size, so that replicas' gradients sum to the global mean's), with identity_losses' per-sample losses and
        wins. `weight_offsets` are added to sample_weights (the meta step's eps, whose derivative is then each
        sample's own loss term whatever its data weight), `extra_weights` multiply them (its learned weights)."""
        per_sample, correct = self.identity_losses(embeddings, batch["identity"], margins)
        weights = self.sample_weights(batch, per_sample, commit)
        if weight_offsets is not None:
            weights = (1.0 if weights is None else tf.cast(weights, weight_offsets.dtype)) + weight_offsets
        if extra_weights is not None:
            weights = extra_weights if weights is None else tf.cast(weights, extra_weights.dtype) * extra_weights
        weighted = per_sample if weights is None else per_sample * tf.cast(weights, per_sample.dtype)
        return tf.reduce_sum(weighted) / self.global_batch, per_sample, correct

    def losses_and_gradients(self, batch, margins):
        """Per-sample losses, correctness, the gradients of the global-batch mean (backbone, then head
        variables) and the new BN statistics."""
        trainable_values = [v.value for v in self.backbone.trainable_variables]
        head_variables = self.head_variables
        with tf.GradientTape() as tape:
            tape.watch(trainable_values)
            embeddings, statistics = self.forward(batch["image"], trainable_values)
            loss, per_sample, correct = self.batch_loss(embeddings, batch, margins)
            if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
                loss = self.optimizer.scale_loss(loss)  # its apply_gradients unscales (and skips non-finite)
        gradients = tape.gradient(loss, trainable_values + head_variables)
        return per_sample, correct, gradients, statistics

    def apply(self, gradients, statistics) -> None:
        """Gradients of the backbone then of head_variables, and the pass's BatchNorm statistics."""
        self.optimizer.apply_gradients(zip(gradients, self.variables))
        assign_statistics(self.backbone, statistics)

    def update(self, gradients, statistics, losses) -> tf.Tensor:
        """Applies the step; with skip_nonfinite, only where the losses and gradients are finite on
        every replica. Returns 1.0 if it was applied, 0.0 if skipped."""
        if not self.skip_nonfinite:
            self.apply(gradients, statistics)
            return tf.constant(1.0)
        finite = all_finite([losses, *gradients])
        apply_where(finite, self.apply, gradients, statistics)
        return tf.cast(finite, tf.float32)

    def __call__(self, batch: dict[str, tf.Tensor]) -> StepOutput:
        """One step on a training batch."""
        labels = batch["identity"]
        margins = self.margins(batch)
        per_sample, correct, gradients, statistics = self.losses_and_gradients(batch, margins)
        applied = self.update(gradients, statistics, per_sample)
        sums = sums_of_samples(per_sample, correct, margins, applied if self.skip_nonfinite else None)
        return StepOutput(StepSums(images=tf.cast(tf.size(labels), tf.float32), identity=sums))


def all_finite(tensors: list[tf.Tensor]) -> tf.Tensor:
    """True when every tensor is finite on every replica (so that all replicas decide alike)."""
    bad = tf.add_n([tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(t)), tf.float32)) for t in tensors])
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        bad = context.all_reduce(tf.distribute.ReduceOp.SUM, bad)
    return tf.equal(bad, 0.0)


def apply_where(condition: tf.Tensor, apply_fn, *args) -> None:
    """Runs `apply_fn(*args)` (which may merge_call, as optimizers do) only if `condition`.

    The cond is taken in cross-replica context, as Keras' LossScaleOptimizer does: a replica-
    context cond cannot hold a merge_call. Every replica holds the same condition.
    """
    def merge(strategy, condition, *args):
        def run():
            strategy.extended.call_for_each_replica(apply_fn, args=args)
            return tf.constant(True)

        tf.cond(strategy.experimental_local_results(condition)[0], run, lambda: tf.constant(False))

    tf.distribute.get_replica_context().merge_call(merge, args=(condition, *args))


def assign_statistics(model: keras.Model, statistics: list[tf.Tensor]) -> None:
    """Stores new BatchNorm moving statistics, averaged over replicas (identical ones with --sync_bn).

    The average is taken in a merge_call, a point every replica reaches in the same order, so
    its all-reduce cannot interleave with the gradient all-reduce of another replica.
    """
    def merge(strategy, per_replica):
        for variable, value in zip(model.non_trainable_variables, per_replica):
            variable.assign(strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None))

    context = tf.distribute.get_replica_context()
    if context is None:
        merge(tf.distribute.get_strategy(), statistics)
    else:
        context.merge_call(merge, args=(statistics,))


class ShardedMarginStep(MarginStep):
    """The margin step with the identity head's centres sharded over the replicas (models/sharded_head.py).

    The backbone's gradients go to the Keras optimizer (summed over replicas as usual); each
    replica updates its own shard of centres with the same SGD (learning rate, momentum,
    decoupled weight decay), with no cross-replica reduction: the shard's gradient already
    covers the whole global batch. The meta step uses it as it uses MarginStep.
    """

    def __init__(self, backbone: keras.Model, head: ShardedMarginHead, optimizer: keras.optimizers.Optimizer,
                 class_margins: tf.Tensor, global_batch: int, momentum: float, weight_decay: float,
                 factor_offsets: dict[str, tf.Tensor] | None = None, group_dro: GroupDRO | None = None) -> None:
        super().__init__(backbone, head, optimizer, class_margins, global_batch, factor_offsets=factor_offsets,
                         group_dro=group_dro)
        self.momentum, self.weight_decay = momentum, weight_decay

    @property
    def checkpointed_head(self):
        """The centres of every shard (a save gathers them into one W [E, C])."""
        return self.head.centres

    @property
    def head_variables(self) -> list:
        """This replica's shard of centres (outside the Keras optimizer: its SGD runs in `apply`)."""
        return [self.head.centres.local_kernel()]

    @property
    def variables(self) -> list:
        return self.backbone.trainable_variables

    def identity_losses(self, embeddings: tf.Tensor, labels: tf.Tensor,
                        margins: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        per_sample, correct, _ = self.head.per_sample_loss(embeddings, labels, margins, self.optimizer.iterations)
        return per_sample, correct

    def apply(self, gradients, statistics) -> None:
        *backbone_gradients, kernel_gradient = gradients
        centres = self.head.centres
        learning_rate = self.optimizer.learning_rate  # this step's, before the optimizer counts it
        super().apply(backbone_gradients, statistics)
        sgd_update(centres.local_kernel(), centres.local_momentum(), tf.convert_to_tensor(kernel_gradient),
                   learning_rate, self.momentum, self.weight_decay)
