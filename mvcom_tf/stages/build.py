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

from mvcom_tf.config import FINE_TUNING_STAGES, Schedule, TrainConfig
from mvcom_tf.data import schema
from mvcom_tf.data.tfrecord import DatasetInfo
from mvcom_tf.evaluation.metrics import result_difference
from mvcom_tf.losses.margins import class_aware_margins, head_classes, tail_class_offsets
from mvcom_tf.meta.step import MetaStep
from mvcom_tf.models.heads import MarginHead, VariationHeads, centre_initializer
from mvcom_tf.models.iresnet import build_iresnet, float32_if_mixed
from mvcom_tf.models.sharded_head import ShardedCentres, ShardedMarginHead, head_footprint
from mvcom_tf.stages.meta import MetaStage
from mvcom_tf.stages.pretrain import PretrainStage
from mvcom_tf.steps import MarginStep, ShardedMarginStep
from mvcom_tf.training.distribute import read_input
from mvcom_tf.training.stage import Stage


def schedule(config: TrainConfig, name: str) -> Schedule:
    """The pretrain stage follows --epochs/--lr/--lr_steps, the fine-tuning stages --meta_epochs/--meta_lr/..."""
    if name in FINE_TUNING_STAGES:
        return Schedule(config.meta_epochs, config.meta_lr, config.meta_lr_steps)
    return Schedule(config.epochs, config.lr, config.lr_steps)


def control_config(config: TrainConfig) -> TrainConfig:
    """The finetune stage's settings: the meta stage's, with a constant margin and no residuals (tau = 0 takes
    exactly the plain margin steps), so MvCoM is credited only with its difference from it."""
    return dataclasses.replace(config, margin_prior="constant", meta_lr_tau=0.0,
                               oracle_margin_deltas=(0.0,) * len(config.oracle_margin_deltas))


def build_stage(config: TrainConfig, name: str, strategy: tf.distribute.Strategy) -> Stage:
    """The stage `name` of --stage, its variables created in the strategy's scope."""
    if name == "finetune":
        config = control_config(config)
    train = read_input("train_data", config.train_data, config.batch_size, config.seed)
    train = dataclasses.replace(train, balanced=config.train_sampling == "balanced")
    stage_schedule = schedule(config, name)
    info = train.info
    log_head_footprint(config, info.num_identities, strategy.num_replicas_in_sync)
    pretrain = name == "pretrain"
    margins = constant_margins(config.margin, info.num_identities) if pretrain else prior_margins(config, info)
    offsets = {} if pretrain else oracle_offsets(config, info.histograms)
    if config.head_sharding == "sharded":
        with strategy.scope():
            backbone = build_backbone(config)
            optimizer = build_optimizer(config, train.steps_per_epoch, stage_schedule, backbone.trainable_variables)
        margin_step = build_sharded_step(config, backbone, optimizer, margins, offsets, info.num_identities, strategy)
        head = margin_step.head.centres
    else:
        with strategy.scope():
            backbone, head, optimizer = build_model(config, info.num_identities, train.steps_per_epoch,
                                                    stage_schedule)
        margin_step = MarginStep(backbone, head, optimizer, margins, config.batch_size,
                                 skip_nonfinite=config.nan_policy == "skip", factor_offsets=offsets)
    common = dict(name=name, schedule=stage_schedule, backbone=backbone, head=head, optimizer=optimizer, train=train)
    if pretrain:
        return PretrainStage(**common, margin_step=margin_step)
    with strategy.scope():
        meta_step, trackables = build_meta_step(config, margin_step, info.histograms, strategy.num_replicas_in_sync)
    pool = config.global_meta_batch * (config.meta_pool_factor if config.meta_sampling == "hard" else 1)
    meta = read_input("meta_data", config.meta_data, config.global_meta_batch, config.seed + 1)
    meta_pool = dataclasses.replace(meta, global_batch=pool, group_size=meta_group_size(config))
    return MetaStage(**common, meta_step=meta_step, meta_pool=meta_pool,
                     trackables=trackables, head_warmup_steps=config.head_warmup_steps,
                     variation_warmup_steps=config.variation_warmup_steps)


def summarise_run(stage_metrics: dict) -> dict:
    """metrics.json's `meta_minus_finetune`: MvCoM's difference from the CosFace fine-tuning of the same run (same
    start, batches and length), when both ran and were evaluated; logged."""
    meta, control = stage_metrics.get("meta", {}), stage_metrics.get("finetune", {})
    if "accuracy" not in meta or "accuracy" not in control:
        return {}
    difference = result_difference(meta, control)
    for name, figures in difference.items():
        logging.info("MvCoM against CosFace fine-tuning (same start, batches and length), %s: %.4f - %.4f = %+.4f",
                     name, figures["value"], figures["baseline"], figures["difference"])
    return {"meta_minus_finetune": difference}


def build_sharded_step(config: TrainConfig, backbone: keras.Model, optimizer: keras.optimizers.Optimizer,
                       margins: tf.Tensor, offsets: dict[str, tf.Tensor], num_identities: int,
                       strategy: tf.distribute.Strategy) -> ShardedMarginStep:
    """The margin step with the identity centres split over the replicas (and Partial FC sampling)."""
    # The replicated head's initial W, drawn at the same point of Keras' seeded sequence (after the
    # backbone): a seed starts both heads, and any replica count, from the same centres. It exists
    # once on the host, as it does at every save.
    with tf.device("/cpu:0"):
        initial = centre_initializer()((config.embedding_size, num_identities), dtype=keras.config.floatx())
    # Outside the scope: one plain variable per replica on its device, not a mirrored copy of all classes.
    centres = ShardedCentres.for_strategy(strategy, num_identities, config.embedding_size, config.seed,
                                          initial=initial)
    head = ShardedMarginHead(centres, config.loss, config.scale, config.partial_fc_rate, config.batch_size,
                             config.seed)
    return ShardedMarginStep(backbone, head, optimizer, margins, config.batch_size, config.momentum,
                             config.weight_decay, factor_offsets=offsets)


