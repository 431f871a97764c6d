"""Training images/s of the plain margin-loss step (float32, tf.function) for IResNets.

    python benchmarks/train_step.py [--backbones=iresnet50 --image_size=112 --batch=8 --repeats=5]

Each backbone runs in its own process. Prints a table, then one JSON line keyed
`<backbone>_float32_eager` (images/s; `eager` = tf.function without XLA).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from benchmarks.steps import run_isolated

flags.DEFINE_list("backbones", ["iresnet50"], "Backbones to time.")
flags.DEFINE_integer("image_size", 112, "Image size.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("repeats", 5, "Timed steps per backbone (after 2 warm-up steps).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    summary = {}
    print("| backbone | image | batch | s/step | images/s | peak MB |")
    print("|---|---|---|---|---|---|")
    for backbone in FLAGS.backbones:
        row = run_isolated(kind="plain", backbone=backbone, image_size=FLAGS.image_size, batch=FLAGS.batch,
                           meta_batch=FLAGS.batch, repeats=FLAGS.repeats)
        print(f"| {backbone} | {FLAGS.image_size} | {FLAGS.batch} | {row['seconds']:.3f} | "
              f"{row['images_per_s']:.2f} | {row['peak_mb']:.0f} |")
        summary[f"{backbone}_float32_eager"] = row["images_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
