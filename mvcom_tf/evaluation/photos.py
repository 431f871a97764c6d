"""Photographs to embeddings: detect the main face, align it, embed it with its mirror image (as evaluate does).

The library behind `python -m mvcom_tf.embed`: the images a folder, glob or list file names, a
FaceEmbedder around any model `evaluate` takes, the .npz writer, and a model's own threshold.
"""

from __future__ import annotations

import io
import json
import posixpath
import sys
import time

import numpy as np
import tensorflow as tf

from mvcom_tf.data import alignment
from mvcom_tf.data.detection import FaceDetector, choose
from mvcom_tf.data.images import IMAGE_EXTENSIONS, ImageProblem, decode_rgb
from mvcom_tf.evaluation.embedders import load_embedder
from mvcom_tf.evaluation.verification import embed_images


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
