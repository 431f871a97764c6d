"""The verification benchmarks, one function per kind: bin, pairs, csv, rfw, ijb, synthetic.

Each takes an embedding function (uint8 images [B, S, S, 3] -> embeddings) and a path, streams
the images through it (image + horizontal flip, summed, L2-normalised), and returns a
`Scored`: the numbers for results.json and the ROC curves to draw.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from mvcom_tf.data import alignment, images, schema
from mvcom_tf.data.pipeline import eval_dataset
from mvcom_tf.data.tfrecord import DatasetError, read_info
from mvcom_tf.evaluation import formats, ijb, metrics
from mvcom_tf.evaluation.verification import best_threshold, embed_images, kfold_accuracy, read_pairs
from mvcom_tf.progress_line import ProgressLine

EmbedFn = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass
class Scored:
    """A benchmark's figures (JSON-ready) and its ROC curves {label: (far, tar)}."""

    result: dict
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    outcomes: np.ndarray | None = None  # per pair, right under the 10-fold protocol (paired comparisons of models)


# ----------------------------------------------------------------------------- images


def _decode(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(tf.ensure_shape(image, [None, None, 3]), [image_size, image_size], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def encoded_images(encoded: list[bytes], image_size: int, batch_size: int) -> tf.data.Dataset:
    """Batches of uint8 images from encoded bytes, resized to image_size, in order."""
    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(encoded, tf.string))
    return dataset.map(lambda e: _decode(e, image_size), num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size) \
        .prefetch(tf.data.AUTOTUNE)


def file_images(paths: list[str], placements: list[np.ndarray | None], image_size: int,
                batch_size: int) -> tf.data.Dataset:
    """Batches of uint8 faces read from files (streamed), warped where a transform is given (alignment's
    transforms), else resized whole."""
    transforms = np.zeros((len(paths), 8), np.float32)
    aligned = np.zeros(len(paths), bool)
    for index, transform in enumerate(placements):
        if transform is not None:
            transforms[index] = transform
            aligned[index] = True

    def decode(data: bytes) -> np.ndarray:
        try:
            return images.decode_rgb(data)
        except images.ImageProblem as problem:
            raise DatasetError(f"an image of the benchmark: {problem}") from None

    def load(path, transform, align):
        image = tf.numpy_function(decode, [tf.io.read_file(path)], tf.uint8, stateful=False)
        image = tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32)
        face = tf.cond(align, lambda: alignment.warp(image, transform, image_size),
                       lambda: tf.image.resize(image, [image_size, image_size], antialias=True))
        return tf.cast(tf.clip_by_value(tf.round(face), 0, 255), tf.uint8)

    for path in paths[:1] + paths[-1:]:
        if not tf.io.gfile.exists(path):
            raise DatasetError(f"{path} is missing")
    dataset = tf.data.Dataset.from_tensor_slices((paths, transforms, aligned))
    return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------- kinds


def _verification(scores: np.ndarray, same: np.ndarray, label: str) -> Scored:
    folds = kfold_accuracy(scores, same)
    far, tar, _ = metrics.roc_curve(scores, same)
    # The threshold of the best accuracy over all pairs: what `embed --compare` uses for this model.
    result = {"accuracy": folds.accuracy, "accuracy_std": folds.std, "num_pairs": int(len(scores)),
              "threshold": float(best_threshold(scores, same)), "tar_at_far": metrics.tar_at_far(scores, same)}
    return Scored(result, {label: (far, tar)}, folds.correct)


def run_bin(embed: EmbedFn, path: str, image_size: int, batch_size: int) -> Scored:
    """insightface .bin: pairs (2i, 2i+1), 10 folds in order, threshold on 9, accuracy on the 10th."""
    images, same = formats.load_bin(path)
    embeddings = embed_images(embed, encoded_images(images, image_size, batch_size), len(images))
    scores = np.sum(embeddings[0::2] * embeddings[1::2], axis=1)
    return _verification(scores, same, posixpath.basename(path))


def _pair_scores(embed: EmbedFn, pairs: formats.PairList, placements, image_size: int,
                 batch_size: int) -> np.ndarray:
    embeddings = embed_images(embed, file_images(pairs.paths, placements, image_size, batch_size), len(pairs.paths))
    return np.sum(embeddings[pairs.first] * embeddings[pairs.second], axis=1)


