"""Converter throughput: RecordIO -> TFRecord (a byte copy) and VGGFace2-style 5-point alignment.

    python -m benchmarks.convert [--rec_images=60000 --align_images=600 --workers=2]

Builds a 112x112 JPEG RecordIO package (insightface header layout) and a folder of 250x250
faces with landmarks under --work_dir, converts each with the real converter engine
(`mvcom_tf.data.conversion.convert`), once in-process and once with --workers processes, and
prints images/s. Process start-up (TensorFlow import in each spawned worker) is included.
Last line: JSON with `rec_images_per_s` and `align_images_per_s` (best of the two runs).
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
    flags.DEFINE_integer("rec_images", 60_000, "Images in the RecordIO package.", lower_bound=100)
    flags.DEFINE_integer("align_images", 600, "Images in the folder to align.", lower_bound=10)
    flags.DEFINE_integer("workers", 2, "Worker processes of the parallel runs.", lower_bound=1)
    flags.DEFINE_string("work_dir", "", "Scratch folder (default: a temporary one, removed at the end).")


def _faces(count: int, size: int) -> list:
    """`count` synthetic face images (uint8) to cycle through."""
    from mvcom_tf.data import synthetic

    faces = []
    for index in range(count):
        identity = synthetic.make_identity(0, index, index % 4)
        faces.append(synthetic.render_face(identity, 0.0, 0, 0, size, np.random.default_rng(index)))
    return faces


def _timed_convert(source, out_dir: str, workers: int) -> tuple[float, int]:
    from mvcom_tf.data import conversion

    start = time.perf_counter()
    _, report = conversion.convert(source, out_dir, num_shards=8, workers=workers, progress=False)
    return time.perf_counter() - start, report.written


def main(argv) -> None:
    del argv
    import tensorflow as tf

    from mvcom_tf.data import alignment, sources
    from tests import recordio_files

    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="mvcom_convert_bench_")
    rows, summary = [], {}
    try:
        jpegs = [tf.io.encode_jpeg(face, quality=90).numpy() for face in _faces(50, 112)]
        per_identity = 50
        counts = [per_identity] * (FLAGS.rec_images // per_identity)
        recordio_files.write_package(os.path.join(work, "rec"), counts, size=112,
                                     image_fn=lambda identity, index: jpegs[(identity + index) % len(jpegs)])
        mb = os.path.getsize(os.path.join(work, "rec", "train.rec")) / 2 ** 20
        for workers in sorted({1, FLAGS.workers}):
            seconds, written = _timed_convert(sources.RecordIOSource(os.path.join(work, "rec")),
                                              os.path.join(work, f"rec_out_{workers}"), workers)
            rows.append(("rec -> TFRecord (copy)", workers, written, seconds))
            summary["rec_images_per_s"] = max(summary.get("rec_images_per_s", 0.0), written / seconds)

        faces = _faces(20, 250)
        landmarks_rows = ["NAME_ID," + ",".join(f"P{i}{axis}" for i in range(1, 6) for axis in "XY")]
        landmarks = alignment.ARCFACE_REFERENCE * 1.8 + 25.0
        for index in range(FLAGS.align_images):
            name = f"n{index // 20:06d}/{index % 20:04d}_01"
            os.makedirs(os.path.join(work, "folder", "train", name.split("/")[0]), exist_ok=True)
            with open(os.path.join(work, "folder", "train", name + ".jpg"), "wb") as f:
                f.write(tf.io.encode_jpeg(faces[index % len(faces)], quality=90).numpy())
            landmarks_rows.append(name + "," + ",".join(f"{v:.2f}" for v in landmarks.reshape(-1)))
        os.makedirs(os.path.join(work, "folder", "bb_landmark"))
        with open(os.path.join(work, "folder", "bb_landmark", "loose_landmark_train.csv"), "w") as f:
            f.write("\n".join(landmarks_rows) + "\n")
        for workers in sorted({1, FLAGS.workers}):
            seconds, written = _timed_convert(sources.vggface2(os.path.join(work, "folder")),
                                              os.path.join(work, f"align_out_{workers}"), workers)
            rows.append(("250 px JPEG -> aligned 112 (decode, warp, blur measure, encode)", workers, written, seconds))
            summary["align_images_per_s"] = max(summary.get("align_images_per_s", 0.0), written / seconds)
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"RecordIO package: {FLAGS.rec_images} JPEGs, {mb:.0f} MB")
    print("| conversion | workers | images | seconds | images/s |\n|---|---|---|---|---|")
    for name, workers, written, seconds in rows:
        print(f"| {name} | {workers} | {written} | {seconds:.2f} | {written / seconds:,.0f} |")
    print(json.dumps({key: round(value, 1) for key, value in summary.items()}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
