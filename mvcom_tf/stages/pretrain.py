"""CosFace (or ArcFace) pre-training: a constant margin for every identity (seed Sec. C)."""

from __future__ import annotations

from mvcom_tf.training.stage import Stage
from mvcom_tf.margin_step import MarginStep
from mvcom_tf.training.compiled import ReplicaStep


class PretrainStage(Stage):
    """Every step is the margin step on a training batch."""

    def __init__(self, *args, margin_step: MarginStep, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.margin_step = margin_step

    def replica_step(self, step: int) -> ReplicaStep:
        return self.margin_step
