"""The training loop every stage shares: data, model, checkpoints, progress, TensorBoard, evaluation, export."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import posixpath
import signal
import tempfile
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from mvcom_tf.config import Schedule, TrainConfig
from mvcom_tf.data import figures
from mvcom_tf.data.pipeline import DecodeFailures, train_dataset
from mvcom_tf.data.synthesis import VariationSynthesis
from mvcom_tf.data.tfrecord import DatasetError, DatasetInfo, read_info, write_json
from mvcom_tf.evaluation.benchmark_spec import benchmark_key, parse_benchmark
from mvcom_tf.evaluation.protocols import run_benchmark
from mvcom_tf.export import embedding_fn, export_onnx, export_saved_model, export_tflite
from mvcom_tf.losses.margins import class_aware_margins
from mvcom_tf.models.heads import MarginHead
from mvcom_tf.models.iresnet import build_iresnet, float32_if_mixed
from mvcom_tf.steps import MarginStep

METRICS_FILE = "metrics.json"
# Step metrics are per-replica sums, added over replicas; those named VALUES + name are
# per-sample values, gathered over replicas (histograms in TensorBoard, except figure/ ones,
# which only feed the step object's figures).
VALUES = "values/"
# Test hook for the non-finite drill: the global step whose training batch is poisoned with NaN.
POISON_STEP_ENV = "MVCOM_TF_POISON_STEP"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf (with --nan_policy=stop): the message names the step and the last good checkpoint."""


class Preempted(RuntimeError):
    """SIGTERM arrived: a checkpoint of the step reached was saved; re-running the command resumes there."""


@contextlib.contextmanager
def preemption_signal():
    """An Event set by SIGTERM while the block runs (main thread only; the previous handler is restored)."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy named by --strategy."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy([device.name for device in gpus])
        # CPU replicas (--cpu_replicas): reduce through one device. Collective all-reduces between
        # logical CPUs can be launched in different orders by different replicas once synchronized
        # BatchNorm adds its own all-reduces, and then fail with a shape mismatch.
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()  # the cluster and this task from TF_CONFIG
    raise ValueError(f"unknown strategy {name!r}")


def is_chief() -> bool:
    """Whether this process writes the run folder: no TF_CONFIG, the chief, or worker 0 of a cluster without one."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind in (None, "chief"):
        return True
    return kind == "worker" and index == 0 and "chief" not in tf_config.get("cluster", {})


@dataclasses.dataclass
class StageState:
    """What a stage's checkpoint holds."""

    backbone: keras.Model
    head: MarginHead
    optimizer: keras.optimizers.Optimizer
    step: tf.Variable
    epoch: tf.Variable
    extras: dict = dataclasses.field(default_factory=dict)  # stage-specific trackables (meta: variation heads)
    summary: dict = dataclasses.field(default_factory=dict)  # the step's scalars over the stage, for metrics.json

    def checkpoint(self) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(backbone=self.backbone, head=self.head, optimizer=self.optimizer,
                                   step=self.step, epoch=self.epoch, **self.extras)


