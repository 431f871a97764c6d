"""The MvCoM meta step: per-sample margin residuals meta-learned from the variation losses (seed Sec. B).

One iteration, per replica, for a training batch T and a meta batch V:
  (a) r^k_j = 0 for every sample j of T and factor k; m_j = m_{y_j} + sum_k r^k_j.
  (b) pseudo update (Eq. 12): Omega~ = Omega - eta * grad_Omega L(T; m), as tensors, run with
      `stateless_call`; the BatchNorm statistics of that pass are dropped.
  (c) meta update (Eq. 13): r^k = clip(-tau * w_k * dL_var^k(V; Omega~) / dr^k, +-r_max), the
      derivative taken through Omega~ (second order: the inner tape's gradient is recorded
      by the outer tape). With --meta_target=weights (or both) the same pseudo-update also gives
      each sample a loss weight, as learning to reweight (Ren et al. 2018) does: the training
      loss weighs sample j by u_j + eps_j (u_j its --loss_weighting weight, else 1), and
      w_j = max(-dL_meta/d eps_j, 0) at eps = 0, normalised so that sum_j u_j w_j = sum_j u_j
      over the global batch.
  (d) real update (Eq. 14): the optimizer steps on L(T; m_y + sum_k r^k) (weighted by u w), its backbone gradient
      obtained by replaying the backward pass recorded in (b) with the new output gradient.
  (e) the variation heads learn on V at the current Omega, features stop-gradient.
Under MirroredStrategy the pseudo update uses the all-reduced gradient, exactly as one device
with the whole batch would, and the meta-gradient flows back through that all-reduce. With a
sharded identity head (ShardedMarginStep) the identity loss runs through all-gathers and
all-reduces too; their gradients are collectives with gradients of their own, so the second-
order pass of (c) goes through them unchanged.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import keras
import tensorflow as tf

from mvcom_tf.config import MetaConfig
from mvcom_tf.data import schema
from mvcom_tf.losses.contrastive import class_balanced_sums, contrastive_losses
from mvcom_tf.losses.margins import variation_losses
from mvcom_tf.meta.sampling import select_meta_batch
from mvcom_tf.meta.statistics import MetaSamples, MetaSums, VariationSums, residual_sums, tail_sums
from mvcom_tf.models.heads import VariationHeads
from mvcom_tf.models.iresnet import OUTPUT_BLOCK_PREFIX, fused_batchnorm, output_block_layers
from mvcom_tf.margin_step import MarginStep
from mvcom_tf.training.metrics import StepOutput, StepSums, sums_of_samples

META_SCOPES = ("all", "output_block")
# What the residuals descend on V (step c): Eq. 13's variation losses, or our verification objective.
META_OBJECTIVES = ("variation", "verification")
# What the meta-gradient learns per training sample (step c): margin residuals (the paper), loss weights, or both.
META_TARGETS = ("margins", "weights", "both")
# Faces of each replica's batch drawn with their residuals (the seed's Fig. 6) in TensorBoard.
FIGURE_FACES = 4


class RecordedForward(NamedTuple):
    """The training batch's forward pass under a tape, which the real update replays backwards (step d)."""

    tape: tf.GradientTape
    weights: list[tf.Tensor]
    embeddings: tf.Tensor
    statistics: list[tf.Tensor]


def pseudo_update(weights: list[tf.Tensor], gradients: list[tf.Tensor], mask: list[bool],
                  eta: tf.Tensor) -> list[tf.Tensor]:
    """Eq. 12 as tensors: w - eta * g for the weights the mask selects (gradients given for those only)."""
    updated = list(weights)
    selected = [index for index, chosen in enumerate(mask) if chosen]
    for index, gradient in zip(selected, gradients):
        updated[index] = weights[index] - eta * gradient
    return updated