def photo_placements(paths: list[str], image_size: int, placement: alignment.Placement = alignment.Placement()
                     ) -> tuple[list[np.ndarray | None], list[str], dict[str, str]]:
    """Each photo's warp onto the model's input under --align (None: taken whole, resized: a photo already
    cropped as the mode expects, or any photo with --align=none); the photos in which no face was found (they are
    embedded whole, resized); and the photos that cannot be read, with the reason."""
    from mvcom_tf.data.detection import DETECT_BATCH, FaceDetector, main_faces

    detector, placements, no_face, unreadable = FaceDetector(), [None] * len(paths), [], {}
    progress = ProgressLine("detect", len(paths), "photos")
    for first in range(0, len(paths), DETECT_BATCH):
        pending = {}  # index -> image of this batch's photos that need a detection
        for index in range(first, min(first + DETECT_BATCH, len(paths))):
            try:
                image = images.read_rgb(paths[index])
            except (images.ImageProblem, tf.errors.NotFoundError) as problem:
                unreadable[paths[index]] = f"{paths[index]}: {problem}"
                continue
            if not placement.as_is(image, image_size):
                pending[index] = image
        for (index, image), face in zip(pending.items(), main_faces(detector, list(pending.values()))):
            if face is None:
                no_face.append(paths[index])
            else:
                placements[index] = placement.transform(image_size, image.shape, face.landmarks, face.box)
        progress.advance(min(DETECT_BATCH, len(paths) - first))
    return placements, no_face, unreadable


def _readable_pairs(pairs: formats.PairList, landmarks: list, unreadable: dict[str, str]):
    """The pairs whose two photos can be read, over the readable photos only (with their landmarks)."""
    keep = [index for index, path in enumerate(pairs.paths) if path not in unreadable]
    position = np.full(len(pairs.paths), -1)
    position[keep] = np.arange(len(keep))
    usable = (position[pairs.first] >= 0) & (position[pairs.second] >= 0)
    kept = formats.PairList([pairs.paths[i] for i in keep], position[pairs.first[usable]],
                            position[pairs.second[usable]], pairs.same[usable])
    return kept, [landmarks[i] for i in keep], int(np.sum(~usable))


def _photo_pairs(embed: EmbedFn, pairs: formats.PairList, name: str, image_size: int, batch_size: int,
                 placement: alignment.Placement) -> Scored:
    """Pairs of photographs: detected and placed by --align unless already cropped; faceless photos embedded
    whole, counted and named; a pair with a photo that cannot be read is left out, counted and named."""
    landmarks, no_face, unreadable = photo_placements(pairs.paths, image_size, placement)
    if unreadable:
        pairs, landmarks, left_out = _readable_pairs(pairs, landmarks, unreadable)
        logging.warning("%s: %d photo(s) cannot be read, %d pair(s) left out; first: %s", name, len(unreadable),
                        left_out, next(iter(unreadable.values())))
        if not len(pairs.same):
            raise DatasetError(f"{name}: no pair has two readable photos (e.g. {next(iter(unreadable.values()))})")
    scored = _verification(_pair_scores(embed, pairs, landmarks, image_size, batch_size), pairs.same, name)
    scored.result.update(no_face=len(no_face), no_face_images=no_face, **placement.describe())
    if unreadable:
        scored.result.update(unreadable=len(unreadable), unreadable_images=list(unreadable.values()),
                             pairs_left_out=left_out)
    return scored


def run_pairs(embed: EmbedFn, path: str, image_size: int, batch_size: int,
              placement: alignment.Placement = alignment.Placement()) -> Scored:
    """An LFW-style pairs.txt (or a folder holding one) over faces `<name>/<name>_NNNN.jpg` beside it."""
    pairs_file = posixpath.join(path, "pairs.txt") if tf.io.gfile.isdir(path) else path
    pairs = formats.read_lfw_pairs(pairs_file, posixpath.dirname(pairs_file))
    return _photo_pairs(embed, pairs, posixpath.basename(path.rstrip("/")), image_size, batch_size, placement)


def run_csv(embed: EmbedFn, path: str, image_size: int, batch_size: int,
            placement: alignment.Placement = alignment.Placement()) -> Scored:
    """A CSV of photo pairs (two image paths and a same/different column), photos of any size."""
    return _photo_pairs(embed, formats.read_pair_csv(path), posixpath.basename(path), image_size, batch_size,
                        placement)


def run_rfw(embed: EmbedFn, path: str, image_size: int, batch_size: int) -> Scored:
    """RFW: per-race 10-fold accuracy on the 5-point-aligned loose crops, their mean, std and skewed error ratio."""
    races, curves = {}, {}
    for race in formats.RFW_RACES:
        pairs, points = formats.read_rfw(path, race)
        landmarks = [points.get(posixpath.basename(p)) for p in pairs.paths]
        missing = sum(lm is None for lm in landmarks)
        scores = _pair_scores(embed, pairs, landmarks, image_size, batch_size)
        scored = _verification(scores, pairs.same, race)
        races[race] = {**scored.result, "unaligned_images": missing}
        curves.update(scored.curves)
    accuracies = {race: races[race]["accuracy"] for race in races}
    summary = metrics.group_summary(accuracies)
    result = {"accuracy": summary["mean_accuracy"], "std": summary["group_std"],
              "skewed_error_ratio": summary["skewed_error_ratio"], "races": races}
    return Scored(result, curves)


