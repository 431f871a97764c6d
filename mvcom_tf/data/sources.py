"""Face datasets in their original formats, as sources for the converters (see conversion.py).

- `RecordIOSource`: insightface's `train.rec/train.idx/property` (MS-Celeb-1M and friends);
  the encoded image bytes are copied unchanged.
- `FolderSource`: `root/<identity>/<image>`; with 5-point landmarks each face is aligned to
  112x112 (ArcFace reference), its yaw estimated and binned; otherwise resized. Blur is
  measured on the result. VGGFace2 is a FolderSource with its landmark CSV (`vggface2`).
"""

from __future__ import annotations

import csv
import dataclasses
import posixpath
from typing import Any

import numpy as np
import tensorflow as tf

from mvcom_tf.data import alignment, images, recordio, schema
from mvcom_tf.data.conversion import Item, Loaded, Report, Skip, image_problem, load_each
from mvcom_tf.data.tfrecord import DatasetError

ALIGN_MODES = ("detect", "landmarks", "none")


class RecordIOSource:
    """insightface's MXNet RecordIO package; the identity of an image is its header's label[0]."""

    def __init__(self, rec_dir: str, skip_corrupt: bool = False) -> None:
        self.rec_dir, self.skip_corrupt = rec_dir, skip_corrupt
        self.rec_path, self.idx_path, self.property_path = recordio.rec_paths(rec_dir)
        for path in (self.rec_path, self.idx_path):
            if not tf.io.gfile.exists(path):
                raise DatasetError(f"{path} is missing: --rec_dir must hold train.rec, train.idx and property")
        # Without a property file the size is unknown (0 in dataset.json): the pipeline resizes anyway.
        self.num_classes, self.image_size = 0, 0
        if tf.io.gfile.exists(self.property_path):
            self.num_classes, self.image_size, _ = recordio.read_property(self.property_path)
        self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def reader(self) -> recordio.RecordIOReader:
        if self._reader is None:
            self._reader = recordio.RecordIOReader(self.rec_path, self.idx_path)
        return self._reader

    def items(self, report: Report) -> list[Item]:
        reader = self.reader()
        layout = recordio.read_layout(reader)
        if layout.identity_ranges:
            return [Item(str(key), identity, key) for identity, (start, end) in sorted(layout.identity_ranges.items())
                    for key in range(start, end)]
        items = []
        for key in sorted(reader.index):
            record = self._read(key, report)
            if record is not None:
                items.append(Item(str(key), int(record.label), key))
        return items

    def _read(self, key: int, report: Report | None) -> recordio.Record | None:
        try:
            return self.reader().read(key)
        except recordio.RecordIOError as error:
            if not self.skip_corrupt:
                raise
            if report is None:
                raise Skip("corrupt_record", str(error)) from None
            report.read += 1
            report.skip("corrupt_record", str(error))
            return None

    def load_batch(self, items: list[Item]) -> list[Loaded | Skip]:
        return load_each(self.load, items)

    def load(self, item: Item) -> Loaded:
        """One record's image bytes as stored (already aligned); raises Skip."""
        record = self._read(item.locator, None)
        problem = image_problem(record.image)
        if problem:
            raise Skip("undecodable_image", f"record {item.locator} at byte {record.offset}: {problem}")
        return Loaded(record.image)

    def describe(self) -> dict[str, Any]:
        return {"kind": "recordio", "rec_dir": self.rec_dir, "skip_corrupt": self.skip_corrupt,
                "num_classes_in_property": self.num_classes}


def read_landmarks(path: str, report: Report) -> dict[str, np.ndarray]:
    """Reads a VGGFace2-style `NAME_ID,P1X,P1Y,...,P5X,P5Y` CSV into {NAME_ID: [5, 2]}; bad rows are counted."""
    landmarks = {}
    with tf.io.gfile.GFile(path, "r") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        expected = ["NAME_ID"] + [f"P{i}{axis}" for i in range(1, 6) for axis in "XY"]
        if header is None or [h.strip() for h in header] != expected:
            raise DatasetError(f"{path}: expected the header {','.join(expected)}, got {header}")
        for line, row in enumerate(rows, 2):
            if not row:
                continue
            try:
                if len(row) != 11:
                    raise ValueError(f"{len(row)} fields, expected 11")
                points = np.array([float(value) for value in row[1:]], np.float64).reshape(5, 2)
                if not np.all(np.isfinite(points)):
                    raise ValueError("non-finite coordinate")
            except ValueError as error:
                report.skip("bad_label_row", f"{path} line {line}: {error} in {','.join(row)[:80]!r}")
                continue
            landmarks[row[0].strip()] = points
    return landmarks


