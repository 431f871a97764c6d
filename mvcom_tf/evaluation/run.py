"""Scores a model on verification benchmarks and writes results.json, ROC curves and a Markdown table."""

from __future__ import annotations

import posixpath

from mvcom_tf.data.alignment import Placement
from mvcom_tf.evaluation.benchmark_spec import benchmark_key, parse_benchmark
from mvcom_tf.evaluation.embedders import OnnxInput, load_embedder


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
             onnx_input: OnnxInput | None = None, placement: Placement = Placement()) -> dict:
    """Scores every benchmark (`placement`: --align of the photo kinds); writes results.json and ROC PNGs to
    output_dir; returns the results."""
    import tensorflow as tf

    from mvcom_tf.data.figures import to_rgb
    from mvcom_tf.files import write_json
    from mvcom_tf.evaluation.protocols import run_benchmark

    embed, size = load_embedder(model, image_size, onnx_input)
    embed = tf.function(embed, reduce_retracing=True)
    tf.io.gfile.makedirs(output_dir)
    results = {}
    for spec in benchmarks:
        kind, path = parse_benchmark(spec)
        key = benchmark_key(kind, path)
        scored = run_benchmark(kind, path, embed, size, batch_size, placement)
        results[key] = scored.result
        picture = to_rgb(roc_figure(scored.curves, key))
        with tf.io.gfile.GFile(posixpath.join(output_dir, f"roc_{key.replace(':', '_')}.png"), "wb") as f:
            f.write(tf.io.encode_png(picture).numpy())
    write_json(posixpath.join(output_dir, "results.json"), results)
    return results
