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

import os
import posixpath
import sys

from absl import app, flags

from mvcom_tf.cli import define_align_flags, define_command_flags, placement_from_flags
from mvcom_tf.evaluation.benchmark_spec import KINDS, parse_benchmark

FLAGS = flags.FLAGS


def define_flags(values: flags.FlagValues = FLAGS) -> None:
    """The command's flags and their validator (defined by run_main, not at import)."""
    flags.DEFINE_string("model", None, "SavedModel folder, a run folder (its export/ is used), an ONNX model (.onnx, "
                        "run with ONNX Runtime) or an arcface_torch checkpoint (.pt/.pth, imported on the fly).",
                        required=True, flag_values=values)
    flags.DEFINE_float("input_mean", 127.5, "ONNX models with a float input: (x - mean) / std (insightface's "
                       "default).", flag_values=values)
    flags.DEFINE_float("input_std", 127.5, "ONNX models with a float input: (x - mean) / std (insightface's "
                       "default).", flag_values=values)
    flags.DEFINE_bool("input_bgr", False, "ONNX models with a float input: feed BGR instead of RGB.",
                      flag_values=values)
    flags.DEFINE_multi_string("benchmark", [], f"<kind>:<path>, repeatable; kinds: {', '.join(KINDS)}.",
                              flag_values=values)
    flags.DEFINE_string("output_dir", "", "Where results.json and the ROC curves go; default <model>/eval.",
                        flag_values=values)
    flags.DEFINE_integer("batch_size", 256, "Images per batch.", lower_bound=1, flag_values=values)
    flags.DEFINE_integer("image_size", 0, "Input size; 0: the SavedModel's own (its signature's height).",
                         lower_bound=0, flag_values=values)
    define_align_flags(values)
    flags.register_validator("benchmark", _check_benchmarks, "give at least one --benchmark=<kind>:<path> "
                             f"with a kind among {', '.join(KINDS)}", flag_values=values)


def _check_benchmarks(values: list[str]) -> bool:
    for value in values:
        try:
            parse_benchmark(value)
        except ValueError as error:
            raise flags.ValidationError(str(error)) from None
    return bool(values)


def main(argv: list[str]) -> int:
    """Scores --model on every --benchmark; writes results.json and the ROC curves."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from mvcom_tf.data.tfrecord import DatasetError
    from mvcom_tf.evaluation.embedders import OnnxInput
    from mvcom_tf.evaluation.run import evaluate, markdown_table

    if FLAGS.model.endswith((".onnx", ".pt", ".pth")):
        default_output = posixpath.splitext(FLAGS.model)[0] + "_eval"
    else:
        default_output = posixpath.join(FLAGS.model, "eval")
    output_dir = FLAGS.output_dir or default_output
    try:
        results = evaluate(FLAGS.model, FLAGS.benchmark, output_dir, FLAGS.batch_size, FLAGS.image_size,
                           OnnxInput(FLAGS.input_mean, FLAGS.input_std, FLAGS.input_bgr), placement_from_flags(FLAGS))
    except (DatasetError, FileNotFoundError, ValueError) as error:  # CheckpointError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print(f"\nresults: {posixpath.join(output_dir, 'results.json')}", file=sys.stderr)
    return 0


def run_main() -> None:
    """The console script (and `python -m`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads (in main)
    define_command_flags(define_flags, __doc__)
    app.run(main)


if __name__ == "__main__":
    run_main()
