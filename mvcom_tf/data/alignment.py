"""Face geometry from 5-point landmarks: ArcFace alignment, a yaw estimate, and a blur measure.

Landmarks are (x, y) pixel coordinates, pixel centres at integers (the convention of
insightface, OpenCV and VGGFace2's CSVs), in the order left eye, right eye, nose tip,
left mouth corner, right mouth corner ("left" = the image's left).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from mvcom_tf.data import schema

ALIGNED_SIZE = 112
# insightface's reference positions of the 5 landmarks in a 112x112 aligned face.
ARCFACE_REFERENCE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)

# The yaw estimator's face model: depth (towards the camera) of the nose tip and the mouth
# corners relative to the eye centres, in units of half the distance between the eyes.
# Values of an average adult head (eye centres 63 mm apart, nose tip 35 mm and mouth corners
# 15 mm in front of them): YAW_DEPTH_RATIO = (35 - 15 / 2) / 31.5.
YAW_DEPTH_RATIO = (35.0 - 7.5) / 31.5

# Variance of the Laplacian on a 112x112 aligned face (grey levels 0-255): upper edges of
# blur classes 3 (severe), 2 (moderate), 1 (mild); above the last is 0 (sharp). Calibrated by
# tools/calibrate_blur.py on synthetic faces blurred as the pipeline synthesises each class;
# photographs have more fine texture: recalibrate (converters' --blur_thresholds) for them.
BLUR_THRESHOLDS = (0.321, 2.08, 64.4)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, translation) mapping source onto target.

    Umeyama's closed form, as insightface's `norm_crop` uses (via skimage).
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    source_centered, target_centered = source - source_mean, target - target_mean
    covariance = target_centered.T @ source_centered / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    reflect = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ reflect @ vt
    scale = np.trace(np.diag(singular) @ reflect) / max(np.mean(np.sum(source_centered ** 2, axis=1)), 1e-12)
    translation = target_mean - scale * rotation @ source_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)


def looks_aligned(image: np.ndarray, model_size: int) -> bool:
    """Whether a photo is already an aligned face crop: square, at the model's input size or insightface's 112 px
    (what `evaluate` and `embed` then take as it is instead of detecting a face in it)."""
    return image.shape[0] == image.shape[1] and image.shape[0] in (model_size, ALIGNED_SIZE)


def alignment_transform(landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The 8 numbers ImageProjectiveTransformV3 takes (output pixel -> input pixel) to align a face of
    these 5 landmarks onto the ArcFace reference scaled to `size`."""
    matrix = similarity_transform(landmarks, ARCFACE_REFERENCE * (size / ALIGNED_SIZE))
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))
    return inverse.reshape(-1)[:8].astype(np.float32)


# How a detected face becomes the model's input (--align of evaluate and embed):
#   arcface: the 5 landmarks onto insightface's reference (this project's and insightface's models);
#   facenet: the detector's box grown by a margin, cropped and resized to a square (davidsandberg/facenet's
#            align_dataset_mtcnn.py: the margin in the photo's pixels, half on each side, the box then rounded
#            to whole pixels and clipped to the photo; facenet-pytorch's MTCNN instead counts its margin in
#            pixels of the output: margin_out = margin * box_side / (size - margin_out) in the photo);
#   none: the photo is already a face crop, resized to a square as it is.
ALIGN_MODES = ("arcface", "facenet", "none")
# davidsandberg/facenet's LFW validation aligns at 160 px with a 32 px margin (its training crops use 44 at 182).
FACENET_MARGIN = 32


def facenet_box(box: tuple[float, float, float, float], image_shape: tuple[int, ...],
                margin: float = FACENET_MARGIN) -> np.ndarray:
    """The crop (x1, y1, x2, y2), whole pixels, of a detection box (x, y, width, height) grown by `margin` photo
    pixels in all (half on each side) and clipped to the photo, as davidsandberg/facenet crops."""
    x, y, width, height = box
    height_limit, width_limit = image_shape[0], image_shape[1]
    return np.array([max(int(x - margin / 2), 0), max(int(y - margin / 2), 0),
                     min(int(x + width + margin / 2), width_limit), min(int(y + height + margin / 2), height_limit)])


def crop_transform(crop: np.ndarray, size: int) -> np.ndarray:
    """The 8 numbers of ImageProjectiveTransformV3 that map the crop (x1, y1, x2, y2) onto [size, size] (output
    pixel centres onto the crop's, bilinear)."""
    x1, y1, x2, y2 = (float(v) for v in crop)
    scale_x, scale_y = (x2 - x1) / size, (y2 - y1) / size
    return np.array([scale_x, 0.0, x1 + 0.5 * scale_x - 0.5, 0.0, scale_y, y1 + 0.5 * scale_y - 0.5, 0.0, 0.0],
                    np.float32)


def face_transform(mode: str, size: int, image_shape: tuple[int, ...], landmarks: np.ndarray | None = None,
                   box: tuple[float, float, float, float] | None = None,
                   margin: float = FACENET_MARGIN) -> np.ndarray:
    """The warp that makes a detected face the model's [size, size] input under --align `mode` (`none`: the
    whole photo)."""
    if mode == "arcface":
        return alignment_transform(landmarks, size)
    if mode == "facenet":
        return crop_transform(facenet_box(box, image_shape, margin), size)
    if mode == "none":
        return crop_transform(np.array([0, 0, image_shape[1], image_shape[0]]), size)
    raise ValueError(f"unknown --align {mode!r}; expected one of {', '.join(ALIGN_MODES)}")