class OutputBlock:
    """The backbone split at its output block, for the meta scope `output_block` (only the block is pseudo-updated):
    the meta batch goes through the trunk once, and through the block at the pseudo and at the current weights."""

    def __init__(self, backbone: keras.Model) -> None:
        self.layers = output_block_layers(backbone)
        self.trunk = keras.Model(backbone.inputs, self.layers[0].input)

    def trunk_features(self, images: tf.Tensor) -> tf.Tensor:
        """The trunk's output for `images` (training mode, statistics dropped, no gradient: so its BatchNorms take
        the fused kernel, whatever --fused_bn says)."""
        trunk = self.trunk
        with fused_batchnorm(trunk):
            features, _ = trunk.stateless_call([v.value for v in trunk.trainable_variables],
                                               [v.value for v in trunk.non_trainable_variables], images, training=True)
        return tf.stop_gradient(features)

    def __call__(self, features: tf.Tensor, weights: dict) -> tf.Tensor:
        """The block on trunk features, at the given weights (by variable path); statistics dropped."""
        for layer in self.layers:
            trainable = [weights[v.path] for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]
            # stateless_call hands keyword arguments to `call` as they are: Flatten takes no `training`.
            mode = {"training": True} if "training" in inspect.signature(layer.call).parameters else {}
            features, _ = layer.stateless_call(trainable, non_trainable, features, **mode)
        return features


