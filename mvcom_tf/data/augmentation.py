"""Blur and occlusion synthesised on aligned faces in the input pipeline, labelled with what was applied.

Graph-mode TF ops, one image at a time inside `Dataset.map`, driven by the pipeline's
stateless per-element seed, so a resumed run synthesises exactly what an uninterrupted one
did. Geometry follows the ArcFace alignment (eyes at 46% of the height, mouth at 82%).
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from mvcom_tf.data import schema

# Gaussian sigma in pixels at 64 px for blur classes 0-3 (scaled with the image size); the
# synthetic renderer uses the same table, so its labels and synthesised ones agree.
BLUR_SIGMA_AT_64 = (0.0, 1.1, 2.0, 3.2)

# Occluder boxes as fractions of the aligned face: (top, bottom, left, right).
EYES_BAND = (0.37, 0.56, 0.16, 0.84)
LOWER_FACE = (0.60, 1.00, 0.14, 0.86)


def gaussian_blur(image: tf.Tensor, sigma: float) -> tf.Tensor:
    """Separable Gaussian blur (taps to 3 sigma, edges mirrored) of one [S, S, C] float image."""
    if sigma <= 0:
        return image
    radius = max(1, int(math.ceil(3.0 * sigma)))
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    taps = tf.exp(-0.5 * tf.square(offsets / sigma))
    taps = taps / tf.reduce_sum(taps)
    channels = image.shape[-1]
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    rows = tf.nn.depthwise_conv2d(padded, tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1]),
                                  strides=[1, 1, 1, 1], padding="VALID")
    both = tf.nn.depthwise_conv2d(rows, tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1]),
                                  strides=[1, 1, 1, 1], padding="VALID")
    return both[0]


def blur_level(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
    """Blurs an [S, S, C] image at blur class `level` (0: unchanged), sigma scaled to its size."""
    size = image.shape[0]
    branches = [lambda sigma=sigma: gaussian_blur(image, sigma * size / 64.0) for sigma in BLUR_SIGMA_AT_64]
    return tf.switch_case(level, branches)


def _box_mask(size: int, top, bottom, left, right) -> tf.Tensor:
    coords = (tf.range(size, dtype=tf.float32) + 0.5) / size
    rows = tf.logical_and(coords >= top, coords < bottom)
    cols = tf.logical_and(coords >= left, coords < right)
    return tf.logical_and(rows[:, None], cols[None, :])


def occluder_mask(kind: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Boolean [S, S] mask of occluder `kind` (1 eyes band, 2 lower face, 3 half face, 4 object patch)."""
    draws = tf.random.stateless_uniform([5], seed=seed)
    half_left = draws[0] < 0.5
    width, height = 0.3 + 0.2 * draws[1], 0.3 + 0.2 * draws[2]
    centre_x, centre_y = 0.2 + 0.6 * draws[3], 0.2 + 0.6 * draws[4]
    return tf.switch_case(kind, [
        lambda: tf.zeros([size, size], tf.bool),
        lambda: _box_mask(size, *EYES_BAND),
        lambda: _box_mask(size, *LOWER_FACE),
        lambda: _box_mask(size, 0.0, 1.0, tf.where(half_left, 0.0, 0.5), tf.where(half_left, 0.5, 1.0)),
        lambda: _box_mask(size, centre_y - height / 2, centre_y + height / 2,
                          centre_x - width / 2, centre_x + width / 2),
    ])


def _occluder_colour(kind: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    unit = tf.random.stateless_uniform([3], seed=seed)
    # Sunglasses dark, masks light, half-face and patches anything.
    low = tf.gather(tf.constant([[0.0] * 3, [10.0] * 3, [150.0, 170.0, 190.0], [40.0] * 3, [0.0] * 3]), kind)
    high = tf.gather(tf.constant([[0.0] * 3, [50.0] * 3, [230.0, 240.0, 255.0], [200.0] * 3, [255.0] * 3]), kind)
    return low + (high - low) * unit


@dataclasses.dataclass(frozen=True)
class VariationAugmentation:
    """The pipeline's `augment` hook: occlusion, then blur, each with its probability, labels updated.

    An applied variation replaces the record's label for that factor; a record left
    untouched keeps its own label (possibly -1).
    """

    blur_prob: float = 0.0
    occlusion_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("blur_prob", "occlusion_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def active(self) -> bool:
        return self.blur_prob > 0 or self.occlusion_prob > 0

    def __call__(self, features: dict[str, tf.Tensor], element_seed: tf.Tensor) -> dict[str, tf.Tensor]:
        features = dict(features)
        image = features["image"]
        size = image.shape[0]
        # Seeds derived from, and distinct from, the flip's (which uses element_seed itself).
        seeds = tf.unstack(tf.random.experimental.stateless_split(element_seed, num=6))

        if self.occlusion_prob > 0:
            occlude = tf.random.stateless_uniform([], seed=seeds[0]) < self.occlusion_prob
            kind = tf.random.stateless_uniform([], seeds[1], minval=1, maxval=schema.NUM_CLASSES["occlusion"],
                                                dtype=tf.int32)
            kind = tf.where(occlude, kind, 0)
            mask = occluder_mask(kind, size, seeds[2])[..., None]
            image = tf.where(mask, _occluder_colour(kind, seeds[3]), image)
            features["occlusion"] = tf.where(occlude, kind, features["occlusion"])

        if self.blur_prob > 0:
            blur = tf.random.stateless_uniform([], seed=seeds[4]) < self.blur_prob
            level = tf.random.stateless_uniform([], seeds[5], minval=1, maxval=schema.NUM_CLASSES["blur"],
                                                dtype=tf.int32)
            level = tf.where(blur, level, 0)
            image = blur_level(image, level)
            features["blur"] = tf.where(blur, level, features["blur"])

        features["image"] = image
        return features
