"""The MvCoM meta step: per-sample margin residuals meta-learned from the variation losses (seed Sec. B).

One iteration, per replica, for a training batch T and a meta batch V:
  (a) r^k_j = 0 for every sample j of T and factor k; m_j = m_{y_j} + sum_k r^k_j.
  (b) pseudo update (Eq. 12): Omega~ = Omega - eta * grad_Omega L(T; m), as tensors, run with
      `stateless_call`; the BatchNorm statistics of that pass are dropped.
  (c) meta update (Eq. 13): r^k = clip(-tau * w_k * dL_var^k(V; Omega~) / dr^k, +-r_max), the
      derivative taken through Omega~ (second order: the inner tape's gradient is recorded
      by the outer tape).
  (d) real update (Eq. 14): the optimizer steps on L(T; m_y + sum_k r^k), its backbone gradient
      obtained by replaying the backward pass recorded in (b) with the new output gradient.
  (e) the variation heads learn on V at the current Omega, features stop-gradient.
Under MirroredStrategy the pseudo update uses the all-reduced gradient, exactly as one device
with the whole batch would, and the meta-gradient flows back through that all-reduce.
"""

from __future__ import annotations

import inspect

import keras
import numpy as np
import tensorflow as tf

from mvcom_tf.config import TrainConfig
from mvcom_tf.data import schema
from mvcom_tf.data.tfrecord import DatasetInfo
from mvcom_tf.losses.margins import head_classes, identity_loss, tail_class_offsets, variation_losses
from mvcom_tf.meta.figure import margin_figure
from mvcom_tf.meta.sampling import select_meta_batch
from mvcom_tf.models.heads import VariationHeads
from mvcom_tf.models.iresnet import OUTPUT_BLOCK_PREFIX, float32_if_mixed
from mvcom_tf.steps import MarginStep, batch_metrics

META_SCOPES = ("all", "head")
# Faces of each replica's batch drawn with their residuals (the seed's Fig. 6) in TensorBoard.
FIGURE_FACES = 4
FIGURE_IMAGES = "figure/images"


