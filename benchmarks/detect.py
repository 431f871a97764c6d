"""Face detection + alignment throughput of the folder converter, against the same folder resized (no detection).

    python -m benchmarks.detect [--images=400 --workers=2]

Photographs: synthetic faces (96-160 px) pasted at varying places on textured backgrounds of
250x250 (LFW's size) and 1280x720, written as JPEGs in `<identity>/<image>` folders. Each folder
is converted by the real engine (`FolderSource`, `conversion.convert`) with --align=detect, its
images detected in batches of conversion.LOAD_BATCH and, as baselines in the same run, one by one
(the engine before batching) and with --align=none (decode, resize, encode); with 1 and --workers
worker processes; worker start-up (TensorFlow and MTCNN in each) is included. The target is 20
images/s at 250x250. Last line: JSON with images/s per row.
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
    flags.DEFINE_integer("images", 400, "Photographs per size.", lower_bound=10)
    flags.DEFINE_integer("workers", 2, "Worker processes of the parallel runs.", lower_bound=1)
    flags.DEFINE_string("work_dir", "", "Scratch folder (default: a temporary one, removed at the end).")
SIZES = ((250, 250), (1280, 720))


def write_photos(folder: str, count: int, width: int, height: int) -> None:
    """`count` JPEG photographs, 10 per identity, a synthetic face on a textured background in each."""
    import tensorflow as tf

    from mvcom_tf.data import synthetic

    rng = np.random.default_rng(0)
    for index in range(count):
        face_size = int(rng.integers(96, 161)) if height > 300 else int(rng.integers(96, 140))
        identity = synthetic.make_identity(0, index // 10, (index // 10) % 4)
        face = synthetic.render_face(identity, float(rng.uniform(-20, 20)), 0, 0, face_size, rng)
        background = np.clip(rng.normal(120, 30, (height // 8, width // 8, 3)), 0, 255).astype(np.uint8)
        canvas = tf.image.resize(background, [height, width]).numpy().astype(np.uint8)
        top, left = int(rng.integers(0, height - face_size)), int(rng.integers(0, width - face_size))
        canvas[top:top + face_size, left:left + face_size] = face
        path = os.path.join(folder, f"id{index // 10:04d}", f"{index % 10:02d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(tf.io.encode_jpeg(canvas, quality=90).numpy())


def main(argv) -> None:
    del argv
    from mvcom_tf.data import conversion, sources

    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="mvcom_detect_bench_")
    rows, summary = [], {}
    try:
        for width, height in SIZES:
            folder = os.path.join(work, f"photos_{width}x{height}")
            write_photos(folder, FLAGS.images, width, height)
            for align, batch in (("none", conversion.LOAD_BATCH), ("detect", 1), ("detect", conversion.LOAD_BATCH)):
                for workers in sorted({1, FLAGS.workers}):
                    out = os.path.join(work, f"out_{width}_{align}_{batch}_{workers}")
                    start = time.perf_counter()
                    _, report = conversion.convert(sources.FolderSource(folder, align=align), out, num_shards=2,
                                                   workers=workers, progress=False, load_batch=batch)
                    seconds = time.perf_counter() - start
                    rate = report.read / seconds
                    rows.append((f"{width}x{height}", align, batch, workers, report.read, report.detected,
                                 report.skipped["no_face"], seconds, rate))
                    summary[f"{width}x{height}_{align}_batch{batch}_{workers}w_images_per_s"] = round(rate, 1)
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print("| photos | align | images per load | workers | images | detected | no face | seconds | images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, align, batch, workers, images, detected, no_face, seconds, rate in rows:
        print(f"| {size} | {align} | {batch} | {workers} | {images} | {detected} | {no_face} | {seconds:.1f} "
              f"| {rate:.1f} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
