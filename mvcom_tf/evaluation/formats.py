"""Readers of the verification benchmarks' files: insightface .bin, LFW pairs.txt, RFW, IJB-B/C meta files.

Every reader raises DatasetError naming the file, the line and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pickle
import posixpath

import numpy as np
import tensorflow as tf

from mvcom_tf.data.tfrecord import DatasetError

RFW_RACES = ("African", "Asian", "Caucasian", "Indian")

# What an insightface .bin may contain: bytes, lists, tuples, booleans, numpy arrays. Anything
# else (os.system, subprocess.Popen, builtins.eval, ...) is refused before it can be called.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # Python 2 pickles store bytes as latin-1 text re-encoded on load
    ("builtins", "bytearray"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a verification .bin holds only bytes, lists, "
                                         "tuples, booleans and numpy arrays")
        return super().find_class(module, name)


def load_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """insightface's verification file: (2N encoded images, N booleans); pair i is images 2i and 2i+1."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        bins, issame = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        raise DatasetError(f"{path}: {error}") from None
    except (EOFError, ValueError, TypeError) as error:
        raise DatasetError(f"{path}: not an insightface verification .bin ({error})") from None
    images = [bytes(np.asarray(b, np.uint8).tobytes()) if isinstance(b, np.ndarray) else bytes(b) for b in bins]
    issame = np.asarray(issame, bool)
    if len(images) != 2 * len(issame):
        raise DatasetError(f"{path}: {len(images)} images for {len(issame)} pairs; expected twice as many")
    return images, issame


@dataclasses.dataclass(frozen=True)
class PairList:
    """Verification pairs over image files: pairs index `paths`."""

    paths: list[str]
    first: np.ndarray
    second: np.ndarray
    same: np.ndarray