def learning_rate_schedule(schedule: Schedule, steps_per_epoch: int):
    """lr, multiplied by 0.1 at each epoch of lr_steps (counted in optimizer steps)."""
    if not schedule.lr_steps:
        return schedule.lr
    boundaries = [int(round(epoch * steps_per_epoch)) for epoch in schedule.lr_steps]
    values = [schedule.lr * 0.1 ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def build_state(config: TrainConfig, info: DatasetInfo, steps_per_epoch: int, stage: str = "pretrain") -> StageState:
    """Backbone, identity head and optimizer, built (variables created) in the current strategy scope."""
    backbone = build_iresnet(config.backbone, config.image_size, config.embedding_size,
                             config.width_multiplier, config.dropout, config.sync_bn)
    head = MarginHead(info.num_identities, config.loss, config.scale, name="identity_head", dtype=float32_if_mixed())
    head.build((None, config.embedding_size))
    optimizer = keras.optimizers.SGD(learning_rate_schedule(config.schedule(stage), steps_per_epoch),
                                     momentum=config.momentum,
                                     weight_decay=config.weight_decay or None)
    if config.mixed_precision == "float16":  # pretrain stage only (a flag validator says so)
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # float16 gradients underflow unscaled
    optimizer.build(backbone.trainable_variables + head.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    return StageState(backbone, head, optimizer, step, epoch)


def stage_margins(config: TrainConfig, stage: str, info: DatasetInfo) -> np.ndarray:
    """Per-identity margins: constant in pre-training (seed Sec. C), --margin_prior in the meta stage."""
    if stage == "meta" and config.margin_prior == "volume":
        return class_aware_margins(info.images_per_identity, config.margin, config.margin_prior_power,
                                   config.margin_min, config.margin_max)
    return np.full(info.num_identities, config.margin, np.float32)


class Progress:
    """The periodic progress line (step, loss, lr, images/s, ETA) and its TensorBoard scalars."""

    def __init__(self, stage: str, total_steps: int, first_step: int, writer, step_object) -> None:
        self.stage, self.total_steps, self.writer = stage, total_steps, writer
        self.summaries = step_object.summaries  # the step's own scalars from the summed metrics
        self.figures = step_object.figures  # and its pictures from the latest per-sample values
        self.sums: dict[str, np.ndarray] = {}
        self.totals: dict[str, np.ndarray] = {}  # over the whole stage (since this process started it)
        self.latest: dict[str, np.ndarray] = {}
        self.since_step, self.since_time = first_step, time.perf_counter()

    def add(self, metrics: dict[str, tf.Tensor]) -> None:
        for key, value in metrics.items():
            value = np.asarray(value, np.float64)
            if key.startswith(VALUES):  # per-sample values: the latest batch's, for histograms
                self.latest[key[len(VALUES):]] = value
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.totals[key] = self.totals.get(key, 0.0) + value

    def stage_summary(self) -> dict[str, float]:
        """The step's own scalars over the whole stage (the meta stage: mean residual per class)."""
        return self.summaries(self.totals) if self.totals else {}

    def report(self, step: int, epoch: int, lr: float) -> None:
        elapsed = max(time.perf_counter() - self.since_time, 1e-9)
        steps_per_s = max(step - self.since_step, 1) / elapsed
        images = float(self.sums.get("images", 0.0))
        scalars = {"lr": lr, "steps_per_s": steps_per_s, "images_per_s": images / elapsed}
        if "loss" in self.sums:  # absent while only the variation heads warm up
            margin = float(self.sums["margin"]) / images
            scalars.update({
                "loss": float(self.sums["loss"]) / images,
                "accuracy": float(self.sums["accuracy"]) / images,
                "margin/mean": margin,
                "margin/std": float(np.sqrt(max(float(self.sums["margin_sq"]) / images - margin ** 2, 0.0))),
            })
        scalars.update(self.summaries(self.sums))
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) / steps_per_s))
        if "loss" in scalars:
            logging.info("[%s] step %d/%d epoch %d loss %.4f acc %.3f lr %.5g images/s %.1f ETA %s", self.stage,
                         step, self.total_steps, epoch + 1, scalars["loss"], scalars["accuracy"], lr,
                         scalars["images_per_s"], eta)
        else:
            logging.info("[%s] step %d/%d epoch %d warm-up of the variation heads, images/s %.1f ETA %s",
                         self.stage, step, self.total_steps, epoch + 1, scalars["images_per_s"], eta)
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
            for name, picture in self.figures(self.latest).items():
                tf.summary.image(name, picture[None])
            for name, values in self.latest.items():
                if not name.startswith("figure/"):
                    tf.summary.histogram(name, values)
        self.sums, self.latest = {}, {}
        self.since_step, self.since_time = step, time.perf_counter()


def distributed_batches(strategy, data_dir: str, info: DatasetInfo, config: TrainConfig, global_batch: int,
                        epoch: int, skip_steps: int, failures: DecodeFailures, seed: int, first_step: int = 0):
    """An iterator over one epoch's global batches, split over the replicas (resuming after skip_steps).

    `first_step` is the global step of the first batch (for the POISON_STEP_ENV test hook).
    """
    poison_step = int(os.environ.get(POISON_STEP_ENV, "-1"))

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        dataset = train_dataset(
            data_dir, info, batch_size=context.get_per_replica_batch_size(global_batch),
            image_size=config.image_size, seed=seed, epoch=epoch,
            skip_records=skip_steps * global_batch // context.num_input_pipelines,
            input_context=context, failures=failures, shuffle_buffer=config.shuffle_buffer,
            augment=synthesis if synthesis.active else None)
        if poison_step >= first_step:
            dataset = dataset.enumerate().map(lambda index, batch: {
                **batch, "image": tf.where(index + first_step == poison_step, np.nan, batch["image"])})
        return dataset

    synthesis = VariationSynthesis(config.synth_blur_prob, config.synth_occlusion_prob)

    return iter(strategy.distribute_datasets_from_function(dataset_fn))


