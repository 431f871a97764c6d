"""tf.distribute: the strategy named by --strategy, the chief, and a stage's inputs split over replicas."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import tensorflow as tf

from mvcom_tf.data.pipeline import DecodeFailures, balanced_acceptance, train_dataset
from mvcom_tf.data.augmentation import VariationAugmentation
from mvcom_tf.data.sample_weights import DataWeighting
from mvcom_tf.data.shard_checks import CorruptRecords
from mvcom_tf.data.tfrecord import DatasetError, DatasetInfo, read_info


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


def task_name() -> str:
    """This process's task as TensorFlow's collectives name it (/job:worker/replica:0/task:0); "" without TF_CONFIG."""
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {})
    return f"/job:{task['type']}/replica:0/task:{int(task.get('index', 0))}" if "type" in task else ""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input of a stage's replica step: a dataset folder read in shuffled global batches."""

    flag: str  # the flag that named the folder, for messages and TensorBoard
    data_dir: str
    info: DatasetInfo
    global_batch: int
    seed: int
    balanced: bool = False  # --train_sampling=balanced: tail classes drawn as often as head ones
    group_size: int = 1  # batches made of runs of this many images of one identity (P x K batches)
    weighting: DataWeighting | None = None  # --loss_weighting's per-record weights, as the batches' `weight`

    @property
    def steps_per_epoch(self) -> int:
        """Whole global batches in one pass over the folder."""
        return self.info.num_images // self.global_batch


def read_input(flag: str, data_dir: str, global_batch: int, seed: int) -> InputSpec:
    """Reads dataset.json, naming the flag in the error, and checks that it holds one global batch."""
    try:
        info = read_info(data_dir)
    except DatasetError as error:
        raise DatasetError(f"--{flag}: {error}") from None
    if info.num_images < global_batch:
        raise DatasetError(f"--{flag}: {data_dir} has {info.num_images} images, fewer than one batch "
                           f"({global_batch})")
    return InputSpec(flag, data_dir, info, global_batch, seed)


@dataclasses.dataclass(frozen=True)
class InputOptions:
    """How every input is read: image size, shuffling, synthesised variations, the NaN drill."""

    image_size: int
    shuffle_buffer: int
    synth_blur_prob: float = 0.0
    synth_occlusion_prob: float = 0.0
    nan_step: int = -1  # --debug_nan_step: that global step's images become NaN


# Distributed iterators a finished stage no longer reads. Deleting one under MirroredStrategy can block
# the deleting thread for minutes (TensorFlow's IteratorResource destructor waits on its thread pool:
# seen at stage ends and after a SIGTERM save, with two CPU replicas), so they are kept until the
# process ends, and the command ends the process without running their destructors (mvcom_tf.cli.exit_now).
_FINISHED_ITERATORS: list = []


def retire(iterators) -> None:
    """Keeps a finished stage's iterators alive until the process exits, instead of deleting them now."""
    _FINISHED_ITERATORS.append(iterators)


def distributed_batches(strategy: tf.distribute.Strategy, spec: InputSpec, options: InputOptions,
                        steps: range, steps_per_epoch: int, failures: DecodeFailures, nan_drill: bool = False,
                        corrupt: CorruptRecords | None = None):
    """An iterator over the global batches of `steps` (global steps; epochs of steps_per_epoch, each with its own
    order and augmentation), split over the replicas.

    One iterator serves the whole stage: a distributed iterator deleted under MirroredStrategy can
    hold the next step back by about 5 s (measured here with two CPU replicas, one epoch in three
    or so), once per epoch if every epoch made its own. `nan_drill`: this input carries
    --debug_nan_step's NaN images; `corrupt` (--skip_corrupt_records) reads damaged shards up to the damage.
    """
    augmentation = VariationAugmentation(options.synth_blur_prob, options.synth_occlusion_prob)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_step = context.num_replicas_in_sync // context.num_input_pipelines  # elements a step takes from here
        epochs = []
        for epoch in range(steps.start // steps_per_epoch, -(-steps.stop // steps_per_epoch)):
            first = max(steps.start, epoch * steps_per_epoch)
            last = min(steps.stop, (epoch + 1) * steps_per_epoch)
            skip = first - epoch * steps_per_epoch
            dataset = train_dataset(
                spec.data_dir, spec.info, batch_size=context.get_per_replica_batch_size(spec.global_batch),
                image_size=options.image_size, seed=spec.seed, epoch=epoch,
                skip_records=skip * spec.global_batch // context.num_input_pipelines,
                input_context=context, failures=failures, shuffle_buffer=options.shuffle_buffer,
                augment=augmentation if augmentation.active else None,
                keep_probability=balanced_acceptance(spec.info.histograms) if spec.balanced else None,
                group_size=spec.group_size, corrupt=corrupt,
                sample_weight=spec.weighting and spec.weighting.weight_fn(spec.info.histograms, spec.info.num_images))
            epochs.append(dataset.take((last - first) * per_step))
        dataset = functools.reduce(tf.data.Dataset.concatenate, epochs)
        if nan_drill and options.nan_step in steps:
            dataset = dataset.enumerate().map(lambda index, batch: {
                **batch, "image": tf.where(index // per_step + steps.start == options.nan_step, np.nan, batch["image"])})
        return dataset.prefetch(tf.data.AUTOTUNE)  # across the epochs' boundaries too

    return iter(strategy.distribute_datasets_from_function(dataset_fn))
