"""Embed photographs: detect the face, align it, embed it (with its mirror image, as evaluate does).

    python -m mvcom_tf.embed --model=runs/demo --images=photos/ --output=embeddings.npz
    python -m mvcom_tf.embed --model=runs/demo --compare a.jpg b.jpg

--images is a folder (searched recursively), a glob, or a text file with one path per line. The
.npz holds `paths`, `embeddings` [N, E] (L2-normalised), `boxes` [N, 4] (x, y, w, h), `landmarks`
[N, 5, 2], `confidences` [N], and `no_face` and `unreadable` (the images left out, never silently).
--compare prints the cosine of two photos and same/different at --threshold, or at the threshold
of the model's own evaluation when it has one (`<model>/eval/results.json` from mvcom_tf.evaluate,
or a run folder's `metrics.json` from training's --eval_data).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from mvcom_tf.cli import define_align_flags, define_command_flags, placement_from_flags

FLAGS = flags.FLAGS


def define_flags(values: flags.FlagValues = FLAGS) -> None:
    """The command's flags (defined by run_main, not at import)."""
    flags.DEFINE_string("model", None, "SavedModel, run folder, .onnx or arcface_torch .pt (as in "
                        "mvcom_tf.evaluate).", required=True, flag_values=values)
    flags.DEFINE_string("images", "", "A folder (recursive), a glob, or a text file listing image paths.",
                        flag_values=values)
    flags.DEFINE_string("output", "embeddings.npz", "Where --images' embeddings go.", flag_values=values)
    flags.DEFINE_bool("compare", False, "Compare the two image paths given as arguments.", flag_values=values)
    flags.DEFINE_float("threshold", None, "Cosine at or above which two faces are the same person; default: the "
                       "model's evaluation threshold (<model>/eval/results.json, or a run folder's metrics.json).",
                       flag_values=values)
    flags.DEFINE_float("min_confidence", 0.9, "The lowest detection confidence kept.", lower_bound=0.0,
                       upper_bound=1.0, flag_values=values)
    flags.DEFINE_integer("min_face_size", 20, "The smallest face side in pixels kept.", lower_bound=1,
                         flag_values=values)
    flags.DEFINE_integer("batch_size", 64, "Faces embedded at once.", lower_bound=1, flag_values=values)
    define_align_flags(values)


def main(argv: list[str]) -> int:
    """Embeds --images into --output, or with --compare prints whether two photos show the same person."""
    # TensorFlow loads here, after run_main has quietened its C++ start-up logging.
    from mvcom_tf.data.images import ImageProblem
    from mvcom_tf.evaluation.photos import FaceEmbedder, embed_folder, image_paths, model_threshold

    embedder = FaceEmbedder(FLAGS.model, FLAGS.min_confidence, FLAGS.min_face_size, FLAGS.batch_size,
                            placement_from_flags(FLAGS))
    if FLAGS.compare:
        if len(argv) != 3:
            raise app.UsageError("--compare takes two image paths")
        threshold = FLAGS.threshold if FLAGS.threshold is not None else model_threshold(FLAGS.model)
        if threshold is None:
            raise app.UsageError(f"{FLAGS.model} has no evaluation threshold (neither eval/results.json nor "
                                 "metrics.json with a benchmark): give --threshold")
        faces = []
        for path in argv[1:]:
            try:
                face, _ = embedder.face(path)
            except ImageProblem as problem:
                print(f"error: {path}: {problem.detail}", file=sys.stderr)
                return 2
            if face is None:
                print(f"error: {path}: no face found", file=sys.stderr)
                return 2
            faces.append(face)
        first, second = embedder.embeddings(faces)
        cosine = float(first @ second)
        print(f"cosine {cosine:.4f}: {'same person' if cosine >= threshold else 'different people'} "
              f"(threshold {threshold:.4f})")
        return 0
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    paths = image_paths(FLAGS.images)
    if not paths:
        raise app.UsageError(f"--images={FLAGS.images!r} names no images")
    counts = embed_folder(embedder, paths, FLAGS.output)
    print(f"{counts['embedded']} faces embedded into {FLAGS.output}; {counts['no_face']} images without a face, "
          f"{counts['unreadable']} unreadable (listed in the file)")
    return 0


def run_main() -> None:
    """The console script (and `python -m`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up notices hide the progress line
    define_command_flags(define_flags, __doc__)
    app.run(main)


if __name__ == "__main__":
    run_main()
