"""JTT's error set (Liu et al. 2021): the training images a first model gets wrong, to up-weight in a second run.

The first model is a run folder's last checkpoint (for the bias study, the CosFace pre-training:
a short ERM run, as JTT's identification model is). An image is an error when its identity
centre does not score highest among all classes, read at the run's image size without
augmentation and with BatchNorm in inference mode.
"""

from __future__ import annotations

import posixpath

import numpy as np
import tensorflow as tf

from mvcom_tf.config_flags import config_of_run
from mvcom_tf.data import schema
from mvcom_tf.data.pipeline import decode_image, normalize_images
from mvcom_tf.data.tfrecord import read_info, shard_paths
from mvcom_tf.files import write_text
from mvcom_tf.models.heads import MarginHead
from mvcom_tf.stages.build import build_backbone
from mvcom_tf.training.checkpoints import HEAD_KERNELS, CheckpointError

HEADER = "# JTT error set"


def last_checkpoint(model_dir: str) -> str:
    """The newest checkpoint of any stage of a run folder."""
    root = posixpath.join(model_dir, "checkpoints")
    found = [tf.train.latest_checkpoint(posixpath.join(root, stage)) for stage in tf.io.gfile.listdir(root)
             if tf.io.gfile.isdir(posixpath.join(root, stage))] if tf.io.gfile.isdir(root) else []
    found = [prefix for prefix in found if prefix]
    if not found:
        raise CheckpointError(f"{model_dir} holds no checkpoint under checkpoints/")
    return max(found, key=lambda prefix: tf.io.gfile.stat(prefix + ".index").mtime_nsec)


def find_errors(model_dir: str, train_data: str, batch_size: int = 256) -> tuple[list[str], int]:
    """The `image/source` of every image of `train_data` the run's model classifies wrongly, and the images read."""
    config = config_of_run(model_dir)
    info = read_info(train_data)
    prefix = last_checkpoint(model_dir)
    reader = tf.train.load_checkpoint(prefix)
    head_key = next((key for key in HEAD_KERNELS if reader.has_tensor(key)), None)
    if head_key is None:
        raise CheckpointError(f"{prefix} holds no identity head: JTT needs the first model's classifier")
    kernel = reader.get_tensor(head_key)
    if kernel.shape[1] != info.num_identities:
        raise CheckpointError(f"{prefix} classifies {kernel.shape[1]} identities, {train_data} has "
                              f"{info.num_identities}")
    backbone = build_backbone(config.model)
    tf.train.Checkpoint(backbone=backbone).restore(prefix).expect_partial()
    head = MarginHead(info.num_identities, config.head.loss, config.head.scale)
    head.build((None, config.model.embedding_size))
    head.kernel.assign(kernel)
    image_size = config.model.image_size

    def prepare(serialized):
        features = schema.parse_record(serialized)
        return normalize_images(decode_image(features["image"], image_size)), features["identity"], features["source"]

    dataset = tf.data.TFRecordDataset(shard_paths(train_data, info)).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)

    @tf.function
    def predict(images):
        return tf.argmax(head.cosine(backbone(images, training=False)), axis=-1, output_type=tf.int32)

    errors, seen = [], 0
    for images, identities, sources in dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE):
        wrong = (predict(images) != identities).numpy()
        errors += [source.decode("utf-8") for source in sources.numpy()[wrong]]
        seen += len(wrong)
    return errors, seen


def write_error_set(path: str, errors: list[str], seen: int, model_dir: str, train_data: str) -> None:
    """The error-set file --error_set reads: a header, then one source a line (written whole, then renamed)."""
    if len(set(errors)) != len(errors) or any(not source or "\n" in source for source in errors):
        raise ValueError(f"{train_data}: `image/source` must be unique and non-empty for an error set")
    header = f"{HEADER}: {len(errors)} of {seen} images of {train_data} misclassified by {model_dir}\n"
    write_text(path, header + "".join(f"{source}\n" for source in errors))


def error_share(errors: list[str], seen: int) -> float:
    """The share of the images in the error set."""
    return float(np.float64(len(errors)) / max(seen, 1))
