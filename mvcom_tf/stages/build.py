"""From a TrainConfig to a ready Stage: datasets checked, model, head and optimizers built in the strategy scope.

The one place where the pieces are wired together: the training command, the tests and the
benchmarks all build their stages here.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mvcom_tf.config import (IdentityHeadConfig, MetaConfig, ModelConfig, OptimizerConfig, Schedule,
                             TrainConfig, WeightingConfig)
from mvcom_tf.data import schema
from mvcom_tf.data.sample_weights import DATA_WEIGHTINGS, DataWeighting
from mvcom_tf.data.tfrecord import DatasetInfo
from mvcom_tf.evaluation.metrics import paired_bootstrap, result_difference
from mvcom_tf.files import read_array
from mvcom_tf.losses.group_dro import GroupDRO
from mvcom_tf.losses.margins import class_aware_margins, head_classes, tail_class_offsets
from mvcom_tf.meta.step import MetaStep
from mvcom_tf.models.heads import MarginHead, VariationHeads, centre_initializer
from mvcom_tf.models.iresnet import build_iresnet, float32_if_mixed
from mvcom_tf.models.sharded_head import ShardedCentres, ShardedMarginHead, head_footprint
from mvcom_tf.stages.meta import MetaStage
from mvcom_tf.stages.pretrain import PretrainStage
from mvcom_tf.training.momentum_sgd import MomentumSGD
from mvcom_tf.margin_step import MarginStep, ShardedMarginStep
from mvcom_tf.training.distribute import read_input
from mvcom_tf.training.stage import Stage


def control_config(config: TrainConfig) -> TrainConfig:
    """The finetune stage's settings: the meta stage's, with a constant margin and no residuals (tau = 0 takes
    exactly the plain margin steps), so MvCoM is credited only with its difference from it."""
    return config.with_flags(margin_prior="constant", meta_lr_tau=0.0, meta_target="margins",
                             oracle_margin_deltas=(0.0,) * len(config.meta.oracle_margin_deltas),
                             loss_weighting="none", train_sampling="natural")


def pretrain_config(config: TrainConfig) -> TrainConfig:
    """The pretrain stage's settings: plain CosFace on the natural stream. --train_sampling and --loss_weighting are
    the meta stage's, so a run of --stage=pretrain,finetune,meta pre-trains the same whatever recipe it fine-tunes."""
    return config.with_flags(loss_weighting="none", train_sampling="natural")


def build_stage(config: TrainConfig, name: str, strategy: tf.distribute.Strategy) -> Stage:
    """The stage `name` of --stage, its variables created in the strategy's scope."""
    if name == "finetune":
        config = control_config(config)
    elif name == "pretrain":
        config = pretrain_config(config)
    data, seed = config.data, config.runtime.seed
    train = read_input("train_data", data.train_data, config.optimizer.batch_size, seed)
    schedule = config.schedule(name)
    info = train.info
    log_head_footprint(config, info.num_identities, strategy.num_replicas_in_sync)
    pretrain = name == "pretrain"
    weighting = config.weighting
    train = dataclasses.replace(train, balanced=data.train_sampling == "balanced",
                                weighting=data_weighting(weighting))
    group_dro = None
    if weighting.loss_weighting == "groupdro":
        with strategy.scope():
            group_dro = GroupDRO(weighting.groupdro_step_size)
    if pretrain:  # margin priors and oracle offsets are the fine-tuning's too
        margins, offsets = constant_margins(config.head.margin, info.num_identities), {}
    else:
        margins, offsets = prior_margins(config.head, info), oracle_offsets(config.meta, info.histograms)
    margin_step = build_margin_step(config, info.num_identities, margins, strategy,
                                    steps_per_epoch=train.steps_per_epoch, schedule=schedule, offsets=offsets,
                                    group_dro=group_dro)
    common = dict(name=name, schedule=schedule, backbone=margin_step.backbone, head=margin_step.checkpointed_head,
                  optimizer=margin_step.optimizer, train=train,
                  own_trackables={"group_dro": group_dro} if group_dro else {})
    if pretrain:
        return PretrainStage(**common, margin_step=margin_step)
    with strategy.scope():
        meta_step, trackables = build_meta_step(config, margin_step, info.histograms, strategy.num_replicas_in_sync)
    meta = config.meta
    pool = config.global_meta_batch * (meta.pool_factor if meta.sampling == "hard" else 1)
    meta_input = read_input("meta_data", data.meta_data, config.global_meta_batch, seed + 1)
    meta_pool = dataclasses.replace(meta_input, global_batch=pool, group_size=meta.group_size)
    common["own_trackables"] = {**common["own_trackables"], **trackables}
    return MetaStage(**common, meta_step=meta_step, meta_pool=meta_pool, head_warmup_steps=meta.head_warmup_steps,
                     variation_warmup_steps=meta.variation_warmup_steps)


