"""Score a SavedModel (or a run folder's export) on verification benchmarks.

    python -m mvcom_tf.evaluate --model=runs/demo --benchmark=synthetic:data/synthetic/test \
        --benchmark=bin:faces_emore/lfw.bin --benchmark=rfw:RFW --benchmark=ijb:IJB_release/IJBC

Writes `results.json` (one entry per benchmark, keyed `<kind>:<file or folder name>`) and one ROC
PNG per benchmark to --output_dir (default `<model>/eval`), and prints a Markdown table.
"""

from __future__ import annotations

import os
import posixpath
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags

from mvcom_tf.evaluation.benchmark_spec import KINDS, benchmark_key, parse_benchmark

flags.DEFINE_string("model", None, "SavedModel folder, or a run folder (its export/ is used).", required=True)
flags.DEFINE_multi_string("benchmark", [], f"<kind>:<path>, repeatable; kinds: {', '.join(KINDS)}.")
flags.DEFINE_string("output_dir", "", "Where results.json and the ROC curves go; default <model>/eval.")
flags.DEFINE_integer("batch_size", 256, "Images per batch.", lower_bound=1)
flags.DEFINE_integer("image_size", 0, "Input size; 0: the SavedModel's own (its signature's height).", lower_bound=0)
FLAGS = flags.FLAGS


def _check_benchmarks(values: list[str]) -> bool:
    for value in values:
        try:
            parse_benchmark(value)
        except ValueError as error:
            raise flags.ValidationError(str(error)) from None
    return bool(values)


flags.register_validator("benchmark", _check_benchmarks, "give at least one --benchmark=<kind>:<path> "
                         f"with a kind among {', '.join(KINDS)}")


def saved_model_dir(model: str) -> str:
    """The SavedModel folder of --model: itself, or `<run folder>/export`."""
    import tensorflow as tf

    for candidate in (model, posixpath.join(model, "export")):
        if tf.io.gfile.exists(posixpath.join(candidate, "saved_model.pb")):
            return candidate
    raise FileNotFoundError(f"--model={model}: neither it nor {model}/export holds a saved_model.pb")


def load_embedder(model: str, image_size: int = 0):
    """(embed function on uint8 images, image size) of a SavedModel exported by mvcom_tf (or any with the
    same `serving_default`: `images` uint8 [None, H, W, 3] -> `embedding`)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir(model))
    signature = loaded.signatures["serving_default"]
    spec = signature.structured_input_signature[1]["images"]
    size = image_size or spec.shape[1]
    if not size:
        raise ValueError(f"{model}: the SavedModel's input has no fixed size; give --image_size")

    def embed(images):
        # `loaded` is referenced here so that its variables live as long as the function.
        return loaded.signatures["serving_default"](images=images)["embedding"]

    return embed, int(size)


def roc_figure(curves: dict, title: str):
    """TAR against FAR (log scale) of each curve."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(5, 4))
    for label, (far, tar) in curves.items():
        keep = far > 0
        axis.plot(far[keep], tar[keep], label=label)
    axis.set_xscale("log")
    axis.set_xlabel("false accept rate")
    axis.set_ylabel("true accept rate")
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def markdown_table(results: dict) -> str:
    """One row per benchmark: accuracy, TAR at FAR 1e-4, and the bias figures where there are groups."""
    lines = ["| benchmark | accuracy | TAR@FAR=1e-4 | groups: worst (accuracy), skewed error ratio |",
             "|---|---|---|---|"]
    for key, result in results.items():
        accuracy = f"{result['accuracy']:.4f}" if "accuracy" in result else "-"
        tar = result.get("tar_at_far", {}).get("1e-04")
        groups = []
        if "races" in result:
            groups.append(f"race: SER {result['skewed_error_ratio']:.2f}, std {result['std']:.4f}")
        for factor, summary in result.get("factors", {}).items():
            groups.append(f"{factor}: {summary['worst_group']} ({summary['worst_accuracy']:.3f}), "
                          f"SER {summary['skewed_error_ratio']:.2f}")
        lines.append(f"| {key} | {accuracy} | {'-' if tar is None else f'{tar:.4f}'} | {'; '.join(groups) or '-'} |")
    return "\n".join(lines)


def evaluate(model: str, benchmarks: list[str], output_dir: str, batch_size: int = 256, image_size: int = 0) -> dict:
    """Scores every benchmark; writes results.json and ROC PNGs to output_dir; returns the results."""
    import tensorflow as tf

    from mvcom_tf.data.figures import to_rgb
    from mvcom_tf.data.tfrecord import write_json
    from mvcom_tf.evaluation.protocols import run_benchmark

    embed, size = load_embedder(model, image_size)
    embed = tf.function(embed, reduce_retracing=True)
    tf.io.gfile.makedirs(output_dir)
    results = {}
    for spec in benchmarks:
        kind, path = parse_benchmark(spec)
        key = benchmark_key(kind, path)
        scored = run_benchmark(kind, path, embed, size, batch_size)
        results[key] = scored.result
        picture = to_rgb(roc_figure(scored.curves, key))
        with tf.io.gfile.GFile(posixpath.join(output_dir, f"roc_{key.replace(':', '_')}.png"), "wb") as f:
            f.write(tf.io.encode_png(picture).numpy())
    write_json(posixpath.join(output_dir, "results.json"), results)
    return results


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from mvcom_tf.data.tfrecord import DatasetError

    output_dir = FLAGS.output_dir or posixpath.join(FLAGS.model, "eval")
    try:
        results = evaluate(FLAGS.model, FLAGS.benchmark, output_dir, FLAGS.batch_size, FLAGS.image_size)
    except (DatasetError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"\nresults: {posixpath.join(output_dir, 'results.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
