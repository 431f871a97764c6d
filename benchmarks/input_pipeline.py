"""Training input pipeline throughput at 112x112: decode + flip, with and without blur/occlusion synthesis.

    python -m benchmarks.input_pipeline [--images=4000 --batch=128 --batches=60 --blur_prob=0.5 --occlusion_prob=0.5]

Writes a split of 112x112 JPEG faces (TFRecord schema v1) to a temporary folder and reads it
with `mvcom_tf.data.pipeline.train_dataset`, as training does (shuffle, decode, flip, the
`augment` hook, batch, normalise), for the baseline (flip only) and with synthesis, in one
run. Last line: JSON with `images_per_s` (with synthesis) and `baseline_images_per_s`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_integer("images", 4000, "Images in the split (repeated as needed).", lower_bound=100)
    flags.DEFINE_integer("batch", 128, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("batches", 60, "Timed batches (after 5 warm-up batches).", lower_bound=1)
    flags.DEFINE_float("blur_prob", 0.5, "--synth_blur_prob of the synthesis run.")
    flags.DEFINE_float("occlusion_prob", 0.5, "--synth_occlusion_prob of the synthesis run.")


def main(argv) -> None:
    del argv
    import tensorflow as tf

    from benchmarks.convert import _faces
    from mvcom_tf.data import schema
    from mvcom_tf.data.pipeline import train_dataset
    from mvcom_tf.data.augmentation import VariationAugmentation
    from mvcom_tf.data.tfrecord import SplitWriter

    work = tempfile.mkdtemp(prefix="mvcom_pipeline_bench_")
    try:
        jpegs = [tf.io.encode_jpeg(face, quality=90).numpy() for face in _faces(50, 112)]
        writer = SplitWriter(work, "train", 8, 112)
        per_shard = FLAGS.images // 8
        for shard in range(8):
            writer.write_shard(shard, (schema.FaceRecord(jpegs[i % len(jpegs)], identity=i % 500, blur=0,
                                                         occlusion=0, source=str(i))
                                       for i in range(shard * per_shard, (shard + 1) * per_shard)))
        info = writer.finish({"tool": "benchmarks/input_pipeline.py"})
        rows = []
        for name, augmentation in (("decode + flip (baseline)", None),
                                   (f"+ blur p={FLAGS.blur_prob}, occlusion p={FLAGS.occlusion_prob}",
                                    VariationAugmentation(FLAGS.blur_prob, FLAGS.occlusion_prob))):
            dataset = train_dataset(work, info, batch_size=FLAGS.batch, image_size=112, seed=0, epoch=0,
                                    shuffle_buffer=2000, augment=augmentation)
            iterator = iter(dataset)
            for _ in range(5):
                next(iterator)
            start = time.perf_counter()
            for _ in range(FLAGS.batches):
                next(iterator)["image"].numpy()
            seconds = time.perf_counter() - start
            rows.append((name, FLAGS.batch * FLAGS.batches / seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"112x112 JPEG, batch {FLAGS.batch}, {os.cpu_count()} cores")
    print("| pipeline | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")
    print(json.dumps({"baseline_images_per_s": round(rows[0][1], 1), "images_per_s": round(rows[1][1], 1)}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
