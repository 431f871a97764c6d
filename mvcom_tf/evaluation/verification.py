"""Face verification: flip-fused embeddings, exact best thresholds, k-fold accuracy, the synthetic pairs file."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.data.tfrecord import DatasetError
from mvcom_tf.progress_line import ProgressLine


def l2_normalize(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold t maximising the accuracy of `score >= t` (ties: the lowest t).

    Candidates are midpoints between consecutive distinct scores, plus one below and one
    above them all, so the choice is exact rather than restricted to a grid.
    """
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    order = np.argsort(scores, kind="stable")
    values, first = np.unique(scores[order], return_index=True)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1.0]])
    # Candidate j accepts the sorted pairs from position starts[j] on: right are the positives there and the
    # negatives before. Counting with a cumulative sum is O(n log n); trying every candidate on every pair
    # was O(n^2), minutes for the 70,000 pairs of a bias-study split.
    starts = np.append(first, len(scores))
    positives_before = np.concatenate([[0], np.cumsum(same[order])])[starts]
    right = (positives_before[-1] - positives_before) + (starts - positives_before)
    return float(candidates[int(np.argmax(right))])


@dataclasses.dataclass
class KFoldResult:
    accuracy: float
    std: float
    thresholds: list[float]
    correct: np.ndarray  # [N] bool: each pair judged with its own fold's threshold


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: int = 10) -> KFoldResult:
    """insightface's protocol: folds in order; each fold's threshold is chosen on the other folds."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    if len(scores) < folds:
        raise ValueError(f"{len(scores)} pairs cannot be split into {folds} folds")
    fold_of = np.array_split(np.arange(len(scores)), folds)
    correct = np.zeros(len(scores), bool)
    accuracies, thresholds = [], []
    for test_index in fold_of:
        train = np.ones(len(scores), bool)
        train[test_index] = False
        threshold = best_threshold(scores[train], same[train])
        correct[test_index] = (scores[test_index] >= threshold) == same[test_index]
        accuracies.append(float(np.mean(correct[test_index])))
        thresholds.append(threshold)
    return KFoldResult(float(np.mean(accuracies)), float(np.std(accuracies)), thresholds, correct)


def embed_images(embed_fn: Callable[[tf.Tensor], tf.Tensor], images: tf.data.Dataset,
                 total: int | None = None) -> np.ndarray:
    """Embeddings of image + its horizontal flip, summed and L2-normalised (insightface's test-time flip);
    logs a progress line (of `total` images, if given) every few seconds."""
    outputs, progress = [], ProgressLine("embed", total)
    for batch in images:
        embedding = embed_fn(batch) + embed_fn(tf.reverse(batch, axis=[2]))
        outputs.append(np.asarray(embedding, np.float64))
        progress.advance(len(outputs[-1]))
    return l2_normalize(np.concatenate(outputs))


def read_pairs(path: str) -> dict[str, np.ndarray]:
    """Reads a pairs.csv (index_a,index_b,same and one group column per factor)."""
    with tf.io.gfile.GFile(path) as f:
        header = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f if line.strip()]
    expected = ["index_a", "index_b", "same", *schema.FACTORS]
    if header != expected:
        raise DatasetError(f"{path}: header {header} is not {expected}")
    try:
        table = np.array(rows, np.int64).reshape(-1, len(expected))
    except ValueError:
        raise DatasetError(f"{path}: every row must have {len(expected)} integers") from None
    return dict(zip(expected, table.T))
