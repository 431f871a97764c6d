"""The seed's Fig. 6 from a run folder: faces of each factor's classes with the margins MvCoM learned for them.

    python tools/plot_margins.py --run_dir=runs/demo [--data_dir=data/synthetic/meta] [--out=margins.png]

One row per factor, one face per class, taken from --data_dir (default: the run's --meta_data,
read from flags.txt); each face is titled with its class and the mean residual r^k the meta
stage learned for training samples of that class (metrics.json, stages.meta.training).
"""

from __future__ import annotations

import json
import posixpath
import sys

from absl import app, flags


def class_margins(run_dir: str) -> dict[str, dict[int, float]]:
    """{factor: {class: mean residual}} from a run folder's metrics.json."""
    import tensorflow as tf

    with tf.io.gfile.GFile(posixpath.join(run_dir, "metrics.json")) as f:
        training = json.load(f).get("stages", {}).get("meta", {}).get("training", {})
    margins: dict[str, dict[int, float]] = {}
    for key, value in training.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "margin" and parts[2].isdigit():
            margins.setdefault(parts[1], {})[int(parts[2])] = float(value)
    if not margins:
        raise ValueError(f"{run_dir}/metrics.json has no meta-stage margins (margin/<factor>/<class>): "
                         "run the meta stage first")
    return margins


def example_faces(data_dir: str) -> dict[str, dict[int, object]]:
    """The first face of each class of each factor in a dataset folder (uint8 arrays)."""
    import tensorflow as tf

    from mvcom_tf.data import schema
    from mvcom_tf.data.tfrecord import iterate_records

    wanted = {factor: set(range(schema.NUM_CLASSES[factor])) for factor in schema.FACTORS}
    faces: dict[str, dict[int, object]] = {factor: {} for factor in schema.FACTORS}
    for record in iterate_records(data_dir):
        for factor, label in record.labels().items():
            if label in wanted[factor]:
                wanted[factor].discard(label)
                faces[factor][label] = tf.io.decode_image(record.image, channels=3).numpy()
        if not any(wanted.values()):
            break
    return faces


def margins_figure(margins: dict[str, dict[int, float]], faces: dict[str, dict[int, object]]):
    """A grid: rows are factors, columns classes; each face titled `<class> r=<mean residual>`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from mvcom_tf.data import schema

    columns = max(schema.NUM_CLASSES.values())
    figure, axes = pyplot.subplots(len(schema.FACTORS), columns, figsize=(1.5 * columns, 1.9 * len(schema.FACTORS)))
    for row, factor in enumerate(schema.FACTORS):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_axis_off()
            if column >= schema.NUM_CLASSES[factor]:
                continue
            if column in faces.get(factor, {}):
                axis.imshow(faces[factor][column])
            value = margins.get(factor, {}).get(column)
            label = "n/a" if value is None else f"{value:+.4f}"
            axis.set_title(f"{schema.CLASS_NAMES[factor][column]}\nr={label}", fontsize=7)
    figure.suptitle("mean learned residual per class (seed Fig. 6)", fontsize=9)
    figure.tight_layout()
    return figure


def main(argv) -> int:
    del argv
    import tensorflow as tf

    from mvcom_tf.data.figures import to_rgb
    from mvcom_tf.data.tfrecord import DatasetError

    options = flags.FLAGS
    data_dir = options.data_dir
    try:
        margins = class_margins(options.run_dir)
        if not data_dir:
            with tf.io.gfile.GFile(posixpath.join(options.run_dir, "flags.txt")) as f:
                data_dir = next(line.split("=", 1)[1].strip() for line in f if line.startswith("--meta_data="))
        faces = example_faces(data_dir)
    except (DatasetError, ValueError, StopIteration, tf.errors.NotFoundError) as error:
        print(f"error: {error or 'flags.txt names no --meta_data; give --data_dir'}", file=sys.stderr)
        return 2
    out = options.out or posixpath.join(options.run_dir, "margins.png")
    with tf.io.gfile.GFile(out, "wb") as f:
        f.write(tf.io.encode_png(to_rgb(margins_figure(margins, faces))).numpy())
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    flags.DEFINE_string("run_dir", None, "Run folder of a meta stage (metrics.json, flags.txt).", required=True)
    flags.DEFINE_string("data_dir", "", "Dataset folder to take faces from; default: the run's --meta_data.")
    flags.DEFINE_string("out", "", "PNG to write; default <run_dir>/margins.png.")
    app.run(main)
