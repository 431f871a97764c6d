"""Render a synthetic face split: `python tools/make_synthetic.py --out_dir data/synthetic/train --split train`."""

from __future__ import annotations

import sys

from absl import app, flags

from mvcom_tf.data import synthetic
from mvcom_tf.progress_line import ProgressLine

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("out_dir", None, "Folder to write the split to (shards + dataset.json).", required=True)
    flags.DEFINE_enum("split", "train", list(synthetic.SPLITS), "train: long-tailed; meta: balanced factors; "
                      "test, val: verification pairs balanced within every group (val: the bias study's split for "
                      "choosing settings).")
    flags.DEFINE_integer("num_identities", 500, "Identities in the split.", lower_bound=8)
    flags.DEFINE_integer("image_size", 32, "Image size in pixels.", lower_bound=16)
    flags.DEFINE_integer("seed", 0, "Seed: the same seed gives the same bytes.")
    flags.DEFINE_integer("num_shards", 4, "TFRecord shards.", lower_bound=1)
    flags.DEFINE_integer("max_images", 80, "train: images of the largest identity.", lower_bound=1)
    flags.DEFINE_integer("min_images", 5, "train: images of the smallest identity.", lower_bound=1)
    flags.DEFINE_float("zipf_exponent", 0.5, "train: images per identity ~ rank ** -exponent.", lower_bound=0.0)
    flags.DEFINE_integer("meta_images", 10, "meta: images per identity.", lower_bound=1)
    flags.DEFINE_integer("pair_anchors", 1, "test, val: clean anchor images per identity; every probe is paired with "
                         "each (a positive and a same-group negative per anchor).", lower_bound=1)


def main(argv):
    del argv
    config = synthetic.SplitConfig(
        num_identities=FLAGS.num_identities, image_size=FLAGS.image_size, seed=FLAGS.seed,
        max_images=FLAGS.max_images, min_images=FLAGS.min_images, zipf_exponent=FLAGS.zipf_exponent,
        meta_images=FLAGS.meta_images, pair_anchors=FLAGS.pair_anchors)
    line = None

    def progress(done: int, total: int) -> None:
        nonlocal line
        line = line or ProgressLine(f"synthetic {FLAGS.split}", total)
        line.advance(done - line.done)

    info = synthetic.write_split(FLAGS.out_dir, FLAGS.split, config, FLAGS.num_shards, progress)
    print(f"wrote {info.num_images} images of {info.num_identities} identities to {FLAGS.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