def check_data(path: str, flag: str, config: TrainConfig) -> DatasetInfo:
    """Reads dataset.json, naming the flag in the error, and checks that it fits the run."""
    try:
        info = read_info(path)
    except DatasetError as error:
        raise DatasetError(f"--{flag}: {error}") from None
    batch = config.batch_size if flag == "train_data" else config.meta_batch_size
    if info.num_images < batch:
        raise DatasetError(f"--{flag}: {path} has {info.num_images} images, fewer than one batch ({batch})")
    return info


def build_stage(config: TrainConfig, stage: str, strategy: tf.distribute.Strategy, info: DatasetInfo,
                steps_per_epoch: int):
    """The stage's state, its step object (a per-replica callable) and the meta set's info (meta stage)."""
    with strategy.scope():
        state = build_state(config, info, steps_per_epoch, stage)
        class_margins = tf.constant(stage_margins(config, stage, info), keras.config.floatx())
        if stage != "meta":
            step = MarginStep(state.backbone, state.head, state.optimizer, class_margins, config.batch_size,
                              skip_nonfinite=config.nan_policy == "skip")
            return state, step, None
        from mvcom_tf.meta.step import build_meta_step  # the meta stage's own pieces

        meta_info = check_data(config.meta_data, "meta_data", config)
        step = build_meta_step(config, state, class_margins, config.batch_size, meta_info,
                               strategy.num_replicas_in_sync, info)
        return state, step, meta_info


def restore(state: StageState, resume_dir: str, init_checkpoint: str, stage: str) -> None:
    """Resumes from the stage's last checkpoint in resume_dir, or starts from --init_checkpoint's backbone and head."""
    latest = tf.train.latest_checkpoint(resume_dir)
    if latest:
        state.checkpoint().restore(latest).assert_existing_objects_matched()
        logging.info("[%s] resumed from %s at step %d", stage, latest, int(state.step))
    elif init_checkpoint:
        # Backbone and identity classifier only, as seed Sec. C keeps them; optimizer and step start anew.
        prefix = _latest(init_checkpoint)
        shapes = dict(tf.train.list_variables(prefix))
        head_shape = shapes.get("head/kernel/.ATTRIBUTES/VARIABLE_VALUE")
        if head_shape is not None and list(head_shape) != list(state.head.kernel.shape):
            raise DatasetError(f"--init_checkpoint: {prefix} has an identity head of {head_shape[1]} classes, but "
                               f"--train_data has {state.head.kernel.shape[1]} identities")
        tf.train.Checkpoint(backbone=state.backbone, head=state.head).restore(prefix).expect_partial()
        logging.info("[%s] initialised backbone%s from %s", stage, " and identity head" if head_shape else "",
                     init_checkpoint)
        if head_shape is None:
            logging.warning("[%s] %s holds no identity head: it starts untrained (--head_warmup_steps trains it "
                            "alone first)", stage, init_checkpoint)


