"""Steps/s of a small training step with one step per tf.function call and with several (--steps_per_execution).

    python -m benchmarks.steps_per_execution [--backbone=iresnet18 --width_multiplier=0.125 --image_size=32
                                              --batch=16 --steps=200 --per_call=1,5,20]

The loop's own CompiledSteps on an in-memory input iterator (the same batches for every variant,
one process, the variants in turn, then repeated once in reverse order to even out drift); the
baseline is 1 step per call. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("backbone", "iresnet18", "Backbone.")
    flags.DEFINE_float("width_multiplier", 0.125, "Channel width multiplier (small steps show the dispatch cost).")
    flags.DEFINE_integer("image_size", 32, "Image size.")
    flags.DEFINE_integer("batch", 16, "Batch size.")
    flags.DEFINE_integer("steps", 200, "Timed steps per variant and round (after one warm-up call).")
    flags.DEFINE_list("per_call", ["1", "5", "20"], "Steps per call to compare; the first is the baseline.")


def main(argv):
    del argv
    import keras
    import numpy as np
    import tensorflow as tf

    from mvcom_tf.config import Schedule, TrainConfig
    from mvcom_tf.stages.build import build_margin_step
    from mvcom_tf.training.compiled import CompiledSteps

    keras.utils.set_random_seed(0)
    classes = 100
    config = TrainConfig.from_flags(backbone=FLAGS.backbone, image_size=FLAGS.image_size, embedding_size=64,
                                    width_multiplier=FLAGS.width_multiplier, batch_size=FLAGS.batch)
    step = build_margin_step(config, classes, tf.fill([classes], 0.35), schedule=Schedule(1, 0.01, ()))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8 * FLAGS.batch, FLAGS.image_size, FLAGS.image_size, 3)).astype(np.float32)
    labels = rng.integers(0, classes, 8 * FLAGS.batch).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices({"image": images, "identity": labels}).batch(
        FLAGS.batch).repeat().prefetch(4)
    strategy = tf.distribute.get_strategy()
    per_call = [int(n) for n in FLAGS.per_call]
    compiled = {n: CompiledSteps(strategy, steps_per_execution=n) for n in per_call}
    iterator = iter(dataset)
    for n in per_call:
        compiled[n](step, (iterator,), n)  # trace and warm up
    seconds = {n: 0.0 for n in per_call}
    for order in (per_call, per_call[::-1]):
        for n in order:
            start = time.perf_counter()
            for _ in range(FLAGS.steps // n):
                output = compiled[n](step, (iterator,), n)
            float(output.sums.identity.loss)  # waits for the last call
            seconds[n] += time.perf_counter() - start
    rate = {n: 2 * (FLAGS.steps // n) * n / seconds[n] for n in per_call}
    baseline = rate[per_call[0]]
    print(f"{FLAGS.backbone} x{FLAGS.width_multiplier} {FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch}, "
          f"{FLAGS.steps} steps x 2 rounds per variant")
    print("| steps per call | steps/s | images/s | x baseline |")
    print("|---|---|---|---|")
    for n in per_call:
        print(f"| {n} | {rate[n]:.1f} | {rate[n] * FLAGS.batch:.0f} | {rate[n] / baseline:.2f} |")
    print(json.dumps({"backbone": FLAGS.backbone, "width_multiplier": FLAGS.width_multiplier, "batch": FLAGS.batch,
                      **{f"steps_per_s_{n}": round(rate[n], 2) for n in per_call},
                      **{f"speedup_{n}": round(rate[n] / baseline, 3) for n in per_call}}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