@dataclasses.dataclass(frozen=True)
class Placement:
    """--align: how a photo's face becomes the model's input (ALIGN_MODES), and facenet's margin."""

    mode: str = "arcface"
    margin: float = FACENET_MARGIN

    def __post_init__(self) -> None:
        if self.mode not in ALIGN_MODES:
            raise ValueError(f"unknown --align {self.mode!r}; expected one of {', '.join(ALIGN_MODES)}")

    def as_is(self, image: np.ndarray, size: int) -> bool:
        """Whether the photo is taken whole, without detection: `none` always; `arcface` an aligned crop
        (looks_aligned); `facenet` a square crop at the model's size."""
        if self.mode == "none":
            return True
        if self.mode == "arcface":
            return looks_aligned(image, size)
        return image.shape[0] == image.shape[1] == size

    def transform(self, size: int, image_shape: tuple[int, ...], landmarks: np.ndarray | None = None,
                  box: tuple[float, float, float, float] | None = None) -> np.ndarray:
        """The warp onto the model's [size, size] input (face_transform)."""
        return face_transform(self.mode, size, image_shape, landmarks, box, self.margin)

    def describe(self) -> dict:
        """What results.json records."""
        return {"align": self.mode, **({"align_margin": self.margin} if self.mode == "facenet" else {})}


def warp(image: tf.Tensor, transform: tf.Tensor, size: int | tf.Tensor) -> tf.Tensor:
    """Bilinear warp of one float image [H, W, 3] by an alignment_transform to [size, size, 3] (graph op)."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf.stack([size, size]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]


@tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([8], tf.float32),
                              tf.TensorSpec([], tf.int32)])
def _warp_uint8(image: tf.Tensor, transform: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    warped = warp(tf.cast(image, tf.float32), transform, size)
    return tf.cast(tf.clip_by_value(tf.round(warped), 0.0, 255.0), tf.uint8)


def align_face(image: np.ndarray | tf.Tensor, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> tf.Tensor:
    """Warps a face so its 5 landmarks land on the ArcFace reference (scaled to `size`); uint8 [size, size, 3]."""
    return warp_uint8(image, alignment_transform(landmarks, size), size)


def warp_uint8(image: np.ndarray | tf.Tensor, transform: np.ndarray, size: int) -> tf.Tensor:
    """A uint8 photo warped by one of this module's transforms to uint8 [size, size, 3]."""
    return _warp_uint8(tf.convert_to_tensor(image, tf.uint8), np.asarray(transform, np.float32),
                       tf.constant(size, tf.int32))


def estimate_yaw(landmarks: np.ndarray) -> float:
    """Yaw in degrees from 5 landmarks; positive when the face turns to its left (nose towards image right).

    In-plane rotation is removed first (eye line made horizontal). Under weak perspective a
    yaw theta moves the nose tip off the face's midline (the mean of the eye and mouth
    midpoints) by YAW_DEPTH_RATIO * tan(theta) half inter-ocular distances, the latter
    foreshortened by cos(theta); the estimate inverts that.
    """
    points = np.asarray(landmarks, np.float64)
    left_eye, right_eye, nose, left_mouth, right_mouth = points
    eye_vector = right_eye - left_eye
    roll = math.atan2(eye_vector[1], eye_vector[0])
    cos_r, sin_r = math.cos(-roll), math.sin(-roll)
    rotated = points @ np.array([[cos_r, sin_r], [-sin_r, cos_r]])
    half_eyes = abs(rotated[1, 0] - rotated[0, 0]) / 2.0
    if half_eyes < 1e-6:
        return 90.0 if rotated[2, 0] > rotated[0, 0] else -90.0
    midline = (rotated[0, 0] + rotated[1, 0] + rotated[3, 0] + rotated[4, 0]) / 4.0
    offset = (rotated[2, 0] - midline) / half_eyes
    return math.degrees(math.atan(offset / YAW_DEPTH_RATIO))


@tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
def laplacian_variance(image: tf.Tensor) -> tf.Tensor:
    """Variance of the 4-neighbour Laplacian of the grey image (pixel values 0-255)."""
    grey = tf.tensordot(image, tf.constant([0.299, 0.587, 0.114]), axes=[[2], [0]])
    laplacian = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1])
    return tf.math.reduce_variance(laplacian)


def blur_class(variance: float, thresholds: tuple[float, ...] = BLUR_THRESHOLDS) -> int:
    """The blur class (0 sharp ... 3 severe) of a Laplacian variance measured on a 112x112 aligned face."""
    if len(thresholds) != schema.NUM_CLASSES["blur"] - 1 or list(thresholds) != sorted(thresholds):
        raise ValueError(f"blur thresholds must be {schema.NUM_CLASSES['blur'] - 1} increasing numbers, "
                         f"got {thresholds}")
    for index, edge in enumerate(thresholds):
        if variance < edge:
            return schema.NUM_CLASSES["blur"] - 1 - index
    return 0
