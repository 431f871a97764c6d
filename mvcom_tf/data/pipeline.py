"""The input pipeline: shards -> shuffled, decoded, augmented, batched face images."""

from __future__ import annotations

import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.data.sample_weights import class_weight, class_weight_tables
from mvcom_tf.data.shard_checks import CorruptRecords
from mvcom_tf.data.tfrecord import DatasetInfo, shard_paths

AUTOTUNE = tf.data.AUTOTUNE
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


def normalize_images(images: tf.Tensor) -> tf.Tensor:
    """Maps pixel values in [0, 255] to about [-1, 1], as insightface does: (x - 127.5) / 128."""
    return (tf.cast(images, tf.float32) - 127.5) / 128.0


def looks_complete(encoded: tf.Tensor) -> tf.Tensor:
    """True for JPEG or PNG bytes that start and end with their format's markers.

    A truncated or garbled file fails this test and is dropped before decoding:
    `tf.io.decode_image` would otherwise fail the whole input pipeline.
    """
    head8, tail8 = tf.strings.substr(encoded, 0, 8), tf.strings.substr(encoded, -8, 8)
    # Some JPEG writers pad after the end-of-image marker: look for it in the last 8 bytes.
    jpeg_ends = tf.reduce_any(tf.stack([tf.equal(tf.strings.substr(tail8, k, 2), JPEG_END) for k in range(7)],
                                       axis=-1), axis=-1)
    jpeg = tf.logical_and(tf.equal(tf.strings.substr(encoded, 0, 2), JPEG_START), jpeg_ends)
    png = tf.logical_and(tf.equal(head8, PNG_SIGNATURE), tf.equal(tail8, PNG_END))
    return tf.logical_and(tf.strings.length(encoded) >= 8, tf.logical_or(jpeg, png))


def decode_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes JPEG or PNG bytes to float32 [S, S, 3] pixels in [0, 255]."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    if image_size:
        shape = tf.shape(image)
        image = tf.cond(
            tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size)),
            lambda: tf.cast(image, tf.float32),
            lambda: tf.image.resize(image, [image_size, image_size], antialias=True))
        image = tf.ensure_shape(image, [image_size, image_size, 3])
    return tf.cast(image, tf.float32)


class DecodeFailures:
    """Counts images dropped because their bytes could not be decoded (logged by the training loop)."""

    def __init__(self) -> None:
        with tf.init_scope(), tf.device("/cpu:0"):
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="decode_failures")

    def keep(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        ok = features.pop("decodable")
        with tf.control_dependencies([self.count.assign_add(tf.cast(tf.logical_not(ok), tf.int64))]):
            return tf.identity(ok)


_KEEP_SEED = 7_919  # the draws of balanced sampling: a stream apart from the augmentation's
KEEP_BLOCK = 1024  # records drawn at once by balanced sampling


def _element_seed(seed: int, epoch: int, index: tf.Tensor) -> tf.Tensor:
    # Stateless seeds keyed by (seed, epoch, position) make an epoch's augmentation a pure
    # function of where it is read, so a resumed run sees exactly what an uninterrupted one saw.
    return tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + epoch, tf.cast(index, tf.int64)])


