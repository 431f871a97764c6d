"""5-point alignment, the yaw estimate, the blur measure, and blur/occlusion synthesis in the pipeline."""

import math

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data import alignment, augmentation, schema, synthetic


def _dots(shape, points, radius=1.5):
    """An image with a bright Gaussian dot at each (x, y) point (pixel centres at integers)."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    image = np.zeros(shape[:2])
    for px, py in points:
        image += np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * radius ** 2))
    return np.repeat((255 * np.clip(image, 0, 1))[..., None], 3, axis=2).astype(np.uint8)


def _centroid(image, point, window=6):
    grey = image[..., 0].astype(np.float64)
    x0, y0 = int(round(point[0])), int(round(point[1]))
    patch = grey[y0 - window:y0 + window + 1, x0 - window:x0 + window + 1]
    y, x = np.mgrid[y0 - window:y0 + window + 1, x0 - window:x0 + window + 1]
    return np.array([(patch * x).sum() / patch.sum(), (patch * y).sum() / patch.sum()])


def test_alignment_puts_the_landmarks_on_the_reference_points():
    angle, scale, shift = math.radians(25.0), 1.9, np.array([60.0, 35.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    landmarks = alignment.ARCFACE_REFERENCE @ rotation.T * scale + shift
    landmarks += np.random.default_rng(0).normal(0, 0.3, landmarks.shape)  # detector noise
    photo = _dots((300, 260, 3), landmarks, radius=1.5 * scale)
    aligned = alignment.align_face(photo, landmarks).numpy()
    assert aligned.shape == (112, 112, 3)
    for reference in alignment.ARCFACE_REFERENCE:
        assert np.linalg.norm(_centroid(aligned, reference) - reference) < 1.0
    # The fitted transform itself: exact on noiseless points, in closed form.
    matrix = alignment.similarity_transform(alignment.ARCFACE_REFERENCE * 2 + 5, alignment.ARCFACE_REFERENCE)
    np.testing.assert_allclose(matrix, [[0.5, 0, -2.5], [0, 0.5, -2.5]], atol=1e-9)


def test_yaw_sign_and_bins_on_constructed_landmarks():
    frontal = alignment.ARCFACE_REFERENCE
    assert abs(alignment.estimate_yaw(frontal)) < 1.0
    assert schema.pose_bin(alignment.estimate_yaw(frontal)) == 3
    # The face turned to its left: the nose tip moves to the image's right of the face's midline.
    eyes_and_mouth = np.array([[40.0, 50.0], [62.0, 50.0], [0.0, 0.0], [43.0, 90.0], [60.0, 90.0]])
    turned_left = eyes_and_mouth.copy()
    turned_left[2] = [75.0, 70.0]
    turned_right = eyes_and_mouth.copy()
    turned_right[2] = [28.0, 70.0]
    assert alignment.estimate_yaw(turned_left) > 60 and schema.pose_bin(alignment.estimate_yaw(turned_left)) == 6
    assert alignment.estimate_yaw(turned_right) < -60 and schema.pose_bin(alignment.estimate_yaw(turned_right)) == 0
    # Head roll does not change the estimate; a mirrored face negates it.
    roll = math.radians(30)
    rotation = np.array([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
    assert alignment.estimate_yaw(turned_left @ rotation.T) == pytest.approx(alignment.estimate_yaw(turned_left))
    mirrored = turned_left * [-1, 1] + [112, 0]
    mirrored = mirrored[[1, 0, 2, 4, 3]]
    assert alignment.estimate_yaw(mirrored) == pytest.approx(-alignment.estimate_yaw(turned_left))


def test_laplacian_variance_matches_numpy():
    image = np.random.default_rng(1).uniform(0, 255, (20, 24, 3)).astype(np.float32)
    grey = image @ np.array([0.299, 0.587, 0.114], np.float32)
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    assert float(alignment.laplacian_variance(tf.constant(image))) == pytest.approx(laplacian.var(), rel=1e-4)
    assert [alignment.blur_class(v) for v in (1000.0, 10.0, 1.0, 0.1)] == [0, 1, 2, 3]


def _synthesise(features, synth, count):
    def one(index):
        element = {name: tf.constant(value) for name, value in features.items()}
        return synth(element, tf.stack([tf.constant(7, tf.int64), tf.cast(index, tf.int64)]))

    dataset = tf.data.Dataset.range(count).map(one).batch(count)
    return next(iter(dataset))


CHI2_999 = {3: 16.27, 4: 18.47}  # chi-square quantiles at 0.999 for 3 and 4 degrees of freedom


def _chi_square(observed, expected):
    return float(np.sum((observed - expected) ** 2 / expected))


def test_synthesised_label_histograms_follow_the_probabilities():
    count = 3000
    features = {"image": np.full((16, 16, 3), 128, np.float32), "occlusion": np.int32(0), "blur": np.int32(0),
                "pose": np.int32(3)}
    out = _synthesise(features, augmentation.VariationAugmentation(blur_prob=0.4, occlusion_prob=0.3), count)
    occlusion = np.bincount(out["occlusion"].numpy(), minlength=5)
    blur = np.bincount(out["blur"].numpy(), minlength=4)
    assert _chi_square(occlusion, count * np.array([0.7, 0.075, 0.075, 0.075, 0.075])) < CHI2_999[4]
    assert _chi_square(blur, count * np.array([0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3])) < CHI2_999[3]
    # Occluded images changed where the label says; untouched ones did not.
    changed = np.any(out["image"].numpy() != 128, axis=(1, 2, 3))
    np.testing.assert_array_equal(changed[out["blur"].numpy() == 0], out["occlusion"].numpy()[out["blur"].numpy() == 0] > 0)


def test_a_synthesised_blur_lands_in_its_measured_bin():
    size = alignment.ALIGNED_SIZE
    synth = augmentation.VariationAugmentation(blur_prob=1.0)
    hits = 0
    for face in range(12):
        identity = synthetic.make_identity(11, 40_000_000 + face, face % 4)
        rng = np.random.default_rng([11, face])
        image = synthetic.render_face(identity, 0.0, 0, 0, size, rng).astype(np.float32)
        element = {"image": tf.constant(image), "blur": tf.constant(0), "occlusion": tf.constant(0)}
        out = synth(element, tf.constant([3, face], tf.int64))
        measured = alignment.blur_class(float(alignment.laplacian_variance(out["image"])))
        hits += measured == int(out["blur"])
    assert hits >= 11, f"{hits}/12 blurred faces measured in the bin of the blur applied"


def test_facenet_and_none_placements_crop_as_worked_by_hand():
    # davidsandberg/facenet: the box grown by margin / 2 on each side, rounded down to whole pixels, clipped.
    box = (50.6, 40.2, 100.0, 120.0)  # x, y, width, height in a 200 x 300 photo
    np.testing.assert_array_equal(alignment.facenet_box(box, (200, 300, 3), margin=32), [34, 24, 166, 176])
    np.testing.assert_array_equal(alignment.facenet_box((5.0, 190.0, 40.0, 40.0), (200, 300, 3), 32), [0, 174, 61, 200])
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (120, 100, 3)).astype(np.uint8)
    # A crop of the model's size is copied pixel for pixel.
    crop = np.array([10, 20, 74, 84])
    placed = alignment.warp_uint8(photo, alignment.crop_transform(crop, 64), 64).numpy()
    np.testing.assert_array_equal(placed, photo[20:84, 10:74])
    # `none` halves a 64 x 64 photo: each output pixel is the mean of a 2 x 2 block (bilinear at its centre).
    square = photo[:64, :64].astype(np.float64)
    halved = alignment.warp_uint8(photo[:64, :64], alignment.face_transform("none", 32, (64, 64, 3)), 32).numpy()
    blocks = square.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(halved, np.round(blocks).astype(np.uint8))
    placement = alignment.Placement("facenet", margin=44)
    assert placement.describe() == {"align": "facenet", "align_margin": 44}
    np.testing.assert_array_equal(placement.transform(64, photo.shape, box=(30.0, 30.0, 20.0, 20.0)),
                                  alignment.crop_transform(np.array([8, 8, 72, 72]), 64))
    assert alignment.Placement("facenet").as_is(np.zeros((160, 160, 3)), 160)
    assert not alignment.Placement("facenet").as_is(np.zeros((112, 112, 3)), 160)
    with pytest.raises(ValueError, match="unknown --align 'dlib'; expected one of arcface, facenet, none"):
        alignment.Placement("dlib")


def test_align_flag_is_listed_and_its_values_match_the_library():
    from mvcom_tf.cli import ALIGN_MODES
    from tests.helpers import run_module

    assert ALIGN_MODES == alignment.ALIGN_MODES
    for command in ("mvcom_tf.evaluate", "mvcom_tf.embed"):
        result = run_module(["-m", command, "--helpfull"])
        assert "--align: <arcface|facenet|none>" in result.stdout, command
        assert "--align_margin" in result.stdout