_DETECTORS: dict = {}  # one face detector per process and settings (a source is pickled to workers)


@dataclasses.dataclass
class FolderSource:
    """`root/<identity>/<image>` folders of photographs in any format `images.decode_rgb` reads.

    `align`: `landmarks` aligns by the landmark file's row (NAME_ID = `<identity>/<image without
    extension>`) and skips images without one; `detect` uses the row when there is one and
    otherwise the landmarks of the face MTCNN finds (skipping `no_face`); `none` resizes the
    whole image (folders that are already aligned).
    """

    root: str
    landmarks_path: str = ""
    image_size: int = alignment.ALIGNED_SIZE
    align: str = "none"
    blur_thresholds: tuple[float, ...] = alignment.BLUR_THRESHOLDS
    jpeg_quality: int = 95
    min_confidence: float = 0.9
    min_face_size: int = 20

    def __post_init__(self) -> None:
        if self.align not in ALIGN_MODES:
            raise ValueError(f"unknown align mode {self.align!r}; expected one of {ALIGN_MODES}")
        if self.align == "landmarks" and not self.landmarks_path:
            raise DatasetError("align=landmarks needs a landmark file (--landmarks)")

    def _detector(self):
        from mvcom_tf.data.detection import FaceDetector

        key = (self.min_confidence, self.min_face_size)
        if key not in _DETECTORS:
            _DETECTORS[key] = FaceDetector(self.min_confidence, self.min_face_size)
        return _DETECTORS[key]

    def landmarks_of(self, image: np.ndarray, points: np.ndarray | None,
                     faces: list | None) -> tuple[np.ndarray | None, bool]:
        """The landmarks to align by (None: resize) and whether they were detected; raises Skip.
        `faces` are the detector's faces in the image (None when it was not run)."""
        if self.align == "none":
            return None, False
        if points is not None:
            return points, False
        if self.align == "landmarks":
            raise Skip("no_landmarks", "no row in the landmark file")
        from mvcom_tf.data.detection import choose

        face = choose(faces or [], image.shape)
        if face is None:
            raise Skip("no_face", f"no face of confidence >= {self.min_confidence} and >= {self.min_face_size} px "
                                  f"in the {image.shape[1]}x{image.shape[0]} image")
        return face.landmarks, True

    def items(self, report: Report) -> list[Item]:
        if not tf.io.gfile.isdir(self.root):
            raise DatasetError(f"{self.root} is not a folder of <identity>/<image> subfolders")
        landmarks = read_landmarks(self.landmarks_path, report) if self.landmarks_path else {}
        items = []
        for identity in sorted(tf.io.gfile.listdir(self.root)):
            identity = identity.rstrip("/")
            folder = posixpath.join(self.root, identity)
            if not tf.io.gfile.isdir(folder):
                continue
            for name in sorted(tf.io.gfile.listdir(folder)):
                if not name.lower().endswith(images.IMAGE_EXTENSIONS):
                    continue
                source = f"{identity}/{name}"
                points = landmarks.get(posixpath.splitext(source)[0])
                items.append(Item(source, identity, (posixpath.join(folder, name), points)))
        if not items:
            raise DatasetError(f"{self.root} holds no images in <identity>/<image> subfolders "
                               f"(extensions {', '.join(images.IMAGE_EXTENSIONS)})")
        return items

    def load_batch(self, items: list[Item]) -> list[Loaded | Skip]:
        """Decodes the batch, detects faces in the images that need it in one call, aligns and encodes."""
        decoded: list[np.ndarray | Skip] = []
        for path, _ in (item.locator for item in items):
            with tf.io.gfile.GFile(path, "rb") as f:
                data = f.read()
            try:
                decoded.append(images.decode_rgb(data))
            except images.ImageProblem as problem:
                decoded.append(Skip(problem.reason, problem.detail))
        wanted = [i for i, (item, image) in enumerate(zip(items, decoded))
                  if self.align == "detect" and item.locator[1] is None and not isinstance(image, Skip)]
        faces = dict(zip(wanted, self._detector().detect_many([decoded[i] for i in wanted]))) if wanted else {}
        results: list[Loaded | Skip] = []
        for index, (item, image) in enumerate(zip(items, decoded)):
            try:
                if isinstance(image, Skip):
                    raise image
                points, detected = self.landmarks_of(image, item.locator[1], faces.get(index))
                results.append(self._aligned(image, points, detected))
            except Skip as skip:
                results.append(skip)
        return results

    def _aligned(self, image: np.ndarray, points: np.ndarray | None, detected: bool) -> Loaded:
        """The face aligned by `points` (resized when None), encoded, with its yaw, pose and blur labels."""
        labels: dict[str, Any] = {}
        if points is not None:
            face = alignment.align_face(tf.constant(image), points, self.image_size)
            labels["yaw"] = alignment.estimate_yaw(points)
            labels["pose"] = schema.pose_bin(labels["yaw"])
        else:
            face = tf.cast(tf.round(tf.image.resize(image, [self.image_size] * 2, antialias=True)), tf.uint8)
        measured = tf.cast(face, tf.float32)
        if self.image_size != alignment.ALIGNED_SIZE:
            measured = tf.image.resize(measured, [alignment.ALIGNED_SIZE] * 2)
        labels["blur"] = alignment.blur_class(float(alignment.laplacian_variance(measured)), self.blur_thresholds)
        return Loaded(tf.io.encode_jpeg(face, quality=self.jpeg_quality).numpy(), labels, detected)

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", **dataclasses.asdict(self)}


