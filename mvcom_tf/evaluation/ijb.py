"""IJB-B/C 1:1 verification: image features -> media averages -> template features -> pair scores."""

from __future__ import annotations

import numpy as np

from mvcom_tf.evaluation.verification import l2_normalize


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      detector_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """insightface's aggregation: features weighted by detector score, averaged within each media
    (the frames of one video or one still), summed over a template's media, L2-normalised.

    Returns (the sorted unique template ids, their features [T, E]).
    """
    features = np.asarray(features, np.float64)
    if detector_scores is not None:
        features = features * np.asarray(detector_scores, np.float64)[:, None]
    unique_templates, template_index = np.unique(templates, return_inverse=True)
    # One row per (template, media): the mean of its images.
    keys = np.stack([template_index, np.asarray(medias)], axis=1)
    unique_keys, key_index = np.unique(keys, axis=0, return_inverse=True)
    key_index = key_index.reshape(-1)
    sums = np.zeros((len(unique_keys), features.shape[1]))
    np.add.at(sums, key_index, features)
    media_means = sums / np.bincount(key_index, minlength=len(unique_keys))[:, None]
    totals = np.zeros((len(unique_templates), features.shape[1]))
    np.add.at(totals, unique_keys[:, 0], media_means)
    return unique_templates, l2_normalize(totals)


def pair_scores(template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Cosine similarity of each (template, template) pair."""
    position = {int(t): i for i, t in enumerate(template_ids)}
    first = np.array([position[int(t)] for t in pairs[:, 0]])
    second = np.array([position[int(t)] for t in pairs[:, 1]])
    return np.sum(features[first] * features[second], axis=1)
