"""Score a model on verification benchmarks: a SavedModel (or a run folder's export), an ONNX model
(insightface's model zoo, or this project's --export_onnx) or an arcface_torch checkpoint.

    python -m mvcom_tf.evaluate --model=runs/demo --benchmark=synthetic:data/synthetic/test \
        --benchmark=bin:faces_emore/lfw.bin --benchmark=rfw:RFW --benchmark=ijb:IJB_release/IJBC
    python -m mvcom_tf.evaluate --model=w600k_r50.onnx --benchmark=rfw:RFW

Writes `results.json` (one entry per benchmark, keyed `<kind>:<file or folder name>`) and one ROC
PNG per benchmark to --output_dir (default `<model>/eval`, or `<file>_eval` for a model file), and
prints a Markdown table.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags

from mvcom_tf.evaluation.benchmark_spec import KINDS, benchmark_key, parse_benchmark

flags.DEFINE_string("model", None, "SavedModel folder, a run folder (its export/ is used), an ONNX model (.onnx, "
                    "run with ONNX Runtime) or an arcface_torch checkpoint (.pt/.pth, imported on the fly).",
                    required=True)
flags.DEFINE_float("input_mean", 127.5, "ONNX models with a float input: (x - mean) / std (insightface's default).")
flags.DEFINE_float("input_std", 127.5, "ONNX models with a float input: (x - mean) / std (insightface's default).")
flags.DEFINE_bool("input_bgr", False, "ONNX models with a float input: feed BGR instead of RGB.")
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


def load_embedder(model: str, image_size: int = 0, onnx_input: OnnxInput | None = None):
    """(embed function on uint8 images [B, H, W, 3] -> L2-normalised embeddings, image size) of --model."""
    if model.endswith(".onnx"):
        return onnx_embedder(model, image_size, onnx_input or OnnxInput())
    if model.endswith((".pt", ".pth")):
        from mvcom_tf.export import embedding_fn
        from mvcom_tf.models.arcface_torch import load_model_file

        backbone, architecture = load_model_file(model)
        return embedding_fn(backbone), image_size or architecture.image_size
    return saved_model_embedder(model, image_size)


def saved_model_embedder(model: str, image_size: int = 0):
    """The embed function of a SavedModel exported by mvcom_tf (or any with the same `serving_default`:
    `images` uint8 [None, H, W, 3] -> `embedding`), and its image size."""
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


@dataclasses.dataclass(frozen=True)
class OnnxInput:
    """How to feed an ONNX model with a float input (insightface's model zoo: (x - 127.5) / 127.5, RGB)."""

    mean: float = 127.5
    std: float = 127.5
    bgr: bool = False


def onnx_embedder(path: str, image_size: int, feed: OnnxInput):
    """An ONNX model's embed function, run by ONNX Runtime; input name, layout (NCHW or NHWC) and size are
    read from the graph. A uint8 input (this project's export) gets the images as they are."""
    import numpy as np
    import onnxruntime
    import tensorflow as tf

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    source = session.get_inputs()[0]
    shape = source.shape
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise ValueError(f"{path}: input {source.name} has shape {shape}, not an image batch (NCHW or NHWC, 3 channels)")
    channels_first = shape[1] == 3
    size = image_size or (shape[2] if channels_first else shape[1])
    if not isinstance(size, int):
        raise ValueError(f"{path}: the input has no fixed size ({shape}); give --image_size")
    raw = source.type == "tensor(uint8)"
    output = session.get_outputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        batch = images
        if not raw:
            batch = images.astype(np.float32)[..., ::-1] if feed.bgr else images.astype(np.float32)
            batch = (batch - feed.mean) / feed.std
        if channels_first:
            batch = batch.transpose(0, 3, 1, 2)
        features = session.run([output], {source.name: np.ascontiguousarray(batch)})[0].astype(np.float32)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    def embed(images):
        return tf.numpy_function(run, [tf.cast(images, tf.uint8)], tf.float32, stateful=False)

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


def evaluate(model: str, benchmarks: list[str], output_dir: str, batch_size: int = 256, image_size: int = 0,
             onnx_input: OnnxInput | None = None) -> dict:
    """Scores every benchmark; writes results.json and ROC PNGs to output_dir; returns the results."""
    import tensorflow as tf

    from mvcom_tf.data.figures import to_rgb
    from mvcom_tf.data.tfrecord import write_json
    from mvcom_tf.evaluation.protocols import run_benchmark

    embed, size = load_embedder(model, image_size, onnx_input)
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

    if FLAGS.model.endswith((".onnx", ".pt", ".pth")):
        default_output = posixpath.splitext(FLAGS.model)[0] + "_eval"
    else:
        default_output = posixpath.join(FLAGS.model, "eval")
    output_dir = FLAGS.output_dir or default_output
    try:
        results = evaluate(FLAGS.model, FLAGS.benchmark, output_dir, FLAGS.batch_size, FLAGS.image_size,
                           OnnxInput(FLAGS.input_mean, FLAGS.input_std, FLAGS.input_bgr))
    except (DatasetError, FileNotFoundError, ValueError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"\nresults: {posixpath.join(output_dir, 'results.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    app.run(main)
