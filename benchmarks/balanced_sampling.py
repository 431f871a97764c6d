"""Balanced resampling's input throughput (--train_sampling=balanced) beside the natural stream, in one run.

    python -m benchmarks.balanced_sampling [--images=20000 --tail_fraction=0.0025 --batch=128 --batches=40]

Writes a split of 112x112 JPEG faces whose pose, occlusion and blur tail classes each hold
--tail_fraction of the records (the bias study's headroom data: 0.25%), then reads it with
`mvcom_tf.data.pipeline.train_dataset` as training does, natural (the baseline) and balanced.
Balanced sampling keeps about one record in max/mean of the acceptance, so its cost is the draw:
the table also times the draw stage alone, a record at a time (the filter it replaced) and a
block at a time (the pipeline's). Last line: JSON with the figures.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_integer("images", 20_000, "Records in the split.", lower_bound=1000)
    flags.DEFINE_float("tail_fraction", 0.0025, "Share of the records in each tail class of pose, occlusion, blur.",
                       lower_bound=0.0001, upper_bound=0.1)
    flags.DEFINE_integer("batch", 128, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("batches", 40, "Timed batches (after 3 warm-up batches).", lower_bound=1)


def skewed_labels(count: int, tail_fraction: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per factor, every tail class at `tail_fraction` of the records, the head class the rest (ethnicity as
    the demo's split, about 14/10/66/10%)."""
    from mvcom_tf.data import schema, synthetic

    labels = {}
    for factor in ("pose", "occlusion", "blur"):
        classes = schema.NUM_CLASSES[factor]
        head = synthetic.HEAD_CLASS[factor]
        shares = np.full(classes, tail_fraction)
        shares[head] = 1 - tail_fraction * (classes - 1)
        labels[factor] = rng.choice(classes, size=count, p=shares)
    labels["ethnicity"] = rng.choice(4, size=count, p=[0.14, 0.10, 0.66, 0.10])
    return labels


def timed(iterator, batches: int, size: int) -> float:
    """Elements per second over `batches` calls of next(), after 3 warm-up calls."""
    for _ in range(3):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * size / (time.perf_counter() - start)


def main(argv) -> None:
    del argv
    import tensorflow as tf

    from benchmarks.convert import _faces
    from mvcom_tf.data import schema
    from mvcom_tf.data.pipeline import KEEP_BLOCK, balanced_acceptance, balanced_draws, train_dataset
    from mvcom_tf.data.tfrecord import SplitWriter, shard_paths

    work = tempfile.mkdtemp(prefix="mvcom_balanced_bench_")
    try:
        jpegs = [tf.io.encode_jpeg(face, quality=90).numpy() for face in _faces(50, 112)]
        labels = skewed_labels(FLAGS.images, FLAGS.tail_fraction, np.random.default_rng(0))
        writer = SplitWriter(work, "train", 8, 112)
        per_shard = FLAGS.images // 8
        for shard in range(8):
            writer.write_shard(shard, (schema.FaceRecord(jpegs[i % len(jpegs)], identity=i % 1000, source=str(i),
                                                         **{factor: int(labels[factor][i]) for factor in labels})
                                       for i in range(shard * per_shard, (shard + 1) * per_shard)))
        info = writer.finish({"tool": "benchmarks/balanced_sampling.py"})
        keep = balanced_acceptance(info.histograms)
        rows = []
        for name, keep_probability in (("natural stream (baseline)", None), ("balanced, block draws", keep)):
            dataset = train_dataset(work, info, batch_size=FLAGS.batch, image_size=112, seed=0, epoch=0,
                                    keep_probability=keep_probability)
            rows.append((f"train_dataset: {name}", "images/s", timed(iter(dataset), FLAGS.batches, FLAGS.batch)))

        records = tf.data.TFRecordDataset(shard_paths(work, info)).shuffle(20_000, seed=0).repeat()

        def one_at_a_time(index, serialized):  # the filter block draws replaced
            draw = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(0, tf.int64), index]))
            return draw < keep(schema.parse_record(serialized))

        draws = {"a record at a time (before)": records.enumerate().filter(one_at_a_time),
                 f"a block of {KEEP_BLOCK} at a time": balanced_draws(
                     records, keep, lambda block: tf.stack([tf.constant(0, tf.int64), block]))}
        for name, stream in draws.items():
            rows.append((f"draw stage alone: {name}", "records kept/s",
                         timed(iter(stream.batch(FLAGS.batch).prefetch(2)), FLAGS.batches // 4, FLAGS.batch)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    acceptance = float(np.mean(keep({factor: tf.constant(values, tf.int32) for factor, values in labels.items()})))
    print(f"112x112 JPEG, {FLAGS.images} records, tails at {FLAGS.tail_fraction:g}, batch {FLAGS.batch}, "
          f"{os.cpu_count()} cores; balanced keeps {acceptance:.4f} of the records read (1 in {1 / acceptance:.0f})")
    print("| stage | unit | rate |\n|---|---|---|")
    for name, unit, rate in rows:
        print(f"| {name} | {unit} | {rate:,.0f} |")
    print(json.dumps({"baseline_images_per_s": round(rows[0][2], 1), "balanced_images_per_s": round(rows[1][2], 1),
                      "draw_one_at_a_time_per_s": round(rows[2][2], 1), "draw_blocks_per_s": round(rows[3][2], 1),
                      "kept_fraction": round(acceptance, 5)}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
