"""Photographs to embeddings: detect the main face, align it, embed it with its mirror image (as evaluate does).

The library behind `python -m mvcom_tf.embed`: the images a folder, glob or list file names, a
FaceEmbedder around any model `evaluate` takes, the .npz writer, and a model's own threshold.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from mvcom_tf.data import alignment
from mvcom_tf.data.detection import DETECT_BATCH, Face, FaceDetector, main_faces
from mvcom_tf.data.images import IMAGE_EXTENSIONS, ImageProblem, read_rgb
from mvcom_tf.evaluation.embedders import load_embedder
from mvcom_tf.evaluation.verification import embed_images
from mvcom_tf.progress_line import ProgressLine


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


class Photo(NamedTuple):
    """One photograph's outcome: its aligned main face and the detection, or no face (None), or why it cannot be read."""

    path: str
    face: np.ndarray | None = None
    found: Face | None = None
    problem: Exception | None = None


class FaceEmbedder:
    """Photograph -> detected, aligned face -> flip-fused, L2-normalised embedding."""

    def __init__(self, model: str, min_confidence: float, min_face_size: int, batch_size: int = 64,
                 placement: alignment.Placement = alignment.Placement()) -> None:
        embed, self.image_size = load_embedder(model)
        self.embed = tf.function(embed, reduce_retracing=True)
        self.detector = FaceDetector(min_confidence, min_face_size)
        self.batch_size, self.placement = batch_size, placement

    def face(self, path: str) -> tuple[np.ndarray | None, Face | None]:
        """(aligned uint8 face, Face) of the photo's main face, or (None, None); raises what made it unreadable."""
        photo = self.faces([path])[0]
        if photo.problem is not None:
            raise photo.problem
        return photo.face, photo.found

    def faces(self, paths: list[str]) -> list[Photo]:
        """Each photo's main face, placed by --align, the photos detected in one batch; a photo that cannot be read
        says why."""
        photos, images, size, placement = [Photo(path) for path in paths], {}, self.image_size, self.placement
        for index, path in enumerate(paths):
            try:
                images[index] = read_rgb(path)
            except (ImageProblem, OSError, tf.errors.NotFoundError) as problem:
                photos[index] = Photo(path, problem=problem)
        # A photo already cropped as --align expects (as evaluate's pairs kind takes it) is used whole: its
        # "detection" is the whole image, with the reference landmarks of an aligned crop.
        whole = {index: image for index, image in images.items() if placement.as_is(image, size)}
        for index, image in whole.items():
            height, width = image.shape[:2]
            reference = alignment.ARCFACE_REFERENCE * np.array([width, height]) / alignment.ALIGNED_SIZE
            found = Face((0.0, 0.0, float(width), float(height)), 1.0, reference)
            transform = alignment.face_transform("none", size, image.shape)
            photos[index] = Photo(paths[index], alignment.warp_uint8(image, transform, size).numpy(), found)
        pending = {index: image for index, image in images.items() if index not in whole}
        for (index, image), found in zip(pending.items(), main_faces(self.detector, list(pending.values()))):
            if found is not None:
                transform = placement.transform(size, image.shape, found.landmarks, found.box)
                photos[index] = Photo(paths[index], alignment.warp_uint8(image, transform, size).numpy(), found)
        return photos

    def embeddings(self, faces):
        """Flip-fused embeddings [N, E] of aligned faces."""
        return embed_images(self.embed, tf.data.Dataset.from_tensor_slices(np.stack(faces)).batch(self.batch_size),
                            len(faces))


def embed_folder(embedder: FaceEmbedder, paths: list[str], output: str) -> dict:
    """Embeds every photo of `paths` into `output` (.npz); returns counts."""
    kept, faces, boxes, landmarks, confidences, no_face, unreadable = [], [], [], [], [], [], []
    progress = ProgressLine("detect", len(paths), "photos")
    for first in range(0, len(paths), DETECT_BATCH):
        for photo in embedder.faces(paths[first:first + DETECT_BATCH]):
            if photo.problem is not None:
                unreadable.append(f"{photo.path}: {photo.problem}")
            elif photo.found is None:
                no_face.append(photo.path)
            else:
                kept.append(photo.path)
                faces.append(photo.face)
                boxes.append(photo.found.box)
                landmarks.append(photo.found.landmarks)
                confidences.append(photo.found.confidence)
        progress.advance(min(DETECT_BATCH, len(paths) - first))
    embeddings = embedder.embeddings(faces) if faces else np.zeros((0, 0), np.float32)
    buffer = io.BytesIO()  # written whole through tf.io.gfile, so --output may be on gs://
    np.savez(buffer, paths=np.array(kept), embeddings=embeddings.astype(np.float32),
             boxes=np.array(boxes, np.float32).reshape(-1, 4),
             landmarks=np.array(landmarks, np.float32).reshape(-1, 5, 2),
             confidences=np.array(confidences, np.float32), no_face=np.array(no_face), unreadable=np.array(unreadable),
             align=np.array(json.dumps(embedder.placement.describe())))
    with tf.io.gfile.GFile(output, "wb") as f:
        f.write(buffer.getvalue())
    return {"embedded": len(kept), "no_face": len(no_face), "unreadable": len(unreadable)}


def model_threshold(model: str) -> float | None:
    """The cosine threshold of the model's own evaluation, if it has one: `mvcom_tf.evaluate`'s
    (<model>/eval/results.json), else the one a training run made after its last stage
    (<model>/metrics.json); the first benchmark that gives a threshold."""
    for path, benchmarks in ((posixpath.join(model, "eval", "results.json"), lambda data: data),
                             (posixpath.join(model, "metrics.json"), lambda data: data.get("benchmarks", {}))):
        if not tf.io.gfile.exists(path):
            continue
        with tf.io.gfile.GFile(path) as f:
            for result in benchmarks(json.load(f)).values():
                for key in ("global_threshold", "threshold"):
                    if key in result:
                        return float(result[key])
    return None
