"""Embed photographs: detect the face, align it, embed it (with its mirror image, as evaluate does).

    python -m mvcom_tf.embed --model=runs/demo --images=photos/ --output=embeddings.npz
    python -m mvcom_tf.embed --model=runs/demo --compare a.jpg b.jpg

--images is a folder (searched recursively), a glob, or a text file with one path per line. The
.npz holds `paths`, `embeddings` [N, E] (L2-normalised), `boxes` [N, 4] (x, y, w, h), `landmarks`
[N, 5, 2], `confidences` [N], and `no_face` and `unreadable` (the images left out, never silently).
--compare prints the cosine of two photos and same/different at --threshold, or at the threshold
of the model's own evaluation (`<model>/eval/results.json`) when it has one.
"""

from __future__ import annotations

import io
import json
import posixpath
import sys
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from mvcom_tf.data import alignment
from mvcom_tf.data.detection import FaceDetector, choose
from mvcom_tf.data.images import IMAGE_EXTENSIONS, ImageProblem, decode_rgb
from mvcom_tf.evaluation.embedders import load_embedder
from mvcom_tf.evaluation.verification import embed_images

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
                       "model's evaluation threshold (<model>/eval/results.json).", flag_values=values)
    flags.DEFINE_float("min_confidence", 0.9, "The lowest detection confidence kept.", lower_bound=0.0,
                       upper_bound=1.0, flag_values=values)
    flags.DEFINE_integer("min_face_size", 20, "The smallest face side in pixels kept.", lower_bound=1,
                         flag_values=values)
    flags.DEFINE_integer("batch_size", 64, "Faces embedded at once.", lower_bound=1, flag_values=values)


def image_paths(spec: str) -> list[str]:
    """The images named by --images: a folder (recursive), a glob, or a list file (any tf.io.gfile path)."""
    if tf.io.gfile.isdir(spec):
        found = [posixpath.join(folder, name) for folder, _, names in tf.io.gfile.walk(spec) for name in names]
        return sorted(path for path in found if path.lower().endswith(IMAGE_EXTENSIONS))
    if not spec.lower().endswith(IMAGE_EXTENSIONS) and tf.io.gfile.exists(spec):
        with tf.io.gfile.GFile(spec) as f:
            base = posixpath.dirname(spec)
            return [line.strip() if posixpath.isabs(line.strip()) or "://" in line else
                    posixpath.join(base, line.strip()) for line in f if line.strip()]
    return sorted(tf.io.gfile.glob(spec))


class FaceEmbedder:
    """Photograph -> detected, aligned face -> flip-fused, L2-normalised embedding."""

    def __init__(self, model: str, min_confidence: float, min_face_size: int, batch_size: int = 64) -> None:
        embed, self.image_size = load_embedder(model)
        self.embed = tf.function(embed, reduce_retracing=True)
        self.detector = FaceDetector(min_confidence, min_face_size)
        self.batch_size = batch_size

    def face(self, path: str):
        """(aligned uint8 face, Face) of the photo's main face; raises ImageProblem, or returns (None, None)."""
        with tf.io.gfile.GFile(path, "rb") as f:
            image = decode_rgb(f.read())
        found = choose(self.detector.detect(image), image.shape)
        if found is None:
            return None, None
        return alignment.align_face(image, found.landmarks, self.image_size).numpy(), found

    def embeddings(self, faces):
        """Flip-fused embeddings [N, E] of aligned faces."""
        return embed_images(self.embed, tf.data.Dataset.from_tensor_slices(np.stack(faces)).batch(self.batch_size))


def embed_folder(embedder: FaceEmbedder, paths: list[str], output: str) -> dict:
    """Embeds every photo of `paths` into `output` (.npz); returns counts."""
    kept, faces, boxes, landmarks, confidences, no_face, unreadable = [], [], [], [], [], [], []
    start = time.perf_counter()
    for index, path in enumerate(paths, 1):
        try:
            face, found = embedder.face(path)
        except (ImageProblem, OSError) as problem:
            unreadable.append(f"{path}: {problem}")
        else:
            if found is None:
                no_face.append(path)
            else:
                kept.append(path)
                faces.append(face)
                boxes.append(found.box)
                landmarks.append(found.landmarks)
                confidences.append(found.confidence)
        rate = index / max(time.perf_counter() - start, 1e-9)
        print(f"\r{index}/{len(paths)} images, {rate:.1f} images/s, ETA {(len(paths) - index) / rate:.0f} s",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    embeddings = embedder.embeddings(faces) if faces else np.zeros((0, 0), np.float32)
    buffer = io.BytesIO()  # written whole through tf.io.gfile, so --output may be on gs://
    np.savez(buffer, paths=np.array(kept), embeddings=embeddings.astype(np.float32),
             boxes=np.array(boxes, np.float32).reshape(-1, 4),
             landmarks=np.array(landmarks, np.float32).reshape(-1, 5, 2),
             confidences=np.array(confidences, np.float32), no_face=np.array(no_face), unreadable=np.array(unreadable))
    with tf.io.gfile.GFile(output, "wb") as f:
        f.write(buffer.getvalue())
    return {"embedded": len(kept), "no_face": len(no_face), "unreadable": len(unreadable)}


def model_threshold(model: str) -> float | None:
    """The cosine threshold of the model's own evaluation, if it has one (its first benchmark that gives one)."""
    path = posixpath.join(model, "eval", "results.json")
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        for result in json.load(f).values():
            for key in ("global_threshold", "threshold"):
                if key in result:
                    return float(result[key])
    return None


def main(argv: list[str]) -> int:
    embedder = FaceEmbedder(FLAGS.model, FLAGS.min_confidence, FLAGS.min_face_size, FLAGS.batch_size)
    if FLAGS.compare:
        if len(argv) != 3:
            raise app.UsageError("--compare takes two image paths")
        threshold = FLAGS.threshold if FLAGS.threshold is not None else model_threshold(FLAGS.model)
        if threshold is None:
            raise app.UsageError(f"{FLAGS.model} has no eval/results.json threshold: give --threshold")
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
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run_main()
