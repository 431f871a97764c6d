"""Per-sample loss weights read with the training batches: resampling's ratios, and JTT's error set.

Both are functions of a parsed record (its variation labels, its `image/source`) that the input
pipeline stores as the batch's `weight`; the margin step multiplies each sample's loss by it.
GroupDRO's weights depend on the losses and live in the step (mvcom_tf/losses/group_dro.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from mvcom_tf.data import schema

WeightFn = Callable[[dict[str, tf.Tensor]], tf.Tensor]
DATA_WEIGHTINGS = ("balanced", "error_set")  # the --loss_weighting values the input pipeline computes


def class_weight_tables(histograms: dict[str, list[int]]) -> list[np.ndarray]:
    """Per factor k, w_k(c) = 1 / (K_k p_k(c)) for each class c (0 for a class absent from the split), and 1 for
    an unknown label in the last entry (index -1)."""
    tables = []
    for factor in schema.FACTORS:
        counts = np.asarray(histograms[factor], np.float64)
        weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 0.0)
        tables.append(np.append(weights, 1.0))
    return tables


def class_weight(tables: list[np.ndarray], features: dict[str, tf.Tensor]) -> tf.Tensor:
    """mean_k w_k(c_k) of a record (or a batch) with the tables of class_weight_tables."""
    terms = [tf.gather(tf.constant(table, tf.float32), tf.where(features[factor] >= 0, features[factor], len(table) - 1))
             for table, factor in zip(tables, schema.FACTORS)]
    return tf.add_n(terms) / len(schema.FACTORS)


def read_error_set(path: str) -> list[str]:
    """The `image/source` strings of an error-set file (one a line; `#` lines are comments)."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"--error_set: {path} does not exist (tools/jtt_error_set.py writes it)")
    with tf.io.gfile.GFile(path) as f:
        sources = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    if not sources:
        raise ValueError(f"--error_set: {path} lists no image: nothing to up-weight")
    return sources


@dataclasses.dataclass(frozen=True)
class DataWeighting:
    """--loss_weighting's data-side kinds: `balanced` (resampling's ratios) or `error_set` (JTT)."""

    kind: str
    error_set: str = ""
    upweight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DATA_WEIGHTINGS:
            raise ValueError(f"unknown data weighting {self.kind!r}; expected one of {DATA_WEIGHTINGS}")

    def weight_fn(self, histograms: dict[str, list[int]], num_images: int) -> WeightFn:
        """The record -> weight function (build it inside the dataset's function: it may hold a lookup table)."""
        if self.kind == "balanced":
            # What balanced_acceptance keeps records in proportion to: weighting by it gives the resampled
            # stream's expected gradient on the natural stream. Its mean over the split is 1.
            tables = class_weight_tables(histograms)
            return lambda features: class_weight(tables, features)
        sources = read_error_set(self.error_set)
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(sources), tf.ones(len(sources), tf.float32)), 0.0)
        # Normalised to mean 1 over the split, as JTT's up-sampled stream is under a batch-mean loss.
        mean = 1.0 + (self.upweight - 1.0) * len(set(sources)) / max(num_images, 1)
        return lambda features: (1.0 + (self.upweight - 1.0) * table.lookup(features["source"])) / mean