def random_flip(features: dict[str, tf.Tensor], element_seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Mirrors the image with probability 1/2; the pose label and yaw are mirrored with it."""
    flip = tf.random.stateless_uniform([], seed=element_seed) < 0.5
    features = dict(features)
    features["image"] = tf.cond(flip, lambda: tf.reverse(features["image"], axis=[1]),
                                lambda: features["image"])
    features["pose"] = tf.where(flip, schema.flip_pose(features["pose"]), features["pose"])
    features["yaw"] = tf.where(flip, -features["yaw"], features["yaw"])
    return features


def balanced_acceptance(histograms: dict[str, list[int]]):
    """For --train_sampling=balanced: a record's probability of being kept, from its variation labels.

    Each factor k gives a class c the weight 1 / (K_k p_k(c)) (p_k: the split's label frequencies);
    a record is kept with probability mean_k w_k(c_k) / max. The kept stream is the mixture over
    factors of "draw a factor, then a class of it uniformly": every class of every factor is
    represented, the tail ones many times more often than in the natural stream. An unknown label
    weighs 1. Costs a read of about max / mean records per record kept.
    """
    tables = class_weight_tables(histograms)
    # 1: a factor no record is labelled with (its unknown entry).
    ceiling = sum(max(table[:-1].max(initial=0.0), 1.0) for table in tables) / len(schema.FACTORS)
    return lambda features: class_weight(tables, features) / ceiling


def balanced_draws(records: tf.data.Dataset, keep_probability, block_seed) -> tf.data.Dataset:
    """The serialised `records` each kept with probability `keep_probability` (balanced_acceptance), drawn a block
    of KEEP_BLOCK at a time with the stateless seed `block_seed(block number)`.

    One parse of a block's labels and one draw, blocks in parallel: a record at a time (a `filter`), the draw read
    about 10,000 records/s on one core, and with tails at 0.25% it keeps one record in 61 to 74, so the stream fell
    to about 270 images/s (benchmarks/balanced_sampling.py).
    """
    def keep(block, serialized):
        draws = tf.random.stateless_uniform(tf.shape(serialized), seed=block_seed(block))
        return tf.boolean_mask(serialized, draws < keep_probability(schema.parse_labels(serialized)))

    return (records.batch(KEEP_BLOCK).enumerate().map(keep, num_parallel_calls=AUTOTUNE, deterministic=True)
            .unbatch())


def _read_and_decode(serialized: tf.Tensor, image_size: int, sample_weight=None) -> dict[str, tf.Tensor]:
    features = schema.parse_record(serialized)
    if sample_weight is not None:
        features["weight"] = sample_weight(features)
    features.pop("source")
    ok = looks_complete(features["image"])
    features["image"] = tf.cond(ok, lambda: decode_image(features["image"], image_size),
                                lambda: tf.zeros([image_size, image_size, 3], tf.float32))
    features["decodable"] = ok
    return features


def train_dataset(
    data_dir: str,
    info: DatasetInfo,
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    epoch: int,
    skip_records: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    failures: DecodeFailures | None = None,
    shuffle_buffer: int = 20_000,
    augment=None,
    keep_probability=None,
    group_size: int = 1,
    sample_weight=None,
    corrupt: CorruptRecords | None = None,
) -> tf.data.Dataset:
    """One epoch's batches (repeated if decode failures shorten it) for one input pipeline.

    `batch_size` is this pipeline's batch (per replica under distribute_datasets_from_function).
    `skip_records` resumes mid-epoch: the order and augmentation are those of an uninterrupted run.
    `keep_probability` (balanced_acceptance): records are kept at random with that probability.
    `group_size` K > 1: batches are runs of K images of one identity (P x K batches for the verification
    meta objective); `batch_size` must be a multiple of K.
    `sample_weight` (DataWeighting.weight_fn): each record's loss weight, as the batch's `weight`.
    `corrupt` (--skip_corrupt_records): each shard read up to its first damaged record, the rest counted as lost.
    """
    counts = [int(shard["num_images"]) for shard in info.shards]
    files = tf.data.Dataset.from_tensor_slices((shard_paths(data_dir, info), counts))
    files = files.shuffle(len(info.shards), seed=seed + epoch, reshuffle_each_iteration=False)
    records = None
    if input_context and input_context.num_input_pipelines > 1:
        if len(info.shards) >= input_context.num_input_pipelines:
            files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        else:
            records = "shard"
    read = corrupt.read if corrupt is not None else (lambda path, expected: tf.data.TFRecordDataset(path))
    dataset = files.interleave(read, cycle_length=min(16, len(info.shards)),
                               block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
    if records == "shard":
        dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    dataset = dataset.shuffle(shuffle_buffer, seed=seed + epoch, reshuffle_each_iteration=False)
    if keep_probability is None:
        dataset = dataset.enumerate().repeat().skip(skip_records)
    else:
        # Blocks are numbered after the repeat, so each pass draws anew; records are numbered and skipped after
        # the draw, so a resumed run skips the records an uninterrupted one kept.
        dataset = balanced_draws(dataset.repeat(), keep_probability,
                                 lambda block: _element_seed(seed + _KEEP_SEED, epoch, block))
        dataset = dataset.enumerate().skip(skip_records)

    def prepare(index, serialized):
        features = _read_and_decode(serialized, image_size, sample_weight)
        element_seed = _element_seed(seed, epoch, index)
        features = random_flip(features, element_seed)
        if augment is not None:
            features = augment(features, element_seed)
        return features

    dataset = dataset.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    failures = failures or DecodeFailures()
    dataset = dataset.filter(failures.keep)
    if group_size > 1:
        if batch_size % group_size:
            raise ValueError(f"a batch of {batch_size} images does not hold whole groups of {group_size}")
        dataset = dataset.group_by_window(lambda features: tf.cast(features["identity"], tf.int64),
                                          lambda _, group: group.batch(group_size, drop_remainder=True),
                                          window_size=group_size).unbatch()
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(lambda f: {**f, "image": normalize_images(f["image"])})
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options).prefetch(AUTOTUNE)


def eval_dataset(data_dir: str, info: DatasetInfo, batch_size: int, image_size: int) -> tf.data.Dataset:
    """Every image of a split in stored order, as uint8 [B, S, S, 3], with its labels (no drops)."""
    dataset = tf.data.TFRecordDataset(shard_paths(data_dir, info))

    def prepare(serialized):
        features = schema.parse_record(serialized)
        features.pop("source")
        features["image"] = tf.cast(decode_image(features["image"], image_size), tf.uint8)
        return features

    return dataset.map(prepare, num_parallel_calls=AUTOTUNE).batch(batch_size).prefetch(AUTOTUNE)
