"""Face detection with 5 landmarks (MTCNN, the `mtcnn` package: TensorFlow, weights in its wheel).

`FaceDetector.detect` returns every face of an RGB image with its box, confidence and landmarks in
the ArcFace reference order (image-left eye, image-right eye, nose, image-left and image-right
mouth corners), in the image's own pixel coordinates; large images are scaled down for the
detector and the results mapped back. `choose` keeps one face per image by insightface's rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# Photos handed to detect_many at once: batching pays off by 8 (MTCNN's per-call cost dominates small
# photos), and 16 decoded photos of a few megapixels stay well under a gigabyte.
DETECT_BATCH = 16


@dataclasses.dataclass(frozen=True)
class Face:
    """One detection: box (x, y, width, height), confidence, and landmarks [5, 2] (x, y)."""

    box: tuple[float, float, float, float]
    confidence: float
    landmarks: np.ndarray


class FaceDetector:
    """MTCNN with a confidence floor, a minimum face size and a cap on the side of the image it sees."""

    def __init__(self, min_confidence: float = 0.9, min_face_size: int = 20, max_side: int = 1024) -> None:
        self.min_confidence, self.min_face_size, self.max_side = min_confidence, min_face_size, max_side
        self._mtcnn = None  # built on first use: a converter's worker process builds its own

    def detect(self, image: np.ndarray) -> list[Face]:
        """Every face in an RGB uint8 image [H, W, 3] at or above the confidence floor and size."""
        return self.detect_many([image])[0]

    def detect_many(self, images: list[np.ndarray]) -> list[list[Face]]:
        """`detect` for several images: those of one shape (after scaling) go through MTCNN as one batch,
        about 3x faster than one by one for 250 px photos (MTCNN's per-call cost dominates small images)."""
        if self._mtcnn is None:
            from mtcnn import MTCNN

            self._mtcnn = MTCNN()
        scaled, scales = zip(*(self._scaled(image) for image in images)) if images else ((), ())
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(scaled):
            by_shape.setdefault(image.shape, []).append(index)
        found: list[list[Face]] = [[] for _ in images]
        for indices in by_shape.values():
            results = self._mtcnn.detect_faces([scaled[i] for i in indices])  # a list in, a list per image out
            for index, detections in zip(indices, results):
                found[index] = self._faces(detections, scales[index])
        return found

    def _scaled(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """The image the detector sees (at most max_side on a side, RGB, contiguous) and its scale."""
        import tensorflow as tf

        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        if scale < 1.0:
            size = [max(1, round(height * scale)), max(1, round(width * scale))]
            image = tf.cast(tf.round(tf.image.resize(image, size, antialias=True)), tf.uint8).numpy()
        return np.ascontiguousarray(image[..., :3]), scale

    def _faces(self, detections: list[dict], scale: float) -> list[Face]:
        """MTCNN's detections mapped back to the original image, filtered by confidence and size."""
        faces = []
        for found in detections:
            x, y, w, h = (float(v) / scale for v in found["box"])
            if found["confidence"] < self.min_confidence or min(w, h) < self.min_face_size:
                continue
            points = np.array([found["keypoints"][name] for name in _KEYPOINTS], np.float64) / scale
            faces.append(Face((x, y, w, h), float(found["confidence"]), points))
        return faces


def choose(faces: list[Face], image_shape: tuple[int, ...]) -> Face | None:
    """The face a one-person photo is about: the largest box, less twice the squared distance of its centre
    from the image centre (insightface's rule in RetinaFace's `detect(max_num=1)`); None if there is none."""
    if not faces:
        return None
    centre = np.array([image_shape[1], image_shape[0]], np.float64) / 2.0

    def value(face: Face) -> float:
        x, y, w, h = face.box
        offset = np.array([x + w / 2.0, y + h / 2.0]) - centre
        return w * h - 2.0 * float(offset @ offset)

    return max(faces, key=value)


def main_faces(detector: FaceDetector, images: list[np.ndarray]) -> list[Face | None]:
    """Each one-person photo's face (`choose`), the photos detected in batches (`detect_many`)."""
    return [choose(faces, image.shape) for faces, image in zip(detector.detect_many(images), images)]