class MetaStep:
    """The meta stage's training step (a callable run per replica), and its heads-only warm-up."""

    def __init__(self, margin_step: MarginStep, variation_heads: VariationHeads,
                 heads_optimizer: keras.optimizers.Optimizer, *, tau: float, inner_lr: float, residual_max: float,
                 scope: str, factor_weights: tuple[float, ...], sampling: str, meta_batch: int,
                 global_meta_batch: int, warmup_steps: int = 0, head_classes: dict[str, int] | None = None,
                 head_warmup_steps: int = 0, head_optimizer: keras.optimizers.Optimizer | None = None) -> None:
        if scope not in META_SCOPES:
            raise ValueError(f"unknown meta scope {scope!r}; expected one of {META_SCOPES}")
        self.margin_step, self.heads, self.heads_optimizer = margin_step, variation_heads, heads_optimizer
        self.tau, self.inner_lr, self.residual_max = tau, inner_lr, residual_max
        self.factor_weights = dict(zip(schema.FACTORS, factor_weights))
        self.sampling, self.meta_batch, self.global_meta_batch = sampling, meta_batch, global_meta_batch
        self.warmup_steps, self.head_warmup_steps, self.head_optimizer = warmup_steps, head_warmup_steps, head_optimizer
        # Each factor's most frequent class in the training split: the others are its tail, for
        # the correlation of the learned residuals with tail membership (seed Sec. E).
        self.head_classes = head_classes or {}
        backbone = margin_step.backbone
        self.scope = scope
        self.pseudo_mask = [scope == "all" or v.path.startswith(OUTPUT_BLOCK_PREFIX)
                            for v in backbone.trainable_variables]
        if scope == "head":
            # The pseudo-update leaves the trunk as it is, so the meta batch goes through the
            # trunk once, and through the output block at the pseudo and at the current weights.
            self.output_layers = [layer for layer in backbone.layers if layer.name.startswith(OUTPUT_BLOCK_PREFIX)]
            self.trunk = keras.Model(backbone.inputs, self.output_layers[0].input)

    # ------------------------------------------------------------------ pieces

    def eta(self) -> tf.Tensor:
        """The pseudo-update step size: --meta_inner_lr, or the optimizer's current learning rate."""
        dtype = keras.config.floatx()
        if self.inner_lr:
            return tf.constant(self.inner_lr, dtype)
        return tf.cast(self.margin_step.optimizer.learning_rate, dtype)

    def variation_loss_sums(self, embeddings, labels) -> tuple[dict, dict]:
        """Per-factor variation loss over the global meta batch (unknown labels add 0), and the logits."""
        logits = self.heads(embeddings)
        per_sample = variation_losses(logits, labels)
        return {f: tf.reduce_sum(loss) / self.global_meta_batch for f, loss in per_sample.items()}, logits

    def output_block(self, features, weights: dict):
        """The output block on trunk features, at the given weights (by variable path); statistics dropped."""
        for layer in self.output_layers:
            trainable = [weights[v.path] for v in layer.trainable_variables]
            non_trainable = [v.value for v in layer.non_trainable_variables]
            # stateless_call hands keyword arguments to `call` as they are: Flatten takes no `training`.
            mode = {"training": True} if "training" in inspect.signature(layer.call).parameters else {}
            features, _ = layer.stateless_call(trainable, non_trainable, features, **mode)
        return features

    def meta_features(self, meta):
        """What the meta batch needs before the pseudo-update: its trunk features (scope `head` only)."""
        if self.scope != "head":
            return None
        trunk = self.trunk
        features, _ = trunk.stateless_call([v.value for v in trunk.trainable_variables],
                                           [v.value for v in trunk.non_trainable_variables], meta["image"],
                                           training=True)
        return tf.stop_gradient(features)

    def meta_batch_of(self, batch, pool):
        labels = {factor: batch[factor] for factor in schema.FACTORS}
        return select_meta_batch(pool, labels, self.meta_batch, self.sampling)

    def residuals(self, batch, meta, prior, trunk_features=None):
        """Steps (a)-(c): r [B, factors], plus the recorded pieces the real update replays."""
        step = self.margin_step
        images, labels = batch["image"], batch["identity"]
        weights = [v.value for v in step.backbone.trainable_variables]
        zero = tf.zeros_like(prior)
        context = tf.distribute.get_replica_context()
        meta_labels = {factor: meta[factor] for factor in schema.FACTORS}
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(zero)
            # r^k enters the margin only through sum_k r^k, so dL/dr^k = dL/d(sum): one watched zero suffices.
            margins = prior + zero
            with tf.GradientTape(persistent=True) as inner:
                inner.watch(weights)
                embeddings, statistics = step.forward(images, weights)
                logits = step.head(embeddings, labels, margins)
                loss = tf.reduce_sum(identity_loss(logits, labels)) / step.global_batch
            pseudo_sources = [w for w, m in zip(weights, self.pseudo_mask) if m]
            gradients = inner.gradient(loss, pseudo_sources)
            if context is not None and context.num_replicas_in_sync > 1:
                gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            eta = self.eta()
            updated = iter([w - eta * g for w, g in zip(pseudo_sources, gradients)])
            pseudo = [next(updated) if m else w for w, m in zip(weights, self.pseudo_mask)]
            if trunk_features is None:
                meta_embeddings, _ = step.forward(meta["image"], pseudo)
            else:
                paths = [v.path for v in step.backbone.trainable_variables]
                meta_embeddings = self.output_block(trunk_features, dict(zip(paths, pseudo)))
            losses, _ = self.variation_loss_sums(meta_embeddings, meta_labels)
        columns = []
        for factor in schema.FACTORS:
            weight = self.factor_weights[factor]
            if weight == 0:
                columns.append(tf.zeros_like(prior))
                continue
            derivative = outer.gradient(losses[factor], zero, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            columns.append(tf.clip_by_value(-self.tau * weight * derivative, -self.residual_max, self.residual_max))
        del outer
        return tf.stack(columns, axis=1), (inner, weights, embeddings, statistics)

    def recorded_forward(self, batch):
        """The forward pass on T under a tape, for a real update with no residuals to learn (tau = 0)."""
        step = self.margin_step
        weights = [v.value for v in step.backbone.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            embeddings, statistics = step.forward(batch["image"], weights)
        return tape, weights, embeddings, statistics

    @property
    def learns_residuals(self) -> bool:
        """False when tau or every factor weight is 0: the residuals are then 0 and not computed."""
        return self.tau != 0 and any(weight != 0 for weight in self.factor_weights.values())

    def real_update(self, batch, margins, recorded):
        """Step (d): gradients at the final margins, the backbone's by replaying the recorded backward pass."""
        step = self.margin_step
        inner, weights, embeddings, statistics = recorded
        labels = batch["identity"]
        features = tf.stop_gradient(embeddings)
        with tf.GradientTape() as tape:
            tape.watch(features)
            logits = step.head(features, labels, margins)
            per_sample = identity_loss(logits, labels)
            loss = tf.reduce_sum(per_sample) / step.global_batch
        feature_gradient, *head_gradients = tape.gradient(loss, [features, *step.head.trainable_variables])
        backbone_gradients = inner.gradient(embeddings, weights, output_gradients=feature_gradient)
        applied = step.update(backbone_gradients + head_gradients, statistics, per_sample)
        return per_sample, logits, applied

    def heads_update(self, meta, trunk_features=None) -> dict[str, tf.Tensor]:
        """Step (e): the variation heads on V at the current weights (features stop-gradient)."""
        step = self.margin_step
        if trunk_features is None:
            embeddings, _ = step.forward(meta["image"])
        else:
            embeddings = self.output_block(trunk_features, {v.path: v.value for v in step.backbone.trainable_variables})
        embeddings = tf.stop_gradient(embeddings)
        labels = {factor: meta[factor] for factor in schema.FACTORS}
        with tf.GradientTape() as tape:
            losses, logits = self.variation_loss_sums(embeddings, labels)
            total = tf.add_n(list(losses.values()))
        gradients = tape.gradient(total, self.heads.trainable_variables)
        self.heads_optimizer.apply_gradients(zip(gradients, self.heads.trainable_variables))
        metrics = {}
        for factor in schema.FACTORS:
            known = labels[factor] >= 0
            correct = tf.equal(tf.argmax(logits[factor], axis=-1, output_type=tf.int32), labels[factor])
            metrics[f"variation/{factor}/loss"] = losses[factor] * self.global_meta_batch
            metrics[f"variation/{factor}/correct"] = tf.reduce_sum(tf.cast(correct & known, tf.float32))
            metrics[f"variation/{factor}/known"] = tf.reduce_sum(tf.cast(known, tf.float32))
        return metrics

    # ------------------------------------------------------------------ steps

    def __call__(self, batch: dict[str, tf.Tensor], pool: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """One MvCoM iteration (a)-(e)."""
        prior = self.margin_step.margins(batch)
        meta = self.meta_batch_of(batch, pool)
        trunk_features = self.meta_features(meta)
        if self.learns_residuals:
            residuals, recorded = self.residuals(batch, meta, prior, trunk_features)
        else:
            residuals = tf.zeros([tf.shape(prior)[0], len(schema.FACTORS)], prior.dtype)
            recorded = self.recorded_forward(batch)
        margins = prior + tf.reduce_sum(residuals, axis=1)
        per_sample, logits, applied = self.real_update(batch, margins, recorded)
        metrics = batch_metrics(per_sample, logits, batch["identity"], margins,
                                applied if self.margin_step.skip_nonfinite else None)
        metrics.update(self.heads_update(meta, trunk_features))
        metrics.update(residual_sums(residuals, batch))
        if self.head_classes:
            metrics.update(tail_sums(residuals, batch, self.head_classes))
        metrics["values/margin/final"] = margins
        metrics.update({f"values/residual/{factor}": residuals[:, k] for k, factor in enumerate(schema.FACTORS)})
        metrics[f"values/{FIGURE_IMAGES}"] = batch["image"][:FIGURE_FACES]
        return metrics

    def warmup(self, batch: dict[str, tf.Tensor], pool: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """A heads-only step: the variation heads learn, the backbone and identity head stay."""
        meta = self.meta_batch_of(batch, pool)
        metrics = {"images": tf.cast(tf.size(batch["identity"]), tf.float32)}
        metrics.update(self.heads_update(meta, self.meta_features(meta)))
        return metrics

    def head_warmup(self, batch: dict[str, tf.Tensor], pool: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """An identity-head-only step (a model imported without its class centres): the backbone frozen,
        its BatchNorm in inference mode, the head trained on the margin loss by its own optimizer."""
        step = self.margin_step
        features = tf.stop_gradient(step.backbone(batch["image"], training=False))
        labels, margins = batch["identity"], step.margins(batch)
        with tf.GradientTape() as tape:
            logits = step.head(features, labels, margins)
            per_sample = identity_loss(logits, labels)
            loss = tf.reduce_sum(per_sample) / step.global_batch
        gradients = tape.gradient(loss, step.head.trainable_variables)
        self.head_optimizer.apply_gradients(zip(gradients, step.head.trainable_variables))
        return batch_metrics(per_sample, logits, labels, margins)

    def for_step(self, step: int):
        """The callable to run at a global step: the identity head's warm-up, the variation heads' warm-up,
        then the meta step."""
        if step < self.head_warmup_steps:
            return self.head_warmup
        return self.warmup if step < self.head_warmup_steps + self.warmup_steps else self

    def figures(self, latest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pictures for TensorBoard from the latest per-sample values: the seed's Fig. 6."""
        if FIGURE_IMAGES not in latest:
            return {}
        images = latest[FIGURE_IMAGES]
        # Gathered over replicas: replica r's faces are rows r * FIGURE_FACES onwards, and its
        # samples start at r * (B / replicas) in the residuals; the first replica's suffice.
        faces = images[:FIGURE_FACES]
        residuals = {factor: latest[f"residual/{factor}"][:len(faces)] for factor in schema.FACTORS}
        return {"margins/faces": margin_figure(faces, residuals, latest["margin/final"][:len(faces)])}

    def summaries(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """TensorBoard scalars from summed metrics: variation losses and accuracies, mean residual per class."""
        scalars = {}
        for factor in schema.FACTORS:
            known = float(sums.get(f"variation/{factor}/known", 0.0))
            if known:
                scalars[f"variation/{factor}/loss"] = float(sums[f"variation/{factor}/loss"]) / known
                scalars[f"variation/{factor}/accuracy"] = float(sums[f"variation/{factor}/correct"]) / known
            if f"residual/{factor}/sum" in sums:
                samples = float(sums["images"])
                mean = float(sums[f"residual/{factor}/all_sum"]) / samples
                scalars[f"residual/{factor}/std"] = float(
                    np.sqrt(max(float(sums[f"residual/{factor}/all_sq"]) / samples - mean ** 2, 0.0)))
                scalars.update(class_residual_summary(factor, sums, self.head_classes.get(factor)))
        if "tail/count" in sums:
            scalars["tail/correlation"] = correlation(sums["tail/count"], sums["tail/r"], sums["tail/r_sq"],
                                                      sums["tail/t"], sums["tail/rt"])
        return scalars


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


def class_residual_summary(factor: str, sums: dict[str, np.ndarray], head: int | None) -> dict[str, float]:
    """Per class of a factor: the mean residual (`margin/<factor>/<class>`), its standard error and count;
    with the factor's head class known, the correlation of r^k with membership of the factor's tail."""
    totals, squares = sums[f"residual/{factor}/sum"], sums[f"residual/{factor}/sq"]
    counts = sums[f"residual/{factor}/count"]
    scalars = {}
    for cls in range(schema.NUM_CLASSES[factor]):
        if counts[cls]:
            mean = float(totals[cls] / counts[cls])
            variance = max(float(squares[cls] / counts[cls]) - mean ** 2, 0.0)
            scalars[f"margin/{factor}/{cls}"] = mean
            scalars[f"margin_se/{factor}/{cls}"] = float(np.sqrt(variance / max(counts[cls] - 1, 1)))
            scalars[f"margin_count/{factor}/{cls}"] = float(counts[cls])
    if head is not None:
        tail = np.arange(len(counts)) != head
        scalars[f"tail/{factor}/correlation"] = correlation(
            counts.sum(), totals.sum(), squares.sum(), counts[tail].sum(), totals[tail].sum())
    return scalars


def residual_sums(residuals: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Per factor, the sum and count of r^k over the training samples of each class of that factor."""
    sums = {}
    for index, factor in enumerate(schema.FACTORS):
        labels = batch[factor]
        classes = schema.NUM_CLASSES[factor]
        onehot = tf.one_hot(labels, classes, dtype=residuals.dtype)  # -1 gives a zero row
        sums[f"residual/{factor}/sum"] = tf.linalg.matvec(onehot, residuals[:, index], transpose_a=True)
        sums[f"residual/{factor}/sq"] = tf.linalg.matvec(onehot, tf.square(residuals[:, index]), transpose_a=True)
        sums[f"residual/{factor}/count"] = tf.reduce_sum(onehot, axis=0)
        sums[f"residual/{factor}/all_sum"] = tf.reduce_sum(residuals[:, index])
        sums[f"residual/{factor}/all_sq"] = tf.reduce_sum(tf.square(residuals[:, index]))
    return sums


def tail_sums(residuals: tf.Tensor, batch: dict[str, tf.Tensor], heads: dict[str, int]) -> dict[str, tf.Tensor]:
    """Sums for the correlation of a sample's summed residual with its tail membership (a known label
    outside its factor's head class, for any factor)."""
    tail = tf.zeros_like(batch["identity"], tf.bool)
    for factor in schema.FACTORS:
        labels = batch[factor]
        tail |= (labels >= 0) & (labels != heads[factor])
    summed, tail = tf.reduce_sum(residuals, axis=1), tf.cast(tail, residuals.dtype)
    return {"tail/count": tf.cast(tf.size(summed), residuals.dtype), "tail/r": tf.reduce_sum(summed),
            "tail/r_sq": tf.reduce_sum(tf.square(summed)), "tail/t": tf.reduce_sum(tail),
            "tail/rt": tf.reduce_sum(summed * tail)}


def build_meta_step(config: TrainConfig, state, class_margins: tf.Tensor, global_batch: int,
                    meta_info: DatasetInfo, num_replicas: int, train_info: DatasetInfo) -> MetaStep:
    """The meta step with its variation heads and their optimizer (call in the strategy scope)."""
    heads = VariationHeads(name="variation_heads", dtype=float32_if_mixed())
    heads.build((None, config.embedding_size))
    heads_optimizer = keras.optimizers.SGD(config.variation_lr, momentum=config.momentum)
    heads_optimizer.build(heads.trainable_variables)
    state.extras.update(variation_heads=heads, variation_optimizer=heads_optimizer)
    head_optimizer = None
    if config.head_warmup_steps:
        head_optimizer = keras.optimizers.SGD(config.head_warmup_lr, momentum=config.momentum)
        head_optimizer.build(state.head.trainable_variables)
        state.extras["identity_head_warmup_optimizer"] = head_optimizer
    deltas = dict(zip(schema.FACTORS, config.oracle_margin_deltas))
    offsets = {factor: tf.constant(values, keras.config.floatx())
               for factor, values in tail_class_offsets(train_info.histograms, deltas).items()}
    margin_step = MarginStep(state.backbone, state.head, state.optimizer, class_margins, global_batch,
                             skip_nonfinite=config.nan_policy == "skip", factor_offsets=offsets)
    return MetaStep(
        margin_step, heads, heads_optimizer, tau=config.meta_lr_tau, inner_lr=config.meta_inner_lr,
        residual_max=config.residual_max, scope=config.meta_scope, factor_weights=config.factor_weights,
        sampling=config.meta_sampling, meta_batch=config.meta_batch_size // num_replicas,
        global_meta_batch=config.meta_batch_size, warmup_steps=config.variation_warmup_steps,
        head_classes=head_classes(train_info.histograms), head_warmup_steps=config.head_warmup_steps,
        head_optimizer=head_optimizer)
