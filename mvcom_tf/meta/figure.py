"""The seed's Fig. 6 for TensorBoard: sample faces with their learned per-factor margin residuals."""

from __future__ import annotations

import numpy as np

from mvcom_tf.data import schema
from mvcom_tf.data.figures import to_rgb


def margin_figure(images: np.ndarray, residuals: dict[str, np.ndarray], margins: np.ndarray) -> np.ndarray:
    """A uint8 RGB picture [H, W, 3]: each face (normalised pixels) above its r^k and final margin."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training hosts are headless
    from matplotlib import pyplot

    count = len(images)
    figure, axes = pyplot.subplots(1, count, figsize=(1.6 * count, 2.6), squeeze=False)
    for index, axis in enumerate(axes[0]):
        axis.imshow(np.clip(images[index] * 128.0 + 127.5, 0, 255).astype(np.uint8))
        axis.set_axis_off()
        lines = [f"{factor[:4]} {residuals[factor][index]:+.3f}" for factor in schema.FACTORS]
        axis.set_title("\n".join([f"m {margins[index]:.3f}", *lines]), fontsize=7, family="monospace")
    figure.tight_layout()
    return to_rgb(figure)
