"""The seed's Figs. 3-5 from a dataset.json: images per identity, and the histogram of every factor."""

from __future__ import annotations

import io

import numpy as np

from mvcom_tf.data import schema
from mvcom_tf.data.tfrecord import DatasetInfo


def to_rgb(figure) -> np.ndarray:
    """A matplotlib figure as a uint8 RGB array [H, W, 3] (for TensorBoard), closing the figure."""
    import tensorflow as tf
    from matplotlib import pyplot

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    pyplot.close(figure)
    return tf.io.decode_png(buffer.getvalue(), channels=3).numpy()


def distribution_figure(info: DatasetInfo, title: str = ""):
    """One row of panels: images per identity (sorted, log scale, Fig. 3) and each factor's classes (Figs. 4-5)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training hosts are headless
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 1 + len(schema.FACTORS), figsize=(4.0 * (1 + len(schema.FACTORS)), 3.4))
    counts = np.sort(np.asarray(info.images_per_identity))[::-1]
    axes[0].plot(np.arange(1, len(counts) + 1), np.maximum(counts, 1), color="tab:blue")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("identities, sorted")
    axes[0].set_ylabel("images")
    axes[0].set_title(f"{info.num_identities} identities, {info.num_images} images", fontsize=9)
    for axis, factor in zip(axes[1:], schema.FACTORS):
        names = schema.CLASS_NAMES[factor]
        counts = info.histograms[factor]
        axis.bar(range(len(names)), counts, color="tab:orange")
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        axis.set_title(f"{factor} (unknown: {info.unknown[factor]})", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