def run_ijb(embed: EmbedFn, path: str, image_size: int, batch_size: int) -> Scored:
    """IJB-B or IJB-C 1:1 (the meta files name which): TAR at FAR 1e-6 ... 1e-1."""
    names = [n for n in ("ijbc", "ijbb") if tf.io.gfile.exists(posixpath.join(path, "meta", f"{n}_face_tid_mid.txt"))]
    if not names:
        raise DatasetError(f"{path}/meta holds neither ijbc_face_tid_mid.txt nor ijbb_face_tid_mid.txt")
    meta = formats.read_ijb(path, names[0])
    paths = [posixpath.join(path, "loose_crop", image) for image in meta.images]
    placements = [alignment.alignment_transform(points, image_size) for points in meta.landmarks]
    features = embed_images(embed, file_images(paths, placements, image_size, batch_size), len(paths))
    template_ids, template_features = ijb.template_features(features, meta.templates, meta.medias, meta.scores)
    scores = ijb.pair_scores(template_ids, template_features, meta.pair_templates)
    far, tar, _ = metrics.roc_curve(scores, meta.pair_labels)
    result = {"tar_at_far": metrics.tar_at_far(scores, meta.pair_labels), "num_pairs": int(len(scores)),
              "num_images": len(paths), "num_templates": int(len(template_ids)), "protocol": names[0]}
    return Scored(result, {names[0]: (far, tar)})


def run_synthetic(embed: EmbedFn, path: str, image_size: int, batch_size: int) -> Scored:
    """The synthetic test split: 10-fold accuracy, and per factor the accuracy of every group at one global
    threshold (the one with the best overall accuracy) and its own 10-fold accuracy, with bias summaries."""
    info = read_info(path)
    if "pairs" not in info.extras:
        raise DatasetError(f"{path}/dataset.json names no pairs file: it is not a verification split")
    pairs = read_pairs(posixpath.join(path, info.extras["pairs"]))
    images = eval_dataset(path, info, batch_size, image_size).map(lambda f: f["image"])
    embeddings = embed_images(embed, images, info.num_images)
    if max(pairs["index_a"].max(), pairs["index_b"].max()) >= len(embeddings):
        raise DatasetError(f"{path}: pairs name image indices beyond its {len(embeddings)} images")
    scores = np.sum(embeddings[pairs["index_a"]] * embeddings[pairs["index_b"]], axis=-1)
    same = pairs["same"].astype(bool)
    scored = _verification(scores, same, "all pairs")
    threshold = best_threshold(scores, same)
    correct = (scores >= threshold) == same
    folds = kfold_accuracy(scores, same)
    factors, groups = {}, {}
    for factor in schema.FACTORS:
        labels = pairs[factor]
        at_threshold, tenfold, fold_groups = {}, {}, {}
        for group in range(schema.NUM_CLASSES[factor]):
            members = labels == group
            if not np.any(members):
                continue
            name = schema.CLASS_NAMES[factor][group]
            at_threshold[name] = float(np.mean(correct[members]))
            if members.sum() >= 10:
                tenfold[name] = kfold_accuracy(scores[members], same[members]).accuracy
            fold_groups[str(group)] = float(np.mean(folds.correct[members]))
            if factor == "ethnicity":
                far, tar, _ = metrics.roc_curve(scores[members], same[members])
                scored.curves[name] = (far, tar)
        if not at_threshold:  # no pair labelled in this factor (photos measure pose and blur only)
            continue
        factors[factor] = {"global_threshold": at_threshold, "tenfold": tenfold, **metrics.group_summary(at_threshold)}
        groups[factor] = fold_groups
    scored.result.update({"global_threshold": threshold,
                          "global_far": float(np.mean(scores[~same] >= threshold)),
                          "factors": factors, "groups": groups})
    return scored


RUNNERS = {"bin": run_bin, "pairs": run_pairs, "csv": run_csv, "rfw": run_rfw, "ijb": run_ijb,
           "synthetic": run_synthetic}


# The kinds of photographs, which --align places; the others are aligned crops or read their own landmarks.
PHOTO_KINDS = ("pairs", "csv")


def run_benchmark(kind: str, path: str, embed: EmbedFn, image_size: int, batch_size: int = 256,
                  placement: alignment.Placement = alignment.Placement()) -> Scored:
    """Scores one benchmark of any kind (`placement`: --align, for the photo kinds)."""
    if kind in PHOTO_KINDS:
        return RUNNERS[kind](embed, path, image_size, batch_size, placement)
    return RUNNERS[kind](embed, path, image_size, batch_size)