def summarise_run(stage_metrics: dict) -> dict:
    """metrics.json's `meta_minus_finetune`: MvCoM's difference from the CosFace fine-tuning of the same run (same
    start, batches and length), when both ran and were evaluated; logged."""
    meta, control = stage_metrics.get("meta", {}), stage_metrics.get("finetune", {})
    if "accuracy" not in meta or "accuracy" not in control:
        return {}
    difference = result_difference(meta, control)
    if "pair_outcomes" in meta and "pair_outcomes" in control:
        outcomes, baseline = read_array(meta["pair_outcomes"]), read_array(control["pair_outcomes"])
        mean, low, high = paired_bootstrap(outcomes, baseline)
        difference["accuracy"].update(pairs=int(len(outcomes)), pair_mean=mean, interval=[low, high])
    for name, figures in difference.items():
        interval = ""
        if "interval" in figures:
            interval = (" [{:+.4f}, {:+.4f}] (95%, paired bootstrap over the {} test pairs: {})".format(
                *figures["interval"], figures["pairs"],
                "not beyond noise" if figures["interval"][0] <= 0 <= figures["interval"][1] else "beyond noise"))
        logging.info("meta stage against CosFace fine-tuning (same start, batches and length), %s: %.4f - %.4f = "
                     "%+.4f%s", name, figures["value"], figures["baseline"], figures["difference"], interval)
    return {"meta_minus_finetune": difference}


def build_margin_step(config: TrainConfig, num_identities: int, margins: tf.Tensor,
                      strategy: tf.distribute.Strategy | None = None, *, steps_per_epoch: int = 1,
                      schedule: Schedule | None = None, offsets: dict[str, tf.Tensor] | None = None,
                      backbone: keras.Model | None = None, group_dro: GroupDRO | None = None) -> MarginStep:
    """The identity margin step: the backbone (built from --backbone... unless given, in the scope), the identity
    head (replicated, or sharded over the replicas by --head_sharding) and SGD on `schedule` (default: the
    pretrain stage's); `margins` per identity, `offsets` per variation class (the oracle), `group_dro` GroupDRO's
    loss weights."""
    strategy = strategy or tf.distribute.get_strategy()
    schedule = schedule or config.pretrain
    head_config, batch = config.head, config.optimizer.batch_size
    with strategy.scope():
        backbone = backbone or build_backbone(config.model)
    if head_config.sharding == "sharded":
        head = sharded_head(config, num_identities, strategy)
        variables = backbone.trainable_variables
    else:
        with strategy.scope():
            head = MarginHead(num_identities, head_config.loss, head_config.scale, name="identity_head",
                              dtype=float32_if_mixed())
            head.build((None, config.model.embedding_size))
        variables = backbone.trainable_variables + head.trainable_variables
    with strategy.scope():
        optimizer = build_optimizer(config.optimizer, schedule, steps_per_epoch, variables,
                                    loss_scaling=config.runtime.mixed_precision == "float16")
    if head_config.sharding == "sharded":
        return ShardedMarginStep(backbone, head, optimizer, margins, batch, config.optimizer.momentum,
                                 config.optimizer.weight_decay, factor_offsets=offsets, group_dro=group_dro)
    return MarginStep(backbone, head, optimizer, margins, batch, skip_nonfinite=config.runtime.nan_policy == "skip",
                      factor_offsets=offsets, group_dro=group_dro)


def data_weighting(weighting: WeightingConfig) -> DataWeighting | None:
    """The per-record loss weights the input pipeline computes for --loss_weighting (None: none, or GroupDRO's,
    which the step computes)."""
    if weighting.loss_weighting not in DATA_WEIGHTINGS:
        return None
    return DataWeighting(weighting.loss_weighting, weighting.error_set, weighting.error_set_upweight)


def sharded_head(config: TrainConfig, num_identities: int, strategy: tf.distribute.Strategy) -> ShardedMarginHead:
    """The identity head with its centres split over the replicas (and Partial FC sampling)."""
    # The replicated head's initial W, drawn at the same point of Keras' seeded sequence (after the
    # backbone): a seed starts both heads, and any replica count, from the same centres. It exists
    # once on the host, as it does at every save.
    embedding_size, seed = config.model.embedding_size, config.runtime.seed
    with tf.device("/cpu:0"):
        initial = centre_initializer()((embedding_size, num_identities), dtype=keras.config.floatx())
    # Outside the scope: one plain variable per replica on its device, not a mirrored copy of all classes.
    centres = ShardedCentres.for_strategy(strategy, num_identities, embedding_size, seed, keras.config.floatx(),
                                          initial=initial)
    head = config.head
    return ShardedMarginHead(centres, head.loss, head.scale, head.partial_fc_rate, config.optimizer.batch_size, seed)