class CompiledSteps:
    """One tf.function per replica callable (the meta stage has two: warm-up and meta step).

    With jit_compile the replica callable itself is compiled by XLA (the input iterator cannot be).
    With steps_per_execution > 1 a call runs `steps` steps in a tf.while_loop and returns their
    summed metrics (per-sample values: the last step's).
    """

    def __init__(self, strategy: tf.distribute.Strategy, jit_compile: bool = False,
                 steps_per_execution: int = 1) -> None:
        self.strategy, self.functions, self.jit_compile = strategy, {}, jit_compile
        self.steps_per_execution = steps_per_execution

    def __call__(self, replica_fn, iterator, meta_iterator, steps: int = 1) -> dict[str, tf.Tensor]:
        if replica_fn not in self.functions:
            self.functions[replica_fn] = self._compile(replica_fn)
        if self.steps_per_execution == 1:
            return self.functions[replica_fn](iterator, meta_iterator)
        # A tensor, so that the shorter calls before a log or checkpoint step do not retrace.
        return self.functions[replica_fn](iterator, meta_iterator, tf.constant(steps, tf.int32))

    def _compile(self, replica_fn):
        strategy = self.strategy
        if self.jit_compile:
            replica_fn = tf.function(replica_fn, jit_compile=True)

        def one_step(iterator, meta_iterator):
            batch = next(iterator)
            meta_batch = next(meta_iterator) if meta_iterator is not None else None
            per_replica = strategy.run(replica_fn, args=(batch, meta_batch))
            return {key: strategy.gather(value, axis=0) if key.startswith(VALUES)
                    else strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                    for key, value in per_replica.items()}

        if self.steps_per_execution == 1:
            return tf.function(one_step, autograph=False)  # no Python control flow to convert

        @tf.function(autograph=False)
        def run(iterator, meta_iterator, steps):
            # The first step outside the loop gives the metrics' structure and shapes.
            def body(index, totals):
                metrics = one_step(iterator, meta_iterator)
                return index + 1, {key: value if key.startswith(VALUES) else totals[key] + value
                                   for key, value in metrics.items()}

            _, totals = tf.while_loop(lambda index, totals: index < steps, body,
                                      (tf.constant(1), one_step(iterator, meta_iterator)))
            return totals

        return run


def execution_length(config: TrainConfig, trainer, step: int, last: int) -> int:
    """Steps the next call may run from `step`: at most --steps_per_execution, up to `last` (end of the
    epoch or stage), stopping at the next step that logs, saves or evaluates, and where the step
    object changes (the meta stage's warm-up)."""
    length = min(config.steps_per_execution, last - step)
    every = [config.log_every, config.checkpoint_every, config.eval_every if config.eval_data else 0]
    length = min([length] + [period - step % period for period in every if period])
    replica_fn = trainer.for_step(step)
    return next((k for k in range(1, length) if trainer.for_step(step + k) != replica_fn), length)