class MetaStep:
    """The MvCoM iteration (a)-(e) and the meta stage's two warm-ups, as replica steps on (batch, meta_pool)."""

    def __init__(self, margin_step: MarginStep, variation_heads: VariationHeads,
                 variation_optimizer: keras.optimizers.Optimizer, settings: MetaConfig, *, replicas: int,
                 head_classes: dict[str, int] | None = None,
                 identity_head_optimizer: keras.optimizers.Optimizer | None = None,
                 contrastive_scale: float = 16.0) -> None:
        """`settings.batch_size` is |V| over all replicas (resolved: not 0); `identity_head_optimizer` trains the
        identity head alone in `head_warmup`; the verification objective scores V at cosine scale
        `contrastive_scale`."""
        if settings.scope not in META_SCOPES:
            raise ValueError(f"unknown meta scope {settings.scope!r}; expected one of {META_SCOPES}")
        if settings.target not in META_TARGETS:
            raise ValueError(f"unknown meta target {settings.target!r}; expected one of {META_TARGETS}")
        if settings.objective not in META_OBJECTIVES:
            raise ValueError(f"unknown meta objective {settings.objective!r}; expected one of {META_OBJECTIVES}")
        if settings.batch_size <= 0 or settings.batch_size % replicas:
            raise ValueError(f"the meta batch ({settings.batch_size}) must be a positive multiple of the "
                             f"{replicas} replica(s)")
        self.settings, self.contrastive_scale = settings, contrastive_scale
        self.margin_step = margin_step
        self.variation_heads, self.variation_optimizer = variation_heads, variation_optimizer
        self.identity_head_optimizer = identity_head_optimizer
        self.factor_weights = dict(zip(schema.FACTORS, settings.factor_weights))
        # |V| on this replica and over all replicas (the variation losses are means over the global V).
        self.meta_batch_size, self.global_meta_batch_size = settings.batch_size // replicas, settings.batch_size
        # Each factor's most frequent class in the training split: the others are its tail, for
        # the correlation of the learned residuals with tail membership (seed Sec. E).
        self.head_classes = head_classes or {}
        backbone = margin_step.backbone
        self.pseudo_mask = [settings.scope == "all" or v.path.startswith(OUTPUT_BLOCK_PREFIX)
                            for v in backbone.trainable_variables]
        self.output_block = OutputBlock(backbone) if settings.scope == "output_block" else None

    # ------------------------------------------------------------------ pieces

    def eta(self) -> tf.Tensor:
        """The pseudo-update step size: --meta_inner_lr, or the optimizer's current learning rate."""
        dtype = keras.config.floatx()
        if self.settings.inner_lr:
            return tf.constant(self.settings.inner_lr, dtype)
        return tf.cast(self.margin_step.optimizer.learning_rate, dtype)

    def variation_loss_sums(self, embeddings, labels) -> tuple[dict, dict]:
        """Per-factor variation loss over the global meta batch (unknown labels add 0), and the logits."""
        logits = self.variation_heads(embeddings)
        per_sample = variation_losses(logits, labels)
        return {f: tf.reduce_sum(loss) / self.global_meta_batch_size for f, loss in per_sample.items()}, logits

    def meta_objective(self, embeddings: tf.Tensor, meta_batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Per factor k, the loss on V whose derivative drives r^k: L_var^k (Eq. 13), or the verification
        objective, the contrastive loss of V with every class of factor k weighted equally."""
        labels = {factor: meta_batch[factor] for factor in schema.FACTORS}
        if self.settings.objective == "variation":
            return self.variation_loss_sums(embeddings, labels)[0]
        per_anchor = contrastive_losses(embeddings, meta_batch["identity"], self.contrastive_scale)
        return class_balanced_sums(per_anchor, labels)

    def trunk_features(self, meta_batch):
        """What the meta batch needs before the pseudo-update: its trunk features (scope `output_block` only)."""
        return None if self.output_block is None else self.output_block.trunk_features(meta_batch["image"])

    def select(self, batch, meta_pool):
        """The meta batch V drawn from the pool by --meta_sampling against the training batch's labels."""
        labels = {factor: batch[factor] for factor in schema.FACTORS}
        return select_meta_batch(meta_pool, labels, self.meta_batch_size, self.settings.sampling,
                                 self.settings.group_size)

    def meta_embeddings(self, meta_batch, pseudo_weights, trunk_features):
        """The meta batch's embeddings at the pseudo-updated weights (statistics dropped)."""
        step = self.margin_step
        if trunk_features is None:
            embeddings, _ = step.forward(meta_batch["image"], pseudo_weights)
            return embeddings
        paths = [v.path for v in step.backbone.trainable_variables]
        return self.output_block(trunk_features, dict(zip(paths, pseudo_weights)))

    def meta_gradients(self, batch, meta_batch, prior,
                       trunk_features=None) -> tuple[tf.Tensor | None, tf.Tensor | None, RecordedForward]:
        """Steps (a)-(c)'s derivatives through one pseudo-update: per factor k, dL^k_meta/dm_j [B, factors]
        (--meta_target margins or both, else None); dL_meta/d eps_j [B] of a loss weight u_j + eps_j at eps = 0
        (u_j the data weight, 1 without --loss_weighting), L_meta = sum_k w_k L^k_meta (weights or both, else None);
        and the recorded forward pass the real update replays."""
        step = self.margin_step
        weights = [v.value for v in step.backbone.trainable_variables]
        zero, eps = tf.zeros_like(prior), tf.zeros_like(prior)
        context = tf.distribute.get_replica_context()
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([zero, eps])
            # r^k enters the margin only through sum_k r^k, so dL/dr^k = dL/d(sum): one watched zero suffices.
            margins = prior + zero
            with tf.GradientTape(persistent=True) as inner:
                inner.watch(weights)
                embeddings, statistics = step.forward(batch["image"], weights)
                # eps is added to each sample's data weight (1 without --loss_weighting), only when weights are
                # learned (the margins' path stays as it was). Added, not multiplied: dL_meta/d eps_j is then sample
                # j's alignment with the meta batch, and the real update's data weight is not counted twice.
                loss, _, _ = step.batch_loss(embeddings, batch, margins, commit=False,
                                             weight_offsets=eps if self.learns_weights else None)
            gradients = inner.gradient(loss, [w for w, chosen in zip(weights, self.pseudo_mask) if chosen])
            if context is not None and context.num_replicas_in_sync > 1:
                gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            pseudo = pseudo_update(weights, gradients, self.pseudo_mask, self.eta())
            losses = self.meta_objective(self.meta_embeddings(meta_batch, pseudo, trunk_features), meta_batch)
            weighted = [self.factor_weights[f] * losses[f] for f in schema.FACTORS if self.factor_weights[f]]
            total = tf.add_n(weighted) if weighted else tf.zeros([], prior.dtype)
        margin_derivatives = weight_derivative = None
        if self.learns_margins:
            margin_derivatives = tf.stack([
                outer.gradient(losses[factor], zero, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                if self.factor_weights[factor] else tf.zeros_like(prior) for factor in schema.FACTORS], axis=1)
        if self.learns_weights:
            weight_derivative = outer.gradient(total, eps, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        del outer
        return margin_derivatives, weight_derivative, RecordedForward(inner, weights, embeddings, statistics)

    def residuals_from(self, margin_derivatives: tf.Tensor) -> tf.Tensor:
        """Eq. 13's residuals r^k_j = clip(-tau w_k dL^k/dm_j, +-r_max) [B, factors]."""
        factor_weights = tf.constant([self.factor_weights[f] for f in schema.FACTORS], margin_derivatives.dtype)
        limit = self.settings.residual_max
        return tf.clip_by_value(-self.settings.tau * factor_weights * margin_derivatives, -limit, limit)

    def weights_from(self, weight_derivative: tf.Tensor, data_weights: tf.Tensor | None = None) -> tf.Tensor:
        """Learning to reweight's loss weights [B]: max(-dL_meta/d eps_j, 0) (to --meta_weight_power) normalised to
        mean 1 over the global batch under the data weights u (sum_j u_j w_j = sum_j u_j: the learned weights move
        the batch's weight between samples, never add to it; all 1 where every derivative is >= 0), mixed with 1 by
        --meta_weight_mix."""
        raw = tf.nn.relu(-weight_derivative)
        if self.settings.weight_power != 1.0:
            raw = raw ** self.settings.weight_power
        if data_weights is None:
            total, count = tf.reduce_sum(raw), tf.cast(self.margin_step.global_batch, raw.dtype)
        else:
            data_weights = tf.cast(data_weights, raw.dtype)
            total, count = tf.reduce_sum(data_weights * raw), tf.reduce_sum(data_weights)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, total)
            if data_weights is not None:
                count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
        learned = tf.where(total > 0, raw * count / tf.where(total > 0, total, 1.0), tf.ones_like(raw))
        mix = self.settings.weight_mix
        return (1.0 - mix) + mix * learned

    def residuals(self, batch, meta_batch, prior, trunk_features=None) -> tuple[tf.Tensor, RecordedForward]:
        """Steps (a)-(c): r [B, factors], and the recorded forward pass the real update replays."""
        margin_derivatives, _, recorded = self.meta_gradients(batch, meta_batch, prior, trunk_features)
        return self.residuals_from(margin_derivatives), recorded

    def recorded_forward(self, batch) -> RecordedForward:
        """The forward pass on T under a tape, for a real update with no residuals to learn (tau = 0)."""
        step = self.margin_step
        weights = [v.value for v in step.backbone.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            embeddings, statistics = step.forward(batch["image"], weights)
        return RecordedForward(tape, weights, embeddings, statistics)

    @property
    def learns_margins(self) -> bool:
        """Whether residuals are learned: --meta_target margins or both, tau and some factor weight not 0."""
        return (self.settings.target in ("margins", "both") and self.settings.tau != 0
                and any(weight != 0 for weight in self.factor_weights.values()))

    @property
    def learns_weights(self) -> bool:
        """Whether loss weights are learned: --meta_target weights or both, some factor weight not 0."""
        return self.settings.target in ("weights", "both") and any(w != 0 for w in self.factor_weights.values())

    def real_update(self, batch, margins, recorded: RecordedForward, weights: tf.Tensor | None = None):
        """Step (d): gradients at the final margins (and learned loss weights), the backbone's by replaying the
        recorded backward pass."""
        step = self.margin_step
        features = tf.stop_gradient(recorded.embeddings)
        head_variables = step.head_variables
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss, per_sample, correct = step.batch_loss(features, batch, margins, extra_weights=weights)
        feature_gradient, *head_gradients = tape.gradient(loss, [features, *head_variables])
        backbone_gradients = recorded.tape.gradient(recorded.embeddings, recorded.weights,
                                                    output_gradients=feature_gradient)
        applied = step.update(backbone_gradients + head_gradients, recorded.statistics, per_sample)
        return per_sample, correct, applied

    def heads_update(self, meta_batch, trunk_features=None) -> VariationSums:
        """Step (e): the variation heads on V at the current weights (features stop-gradient)."""
        step = self.margin_step
        if trunk_features is None:
            embeddings, _ = step.forward(meta_batch["image"])
        else:
            current = {v.path: v.value for v in step.backbone.trainable_variables}
            embeddings = self.output_block(trunk_features, current)
        embeddings = tf.stop_gradient(embeddings)
        labels = {factor: meta_batch[factor] for factor in schema.FACTORS}
        with tf.GradientTape() as tape:
            losses, logits = self.variation_loss_sums(embeddings, labels)
            total = tf.add_n(list(losses.values()))
        gradients = tape.gradient(total, self.variation_heads.trainable_variables)
        self.variation_optimizer.apply_gradients(zip(gradients, self.variation_heads.trainable_variables))
        sums = VariationSums({}, {}, {})
        for factor in schema.FACTORS:
            known = labels[factor] >= 0
            correct = tf.equal(tf.argmax(logits[factor], axis=-1, output_type=tf.int32), labels[factor])
            sums.loss[factor] = losses[factor] * self.global_meta_batch_size
            sums.correct[factor] = tf.reduce_sum(tf.cast(correct & known, tf.float32))
            sums.known[factor] = tf.reduce_sum(tf.cast(known, tf.float32))
        return sums

    # ------------------------------------------------------------------ replica steps

    def __call__(self, batch: dict[str, tf.Tensor], meta_pool: dict[str, tf.Tensor]) -> StepOutput:
        """One MvCoM iteration (a)-(e)."""
        prior = self.margin_step.margins(batch)
        meta_batch = self.select(batch, meta_pool)
        trunk_features = self.trunk_features(meta_batch)
        residuals = tf.zeros([tf.shape(prior)[0], len(schema.FACTORS)], prior.dtype)
        weights = None
        if self.learns_margins or self.learns_weights:
            margin_derivatives, weight_derivative, recorded = self.meta_gradients(batch, meta_batch, prior,
                                                                                  trunk_features)
            if margin_derivatives is not None:
                residuals = self.residuals_from(margin_derivatives)
            if weight_derivative is not None:
                weights = self.weights_from(weight_derivative, batch.get("weight"))
        else:
            recorded = self.recorded_forward(batch)
        margins = prior + tf.reduce_sum(residuals, axis=1)
        per_sample, correct, applied = self.real_update(batch, margins, recorded, weights)
        identity = sums_of_samples(per_sample, correct, margins, applied if self.margin_step.skip_nonfinite else None)
        weight_column = None if weights is None else weights[:, None]
        stage = MetaSums(self.heads_update(meta_batch, trunk_features), residual_sums(residuals, batch),
                         tail_sums(residuals, batch, self.head_classes) if self.head_classes else (),
                         () if weights is None else residual_sums(tf.tile(weight_column, [1, len(schema.FACTORS)]),
                                                                  batch),
                         tail_sums(weight_column, batch, self.head_classes) if weights is not None
                         and self.head_classes else ())
        samples = MetaSamples(margin=margins, faces=batch["image"][:FIGURE_FACES],
                              residual={factor: residuals[:, k] for k, factor in enumerate(schema.FACTORS)})
        return StepOutput(StepSums(_images(batch), identity, stage), samples)

    def variation_warmup(self, batch: dict[str, tf.Tensor], meta_pool: dict[str, tf.Tensor]) -> StepOutput:
        """A heads-only step: the variation heads learn, the backbone and identity head stay."""
        meta_batch = self.select(batch, meta_pool)
        variation = self.heads_update(meta_batch, self.trunk_features(meta_batch))
        return StepOutput(StepSums(_images(batch), stage=MetaSums(variation)))

    def head_warmup(self, batch: dict[str, tf.Tensor], meta_pool: dict[str, tf.Tensor]) -> StepOutput:
        """An identity-head-only step (a model imported without its class centres): the backbone frozen,
        its BatchNorm in inference mode, the head trained on the margin loss by its own optimizer."""
        step = self.margin_step
        features = tf.stop_gradient(step.backbone(batch["image"], training=False))
        margins = step.margins(batch)
        with tf.GradientTape() as tape:
            loss, per_sample, correct = step.batch_loss(features, batch, margins)
        gradients = tape.gradient(loss, step.head.trainable_variables)
        self.identity_head_optimizer.apply_gradients(zip(gradients, step.head.trainable_variables))
        return StepOutput(StepSums(_images(batch), sums_of_samples(per_sample, correct, margins)))


def _images(batch: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.cast(tf.size(batch["identity"]), tf.float32)
