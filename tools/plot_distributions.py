"""The seed's Figs. 3-5 for a dataset folder: `python tools/plot_distributions.py --data_dir=data/ms1m/train`.

Reads only dataset.json (no images): images per identity sorted, and the class histograms of
pose, occlusion, blur and ethnicity, as one PNG (default `<data_dir>/distributions.png`).
"""

from __future__ import annotations

import posixpath
import sys

from absl import app, flags


def main(argv) -> int:
    del argv
    import tensorflow as tf

    from mvcom_tf.data import figures
    from mvcom_tf.data.tfrecord import DatasetError, read_info

    options = flags.FLAGS
    try:
        info = read_info(options.data_dir)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = options.out or posixpath.join(options.data_dir, "distributions.png")
    picture = figures.to_rgb(figures.distribution_figure(info, f"{options.data_dir} ({info.split})"))
    with tf.io.gfile.GFile(out, "wb") as f:
        f.write(tf.io.encode_png(picture).numpy())
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", None, "Dataset folder (holding dataset.json).", required=True)
    flags.DEFINE_string("out", "", "PNG to write; default <data_dir>/distributions.png.")
    app.run(main)