def log_head_footprint(config: TrainConfig, num_classes: int, replicas: int) -> None:
    """The identity head's memory and communication per replica, from the formulas of head_footprint."""
    head = config.head
    figures = head_footprint(num_classes, config.model.embedding_size, replicas, config.optimizer.batch_size,
                             head.sharding == "sharded", head.partial_fc_rate)
    logging.info("identity head, %s over %d replica(s): %d centres per replica, %.3g GB of centres, momentum and "
                 "gradient, %.3g MB of logits, %.3g MB sent per step", head.sharding, replicas,
                 figures["centres"], figures["state_bytes"] / 1e9, figures["logits_bytes"] / 1e6,
                 figures["sent_bytes"] / 1e6)


def build_backbone(model: ModelConfig) -> keras.Model:
    """The IResNet of --backbone, --image_size, --embedding_size, --width_multiplier, --dropout, --sync_bn,
    --fused_bn."""
    return build_iresnet(model.backbone, model.image_size, model.embedding_size, model.width_multiplier,
                         model.dropout, model.sync_bn, model.fused_bn)


def build_optimizer(settings: OptimizerConfig, schedule: Schedule, steps_per_epoch: int, variables: list,
                    loss_scaling: bool = False) -> keras.optimizers.Optimizer:
    """SGD (momentum, decoupled weight decay, the stage's lr steps), built for `variables`; `loss_scaling` wraps it
    in Keras' LossScaleOptimizer (float16, whose gradients underflow unscaled)."""
    optimizer = MomentumSGD(learning_rate_schedule(schedule, steps_per_epoch), momentum=settings.momentum,
                            weight_decay=settings.weight_decay or None)
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return optimizer


def prior_margins(head: IdentityHeadConfig, info: DatasetInfo) -> tf.Tensor:
    """The meta stage's per-identity margins: --margin, or the class-aware volume prior (METHOD.md)."""
    if head.margin_prior != "volume":
        return constant_margins(head.margin, info.num_identities)
    margins = class_aware_margins(info.images_per_identity, head.margin, head.margin_prior_power,
                                  head.margin_min, head.margin_max)
    return tf.constant(margins, keras.config.floatx())


def oracle_offsets(meta: MetaConfig, histograms: dict[str, list[int]]) -> dict[str, tf.Tensor]:
    """The bias study's oracle: --oracle_margin_deltas added for the tail classes of each factor ({}: none)."""
    deltas = dict(zip(schema.FACTORS, meta.oracle_margin_deltas))
    return {factor: tf.constant(values, keras.config.floatx())
            for factor, values in tail_class_offsets(histograms, deltas, meta.oracle_side).items()}


def build_meta_step(config: TrainConfig, margin_step: MarginStep, histograms: dict[str, list[int]],
                    replicas: int) -> tuple[MetaStep, dict]:
    """The MvCoM step around a margin step (replicated or sharded head): variation heads and their optimizer
    (and the identity head's warm-up optimizer), built; returns it with those new checkpoint entries (call in
    scope). `histograms` are the training split's variation label counts (dataset.json): the head classes
    of the tail statistics come from them ({}: none)."""
    meta, momentum = config.meta, config.optimizer.momentum
    variation_heads = VariationHeads(name="variation_heads", dtype=float32_if_mixed())
    variation_heads.build((None, config.model.embedding_size))
    variation_optimizer = keras.optimizers.SGD(meta.variation_lr, momentum=momentum)
    variation_optimizer.build(variation_heads.trainable_variables)
    trackables = {"variation_heads": variation_heads, "variation_optimizer": variation_optimizer}
    identity_head_optimizer = None
    if meta.head_warmup_steps:  # replicated head only (a flag validator says so)
        identity_head_optimizer = keras.optimizers.SGD(meta.head_warmup_lr, momentum=momentum)
        identity_head_optimizer.build(margin_step.head.trainable_variables)
        trackables["identity_head_warmup_optimizer"] = identity_head_optimizer
    meta_step = MetaStep(margin_step, variation_heads, variation_optimizer,
                         dataclasses.replace(meta, batch_size=config.global_meta_batch), replicas=replicas,
                         head_classes=head_classes(histograms), identity_head_optimizer=identity_head_optimizer,
                         contrastive_scale=config.head.scale)
    return meta_step, trackables


def learning_rate_schedule(schedule: Schedule, steps_per_epoch: int):
    """lr, multiplied by 0.1 at each epoch of lr_steps (counted in optimizer steps)."""
    if not schedule.lr_steps:
        return schedule.lr
    boundaries = [int(round(epoch * steps_per_epoch)) for epoch in schedule.lr_steps]
    values = [schedule.lr * 0.1 ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def constant_margins(margin: float, num_identities: int) -> tf.Tensor:
    """Every identity's margin m (CosFace pre-training, seed Sec. C)."""
    return tf.constant(np.full(num_identities, margin, np.float32), keras.config.floatx())
