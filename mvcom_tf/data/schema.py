"""TFRecord schema v1: the one description of a face record that every producer and reader uses."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

SCHEMA_VERSION = 1
UNKNOWN = -1

# Variation factors in the order used everywhere (residual columns, heads, histograms).
FACTORS = ("pose", "occlusion", "blur", "ethnicity")
CLASS_NAMES = {
    "pose": ("<-60", "[-60,-35)", "[-35,-15)", "[-15,15]", "(15,35]", "(35,60]", ">60"),
    "occlusion": ("none", "eyes_band", "lower_face", "half_face", "object_patch"),
    "blur": ("sharp", "mild", "moderate", "severe"),
    "ethnicity": ("African", "Asian", "Caucasian", "Indian"),
}
NUM_CLASSES = {factor: len(names) for factor, names in CLASS_NAMES.items()}
# Upper edges of the pose bins in degrees of yaw (positive yaw: the face turns to its left).
POSE_BIN_EDGES = (-60.0, -35.0, -15.0, 15.0, 35.0, 60.0)


def pose_bin(yaw_degrees: float) -> int:
    """The pose class of a yaw angle (METHOD.md's table); NaN gives UNKNOWN."""
    if math.isnan(yaw_degrees):
        return UNKNOWN
    for index, edge in enumerate(POSE_BIN_EDGES):
        # Bins below frontal are closed on the left ([-60,-35)); frontal and above on the right ((15,35]).
        if yaw_degrees < edge or (index >= 3 and yaw_degrees == edge):
            return index
    return len(POSE_BIN_EDGES)


@dataclasses.dataclass
class FaceRecord:
    """One face image with its identity and variation labels, as stored in a shard."""

    image: bytes
    identity: int
    pose: int = UNKNOWN
    occlusion: int = UNKNOWN
    blur: int = UNKNOWN
    ethnicity: int = UNKNOWN
    yaw: float = math.nan
    source: str = ""

    def labels(self) -> dict[str, int]:
        return {factor: getattr(self, factor) for factor in FACTORS}


def encode_record(record: FaceRecord) -> bytes:
    """Serialises a FaceRecord to a tf.train.Example."""
    for factor, label in record.labels().items():
        if not UNKNOWN <= label < NUM_CLASSES[factor]:
            raise ValueError(f"label/{factor}={label} outside [-1, {NUM_CLASSES[factor] - 1}] "
                             f"for {record.source or 'a record'}")
    # Filled in place: four times faster than building Feature objects, which matters to the
    # converters' byte-copy path (millions of records).
    example = tf.train.Example()
    feature = example.features.feature
    feature["image/encoded"].bytes_list.value.append(record.image)
    feature["image/yaw"].float_list.value.append(record.yaw)
    feature["image/source"].bytes_list.value.append(record.source.encode("utf-8"))
    feature["label/identity"].int64_list.value.append(int(record.identity))
    for factor, label in record.labels().items():
        feature[f"label/{factor}"].int64_list.value.append(int(label))
    # Deterministic: map fields otherwise serialise in an order that can differ between processes.
    return example.SerializeToString(deterministic=True)


FEATURE_SPEC = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/yaw": tf.io.FixedLenFeature([], tf.float32, default_value=math.nan),
    "image/source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "label/identity": tf.io.FixedLenFeature([], tf.int64),
    **{f"label/{factor}": tf.io.FixedLenFeature([], tf.int64, default_value=UNKNOWN)
       for factor in FACTORS},
}


def flip_pose(pose: tf.Tensor) -> tf.Tensor:
    """The pose class of the horizontally mirrored face (yaw changes sign)."""
    return tf.where(pose >= 0, NUM_CLASSES["pose"] - 1 - pose, pose)


def parse_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Parses one serialised Example (graph op) to a dict keyed like FaceRecord's fields."""
    parsed = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    features = {
        "image": parsed["image/encoded"],
        "yaw": parsed["image/yaw"],
        "source": parsed["image/source"],
        "identity": tf.cast(parsed["label/identity"], tf.int32),
    }
    features.update({factor: tf.cast(parsed[f"label/{factor}"], tf.int32) for factor in FACTORS})
    return features


def parse_labels(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """The variation labels of a batch of serialised Examples (graph op), without copying their image bytes."""
    parsed = tf.io.parse_example(serialized, {f"label/{factor}": FEATURE_SPEC[f"label/{factor}"] for factor in FACTORS})
    return {factor: tf.cast(parsed[f"label/{factor}"], tf.int32) for factor in FACTORS}


def decode_record(serialized: bytes) -> FaceRecord:
    """Parses one serialised Example back to a FaceRecord (Python side)."""
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    return FaceRecord(
        image=feature["image/encoded"].bytes_list.value[0],
        identity=feature["label/identity"].int64_list.value[0],
        yaw=float(np.float32(feature["image/yaw"].float_list.value[0])),
        source=feature["image/source"].bytes_list.value[0].decode("utf-8"),
        **{factor: feature[f"label/{factor}"].int64_list.value[0] for factor in FACTORS},
    )