def read_lfw_pairs(path: str, image_dir: str, extension: str = ".jpg") -> PairList:
    """LFW's pairs.txt: `name n1 n2` (same person) or `name1 n1 name2 n2`; images `<dir>/<name>/<name>_NNNN<ext>`.

    A first line of two numbers (folds, pairs per fold) is skipped; fields may be tab- or space-separated.
    """
    with tf.io.gfile.GFile(path) as f:
        lines = f.read().splitlines()
    index: dict[str, int] = {}
    first, second, same = [], [], []

    def image(name: str, number: str, line_number: int) -> int:
        try:
            relative = f"{name}/{name}_{int(number):04d}{extension}"
        except ValueError:
            raise DatasetError(f"{path} line {line_number}: image number {number!r} is not an integer") from None
        return index.setdefault(posixpath.join(image_dir, relative), len(index))

    for line_number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or (line_number == 1 and len(fields) == 2 and all(x.isdigit() for x in fields)):
            continue
        if len(fields) == 3:
            first.append(image(fields[0], fields[1], line_number))
            second.append(image(fields[0], fields[2], line_number))
            same.append(True)
        elif len(fields) == 4:
            first.append(image(fields[0], fields[1], line_number))
            second.append(image(fields[2], fields[3], line_number))
            same.append(False)
        else:
            raise DatasetError(f"{path} line {line_number}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                               f"got {line!r}")
    if not same:
        raise DatasetError(f"{path}: no pairs")
    return PairList(list(index), np.array(first), np.array(second), np.array(same))


_SAME_COLUMNS = ("same", "issame", "is_same", "decision", "label", "match")
_SAME_VALUES = {"1": True, "yes": True, "true": True, "same": True, "y": True,
                "0": False, "no": False, "false": False, "different": False, "n": False}


def read_pair_csv(path: str) -> PairList:
    """A CSV of image pairs: the first two columns are image paths (relative to the CSV's folder), and a
    same/different column (`same`, `issame`, `decision`, `label`, ...) holds 1/0, Yes/No or true/false."""
    with tf.io.gfile.GFile(path) as f:
        rows = [row for row in csv.reader(f) if row and any(field.strip() for field in row)]
    if len(rows) < 2:
        raise DatasetError(f"{path}: expected a header and at least one pair")
    header = [name.strip().lower() for name in rows[0]]
    column = next((header.index(name) for name in _SAME_COLUMNS if name in header), None)
    if column is None or len(header) < 3:
        raise DatasetError(f"{path}: the header {rows[0]} needs two image columns and a same/different column "
                           f"(one of {', '.join(_SAME_COLUMNS)})")
    folder = posixpath.dirname(path)
    index: dict[str, int] = {}
    first, second, same = [], [], []
    for line_number, row in enumerate(rows[1:], 2):
        value = row[column].strip().lower() if len(row) > column else ""
        if value not in _SAME_VALUES or len(row) < 2:
            raise DatasetError(f"{path} line {line_number}: {row[column] if len(row) > column else 'nothing'!r} "
                               f"in column {rows[0][column]!r} is not one of {', '.join(_SAME_VALUES)}")
        paths = [field.strip() if field.strip().startswith("/") or "://" in field else
                 posixpath.join(folder, field.strip()) for field in row[:2]]
        first.append(index.setdefault(paths[0], len(index)))
        second.append(index.setdefault(paths[1], len(index)))
        same.append(_SAME_VALUES[value])
    return PairList(list(index), np.array(first), np.array(second), np.array(same))


def read_landmark_lines(path: str, skip_fields: int) -> dict[str, np.ndarray]:
    """Lines `<image path> <skip_fields - 1 other fields> x1 y1 ... x5 y5 [...]` -> {file name: [5, 2]}."""
    landmarks = {}
    with tf.io.gfile.GFile(path) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                points = np.array([float(v) for v in fields[skip_fields:skip_fields + 10]], np.float64)
                if len(points) != 10:
                    raise ValueError(f"{len(points)} coordinates")
            except ValueError as error:
                raise DatasetError(f"{path} line {line_number}: expected an image name and 10 landmark "
                                   f"coordinates ({error})") from None
            landmarks[posixpath.basename(fields[0])] = points.reshape(5, 2)
    return landmarks


def read_rfw(root: str, race: str) -> tuple[PairList, dict[str, np.ndarray]]:
    """One race of RFW: `test/txts/<Race>/<Race>_pairs.txt` over `test/data/<Race>/`, and its landmarks."""
    txts = posixpath.join(root, "test", "txts", race)
    pairs = read_lfw_pairs(posixpath.join(txts, f"{race}_pairs.txt"), posixpath.join(root, "test", "data", race))
    # RFW's landmark lines: image path, an identity number, then the 5 points.
    landmarks = read_landmark_lines(posixpath.join(txts, f"{race}_lmk.txt"), skip_fields=2)
    return pairs, landmarks


@dataclasses.dataclass(frozen=True)
class IJBMeta:
    """IJB-B/C 1:1 protocol: images with template, media, landmarks and detector score; template pairs."""

    images: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray  # [N, 5, 2]
    scores: np.ndarray  # detector scores
    pair_templates: np.ndarray  # [P, 2]
    pair_labels: np.ndarray  # [P] bool


def read_ijb(root: str, name: str) -> IJBMeta:
    """`meta/<name>_face_tid_mid.txt`, `<name>_template_pair_label.txt`, `<name>_name_5pts_score.txt` (name: ijbb, ijbc)."""
    meta = posixpath.join(root, "meta")

    def rows(file: str, width: int) -> list[list[str]]:
        path = posixpath.join(meta, file)
        if not tf.io.gfile.exists(path):
            raise DatasetError(f"{path} is missing: expected the IJB layout meta/{file}")
        out = []
        with tf.io.gfile.GFile(path) as f:
            for line_number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != width:
                    raise DatasetError(f"{path} line {line_number}: expected {width} fields, got {len(fields)}")
                out.append(fields)
        return out

    faces = rows(f"{name}_face_tid_mid.txt", 3)
    points = {fields[0]: fields[1:] for fields in rows(f"{name}_name_5pts_score.txt", 12)}
    pairs = rows(f"{name}_template_pair_label.txt", 3)
    missing = [image for image, _, _ in faces if image not in points]
    if missing:
        raise DatasetError(f"{meta}/{name}_name_5pts_score.txt has no landmarks for {len(missing)} images, "
                           f"e.g. {missing[0]}")
    try:
        values = np.array([[float(v) for v in points[image]] for image, _, _ in faces], np.float64)
        return IJBMeta(
            images=[image for image, _, _ in faces],
            templates=np.array([int(t) for _, t, _ in faces]), medias=np.array([int(m) for _, _, m in faces]),
            landmarks=values[:, :10].reshape(-1, 5, 2), scores=values[:, 10],
            pair_templates=np.array([[int(a), int(b)] for a, b, _ in pairs]),
            pair_labels=np.array([int(label) == 1 for _, _, label in pairs]))
    except ValueError as error:
        raise DatasetError(f"{meta}: a non-numeric field in the IJB meta files ({error})") from None