def vggface2(root: str, subset: str = "train", align: str = "landmarks", **options) -> FolderSource:
    """VGGFace2 as distributed: `<root>/<subset>/<n000002>/<0001_01>.jpg` and
    `<root>/bb_landmark/loose_landmark_<subset>.csv`; faces without a landmark row are skipped
    (align `landmarks`) or detected (align `detect`)."""
    landmarks = posixpath.join(root, "bb_landmark", f"loose_landmark_{subset}.csv")
    if not tf.io.gfile.exists(landmarks):
        raise DatasetError(f"{landmarks} is missing: VGGFace2's landmark CSV is needed to align the faces")
    return FolderSource(posixpath.join(root, subset), landmarks, align=align, **options)


def define_image_flags() -> None:
    """Flags of the converters that decode and re-encode faces (called by the tools, never at import)."""
    from absl import flags

    flags.DEFINE_integer("image_size", alignment.ALIGNED_SIZE, "Output size in pixels (the landmarks' reference "
                         "points are scaled from 112).", lower_bound=16)
    flags.DEFINE_list("blur_thresholds", [str(t) for t in alignment.BLUR_THRESHOLDS],
                      "Laplacian-variance edges of blur classes severe|moderate|mild (tools/calibrate_blur.py).")
    flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality of the stored faces.", lower_bound=1, upper_bound=100)
    flags.DEFINE_float("min_confidence", 0.9, "Face detection: the lowest MTCNN confidence kept.", lower_bound=0.0,
                       upper_bound=1.0)
    flags.DEFINE_integer("min_face_size", 20, "Face detection: the smallest face side in pixels kept.", lower_bound=1)


def image_options_from_flags() -> dict[str, Any]:
    """FolderSource's image options from the flags of define_image_flags."""
    from absl import flags

    options = flags.FLAGS
    return {"image_size": options.image_size, "jpeg_quality": options.jpeg_quality,
            "blur_thresholds": tuple(float(t) for t in options.blur_thresholds),
            "min_confidence": options.min_confidence, "min_face_size": options.min_face_size}