def run_stage(config: TrainConfig, stage: str, strategy: tf.distribute.Strategy, init_checkpoint: str,
              preempted: threading.Event | None = None, resume_dir: str = "") -> StageState:
    """Trains one stage to its last step (resuming from its own checkpoints) and returns its state.

    Checkpoints and summaries go under config.model_dir; the stage resumes from resume_dir (the
    chief's checkpoints, which a worker reads but does not write), by default its own.
    Raises Preempted once `preempted` is set (after saving), NonFiniteLoss on a NaN loss (--nan_policy=stop).
    """
    preempted = preempted or threading.Event()
    info = check_data(config.train_data, "train_data", config)
    steps_per_epoch = info.num_images // config.batch_size
    total_steps = config.schedule(stage).epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    state, trainer, meta_info = build_stage(config, stage, strategy, info, steps_per_epoch)
    checkpoints = posixpath.join(config.model_dir, "checkpoints", stage)
    manager = tf.train.CheckpointManager(state.checkpoint(), checkpoints, max_to_keep=config.keep_checkpoints)
    restore(state, resume_dir or checkpoints, init_checkpoint, stage)
    writer = tf.summary.create_file_writer(posixpath.join(config.model_dir, "tensorboard", stage))
    if int(state.step.numpy()) == 0:
        _log_distributions(writer, {"train_data": info, "meta_data": meta_info})
    failures = DecodeFailures()
    train_step = CompiledSteps(strategy, config.jit_compile, config.steps_per_execution)
    step = int(state.step.numpy())
    progress = Progress(stage, total_steps, step, writer, trainer)
    logging.info("[%s] %d images, %d identities, %d steps/epoch, training steps %d to %d, %d replica(s)",
                 stage, info.num_images, info.num_identities, steps_per_epoch, step, total_steps,
                 strategy.num_replicas_in_sync)
    skipped = 0
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        iterator = distributed_batches(strategy, config.train_data, info, config, config.batch_size, epoch, offset,
                                       failures, config.seed, first_step=step)
        meta_iterator = None
        if meta_info is not None:
            pool = config.meta_batch_size * (config.meta_pool_factor if config.meta_sampling == "hard" else 1)
            meta_iterator = distributed_batches(strategy, config.meta_data, meta_info, config, pool, epoch, offset,
                                                failures, config.seed + 1)
        last = min(step - offset + steps_per_epoch, total_steps)
        while step < last:
            count = execution_length(config, trainer, step, last)
            metrics = train_step(trainer.for_step(step), iterator, meta_iterator, count)
            check_finite(metrics, stage, step, count, manager)
            # Every replica of a skipped step reports 1.
            skipped += round(float(metrics.get("skipped", 0.0)) / strategy.num_replicas_in_sync)
            progress.add(metrics)
            step += count
            state.step.assign(step)
            state.epoch.assign(step // steps_per_epoch)
            if step % config.log_every == 0 or step == total_steps:
                if int(failures.count.numpy()):
                    logging.warning("[%s] %d undecodable images dropped so far", stage, int(failures.count.numpy()))
                if skipped:
                    logging.warning("[%s] %d steps with a non-finite loss or gradient skipped so far", stage, skipped)
                progress.report(step, epoch, _current_lr(state.optimizer))
            if step % config.checkpoint_every == 0 or step == total_steps:
                manager.save(checkpoint_number=step)
            if preempted.is_set():
                if not (manager.latest_checkpoint or "").endswith(f"-{step}"):
                    manager.save(checkpoint_number=step)
                writer.flush()
                raise Preempted(f"[{stage}] SIGTERM: saved {manager.latest_checkpoint} at step {step}; run the same "
                                "command again to resume from it")
            if (config.eval_data and config.eval_every and step % config.eval_every == 0 and step < total_steps
                    and is_chief()):
                results = evaluate(config, state.backbone)
                logging.info("[%s] step %d: %s", stage, step,
                             "; ".join(f"{key} {_headline(result)}" for key, result in results.items()))
                log_evaluation(writer, step, results)
    if manager.latest_checkpoint is None or not manager.latest_checkpoint.endswith(f"-{step}"):
        manager.save(checkpoint_number=step)
    writer.flush()
    state.summary = progress.stage_summary()
    return state


def _log_distributions(writer, infos: dict[str, DatasetInfo | None]) -> None:
    """The datasets' Figs. 3-5 in TensorBoard, once per stage (at its first step)."""
    with writer.as_default():
        for flag, info in infos.items():
            if info is not None:
                figure = figures.distribution_figure(info, f"--{flag} ({info.split})")
                tf.summary.image(f"data/{flag}", figures.to_rgb(figure)[None], step=0)


def _headline(result: dict) -> str:
    if "accuracy" in result:
        return f"accuracy {result['accuracy']:.4f}"
    return ", ".join(f"TAR@FAR={far} {tar:.4f}" for far, tar in result.get("tar_at_far", {}).items())


def check_finite(metrics: dict, stage: str, first: int, count: int, manager: tf.train.CheckpointManager) -> None:
    """--nan_policy=stop: a NaN or Inf loss in the steps after `first` ends the run before any of them is saved."""
    if "loss" not in metrics:  # the heads-only warm-up reports no identity loss
        return
    loss = float(metrics["loss"])
    if math.isfinite(loss):
        return
    steps = f"step {first + 1}" if count == 1 else f"one of steps {first + 1}-{first + count}"
    last = manager.latest_checkpoint or "none (the stage had not saved one yet)"
    raise NonFiniteLoss(f"[{stage}] the loss is {loss} at {steps}; nothing of this step was saved. The last "
                        f"good checkpoint, {last}, is kept, and re-running resumes from it. Lower --lr, or use "
                        "--nan_policy=skip to skip such steps")


def _current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _latest(path: str) -> str:
    """A checkpoint prefix, or the latest checkpoint in a folder (a run folder's checkpoints/<stage>)."""
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise DatasetError(f"--init_checkpoint: {path} holds no checkpoint")
        return latest
    return path


def evaluate(config: TrainConfig, backbone: keras.Model) -> dict[str, dict]:
    """Every --eval_data benchmark on the flip-fused embeddings of the backbone, keyed `<kind>:<name>`."""
    embed = tf.function(embedding_fn(backbone), reduce_retracing=True)
    results = {}
    for spec in config.eval_data:
        kind, path = parse_benchmark(spec)
        results[benchmark_key(kind, path)] = run_benchmark(kind, path, embed, config.image_size,
                                                           config.eval_batch_size).result
    return results


def log_evaluation(writer, step: int, results: dict[str, dict]) -> None:
    """TensorBoard scalars of an evaluation: eval/<benchmark>/accuracy and TAR@FAR, and for the first
    benchmark `eval/accuracy` and its per-group accuracies `eval/<factor>/<group>`."""
    with writer.as_default(step=step):
        for index, (key, result) in enumerate(results.items()):
            if "accuracy" in result:
                tf.summary.scalar(f"eval/{key}/accuracy", result["accuracy"])
            for far, tar in result.get("tar_at_far", {}).items():
                tf.summary.scalar(f"eval/{key}/tar@far={far}", tar)
            if index == 0:
                if "accuracy" in result:
                    tf.summary.scalar("eval/accuracy", result["accuracy"])
                for factor, groups in result.get("groups", {}).items():
                    for group, accuracy in groups.items():
                        tf.summary.scalar(f"eval/{factor}/{group}", accuracy)
    writer.flush()


def single_device_copy(config: TrainConfig, backbone: keras.Model) -> keras.Model:
    """The backbone rebuilt outside any strategy with the trained weights (for export)."""
    copy = build_iresnet(config.backbone, config.image_size, config.embedding_size, config.width_multiplier,
                         config.dropout, sync_bn=False)
    copy.set_weights(backbone.get_weights())
    return copy


def run(config: TrainConfig, strategy: tf.distribute.Strategy | None = None) -> dict:
    """Runs every stage of --stage in order, then evaluates and exports; returns metrics.json's content.

    Under MultiWorkerMirroredStrategy every worker trains and saves checkpoints (saving takes
    part in collectives), but only the chief writes the run folder: the others write to a
    temporary folder, removed at the end, and resume from the chief's checkpoints.
    """
    strategy = strategy or make_strategy(config.strategy)
    chief = is_chief()
    scratch = "" if chief else tempfile.mkdtemp(prefix="mvcom_tf_worker_")
    local = config if chief else dataclasses.replace(config, model_dir=scratch)
    try:
        return _run_stages(config, local, strategy, chief)
    finally:
        if scratch:
            tf.io.gfile.rmtree(scratch)


def _run_stages(config: TrainConfig, local: TrainConfig, strategy: tf.distribute.Strategy, chief: bool) -> dict:
    tf.io.gfile.makedirs(local.model_dir)
    metrics: dict = {"stages": {}}
    init_checkpoint = config.init_checkpoint
    state = None
    for stage in config.stage:
        resume_dir = posixpath.join(config.model_dir, "checkpoints", stage)
        with preemption_signal() as preempted:
            state = run_stage(local, stage, strategy, init_checkpoint, preempted, resume_dir)
        init_checkpoint = resume_dir
        metrics["stages"][stage] = {"training": state.summary}
        if config.eval_data and chief:
            results = evaluate(config, state.backbone)
            # The first benchmark's figures sit at the top level, as metrics.json has always had them.
            metrics["stages"][stage].update({**next(iter(results.values())), "benchmarks": results})
            for key, result in results.items():
                logging.info("[%s] %s: %s", stage, key, _headline(result))
            log_evaluation(tf.summary.create_file_writer(posixpath.join(config.model_dir, "tensorboard", stage)),
                           int(state.step.numpy()), results)
    final = metrics["stages"].get(config.stage[-1], {})
    metrics.update({key: final[key] for key in ("accuracy", "accuracy_std", "groups", "benchmarks") if key in final})
    export_dir = config.export_dir or posixpath.join(config.model_dir, "export")
    metrics["export_dir"] = export_dir
    if chief:
        export_saved_model(single_device_copy(config, state.backbone), export_dir, config.image_size)
        if config.export_tflite:
            metrics["tflite"] = export_tflite(export_dir, f"{export_dir}_tflite")
        if config.export_onnx:
            metrics["onnx"] = export_onnx(export_dir, f"{export_dir}_onnx")
        write_json(posixpath.join(config.model_dir, METRICS_FILE), metrics)
    return metrics
