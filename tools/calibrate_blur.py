"""Calibrate the blur classes' Laplacian-variance thresholds: `python tools/calibrate_blur.py`.

Renders sharp synthetic faces at 112x112, blurs each at every class's sigma exactly as the
input pipeline synthesises it, measures the variance of the Laplacian, and puts each
threshold at the geometric mean of the largest value of the blurrier class and the smallest
of the sharper one. Prints the ranges and the thresholds for `alignment.BLUR_THRESHOLDS`.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from mvcom_tf.data import alignment, augmentation, schema, synthetic


def measure(num_faces: int, seed: int) -> dict[int, np.ndarray]:
    """Laplacian variances per blur class of `num_faces` synthetic faces (any pose and occlusion)."""
    import tensorflow as tf

    size = alignment.ALIGNED_SIZE
    values = {level: [] for level in range(schema.NUM_CLASSES["blur"])}
    for face in range(num_faces):
        identity = synthetic.make_identity(seed, 30_000_000 + face, face % 4)
        rng = np.random.default_rng([seed, face])
        image = synthetic.render_face(identity, float(rng.uniform(-40, 40)), int(rng.integers(5)), 0, size, rng)
        for level in values:
            blurred = augmentation.blur_level(tf.constant(image, tf.float32), tf.constant(level))
            values[level].append(float(alignment.laplacian_variance(blurred)))
    return {level: np.asarray(v) for level, v in values.items()}


def thresholds(values: dict[int, np.ndarray]) -> tuple[float, ...]:
    """Upper edges of classes 3, 2, 1: geometric means between neighbouring classes' ranges."""
    levels = sorted(values, reverse=True)
    return tuple(float(np.sqrt(values[blurrier].max() * values[sharper].min()))
                 for blurrier, sharper in zip(levels, levels[1:]))


def main(argv) -> None:
    del argv
    values = measure(flags.FLAGS.num_faces, flags.FLAGS.seed)
    print("| blur class | sigma at 112 px | min | median | max |\n| --- | --- | --- | --- | --- |")
    for level, v in values.items():
        print(f"| {schema.CLASS_NAMES['blur'][level]} | {augmentation.BLUR_SIGMA_AT_64[level] * 112 / 64:.2f} | "
              f"{v.min():.3g} | {np.median(v):.3g} | {v.max():.3g} |")
    edges = thresholds(values)
    print(f"BLUR_THRESHOLDS = ({', '.join(f'{edge:.3g}' for edge in edges)})")


if __name__ == "__main__":
    flags.DEFINE_integer("num_faces", 60, "Synthetic faces to measure.", lower_bound=1)
    flags.DEFINE_integer("seed", 5, "Seed of the faces (not the demo's splits).")
    app.run(main)