def log_head_footprint(config: TrainConfig, num_classes: int, replicas: int) -> None:
    """The identity head's memory and communication per replica, from the formulas of head_footprint."""
    sharded = config.head_sharding == "sharded"
    figures = head_footprint(num_classes, config.embedding_size, replicas, config.batch_size, sharded,
                             config.partial_fc_rate)
    logging.info("identity head, %s over %d replica(s): %d centres per replica, %.3g GB of centres, momentum and "
                 "gradient, %.3g MB of logits, %.3g MB sent per step", config.head_sharding, replicas,
                 figures["centres"], figures["state_bytes"] / 1e9, figures["logits_bytes"] / 1e6,
                 figures["sent_bytes"] / 1e6)


def build_backbone(config: TrainConfig) -> keras.Model:
    """The IResNet of --backbone, --image_size, --embedding_size, --width_multiplier, --dropout, --sync_bn."""
    return build_iresnet(config.backbone, config.image_size, config.embedding_size, config.width_multiplier,
                         config.dropout, config.sync_bn)


def build_optimizer(config: TrainConfig, steps_per_epoch: int, stage_schedule: Schedule,
                    variables: list) -> keras.optimizers.Optimizer:
    """SGD (momentum, decoupled weight decay, the stage's lr steps), built for `variables`."""
    optimizer = keras.optimizers.SGD(learning_rate_schedule(stage_schedule, steps_per_epoch),
                                     momentum=config.momentum, weight_decay=config.weight_decay or None)
    if config.mixed_precision == "float16":  # pretrain stage only (a flag validator says so)
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # float16 gradients underflow unscaled
    optimizer.build(variables)
    return optimizer


def build_model(config: TrainConfig, num_identities: int, steps_per_epoch: int, stage_schedule: Schedule):
    """Backbone, identity head and their optimizer, built."""
    backbone = build_backbone(config)
    head = MarginHead(num_identities, config.loss, config.scale, name="identity_head", dtype=float32_if_mixed())
    head.build((None, config.embedding_size))
    optimizer = build_optimizer(config, steps_per_epoch, stage_schedule,
                                backbone.trainable_variables + head.trainable_variables)
    return backbone, head, optimizer


def prior_margins(config: TrainConfig, info: DatasetInfo) -> tf.Tensor:
    """The meta stage's per-identity margins: --margin, or the class-aware volume prior (METHOD.md)."""
    if config.margin_prior != "volume":
        return constant_margins(config.margin, info.num_identities)
    margins = class_aware_margins(info.images_per_identity, config.margin, config.margin_prior_power,
                                  config.margin_min, config.margin_max)
    return tf.constant(margins, keras.config.floatx())


def oracle_offsets(config: TrainConfig, histograms: dict[str, list[int]]) -> dict[str, tf.Tensor]:
    """The bias study's oracle: --oracle_margin_deltas added for the tail classes of each factor ({}: none)."""
    deltas = dict(zip(schema.FACTORS, config.oracle_margin_deltas))
    return {factor: tf.constant(values, keras.config.floatx())
            for factor, values in tail_class_offsets(histograms, deltas).items()}


def meta_group_size(config: TrainConfig) -> int:
    """Images of one identity drawn together into the meta batch: K for the verification objective, else 1."""
    return config.meta_images_per_identity if config.meta_objective == "verification" else 1


def build_meta_step(config: TrainConfig, margin_step: MarginStep, histograms: dict[str, list[int]],
                    replicas: int) -> tuple[MetaStep, dict]:
    """The MvCoM step around a margin step (replicated or sharded head): variation heads and their optimizer
    (and the identity head's warm-up optimizer), built; returns it with those new checkpoint entries (call in
    scope). `histograms` are the training split's variation label counts (dataset.json): the head classes
    of the tail statistics come from them ({}: none)."""
    heads = VariationHeads(name="variation_heads", dtype=float32_if_mixed())
    heads.build((None, config.embedding_size))
    heads_optimizer = keras.optimizers.SGD(config.variation_lr, momentum=config.momentum)
    heads_optimizer.build(heads.trainable_variables)
    trackables = {"variation_heads": heads, "variation_optimizer": heads_optimizer}
    head_optimizer = None
    if config.head_warmup_steps:  # replicated head only (a flag validator says so)
        head_optimizer = keras.optimizers.SGD(config.head_warmup_lr, momentum=config.momentum)
        head_optimizer.build(margin_step.head.trainable_variables)
        trackables["identity_head_warmup_optimizer"] = head_optimizer
    meta_step = MetaStep(
        margin_step, heads, heads_optimizer, tau=config.meta_lr_tau, inner_lr=config.meta_inner_lr,
        residual_max=config.residual_max, scope=config.meta_scope, factor_weights=config.factor_weights,
        sampling=config.meta_sampling, meta_batch_size=config.global_meta_batch // replicas,
        global_meta_batch_size=config.global_meta_batch, head_classes=head_classes(histograms),
        head_optimizer=head_optimizer, objective=config.meta_objective, group_size=meta_group_size(config),
        contrastive_scale=config.scale)
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
