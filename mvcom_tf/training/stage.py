"""The Stage interface: what the training loop needs of a stage, and nothing of what the stage does.

The stages themselves (mvcom_tf.stages) implement it and depend on this package; the loop never
imports them: `mvcom_tf.train` hands it the builder.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from mvcom_tf.config import Schedule, TrainConfig
from mvcom_tf.models.heads import MarginHead
from mvcom_tf.models.sharded_head import ShardedCentres
from mvcom_tf.training.compiled import ReplicaStep
from mvcom_tf.training.distribute import InputSpec


class Stage(abc.ABC):
    """A stage of training: its model and optimizer, its inputs, its replica steps and its reports.

    Built in the strategy's scope (`mvcom_tf.stages.build`). The loop reads `inputs()` into one
    distributed iterator each, and calls `replica_step(step)` per replica with one batch of each;
    the step returns a `StepOutput`, whose `sums.stage` and `samples` only the stage interprets.
    """

    # Whether a later stage of the run starts from this one's weights (else from what this one started from).
    later_stages_start_here = True

    def __init__(self, name: str, schedule: Schedule, backbone: keras.Model, head: MarginHead | ShardedCentres,
                 optimizer: keras.optimizers.Optimizer, train: InputSpec,
                 own_trackables: dict[str, Any] | None = None) -> None:
        """`own_trackables`: the stage's state beyond backbone, head and optimizer (GroupDRO's q, the variation
        heads), saved and restored with them."""
        self.name, self.schedule = name, schedule
        self.backbone, self.head, self.optimizer, self.train = backbone, head, optimizer, train
        self.own_trackables = own_trackables or {}

    @property
    def steps_per_epoch(self) -> int:
        return self.train.steps_per_epoch

    def inputs(self) -> list[InputSpec]:
        """The datasets each replica step reads, in argument order (the training batches first)."""
        return [self.train]

    def trackables(self) -> dict[str, Any]:
        """The stage's checkpoint entries (`backbone` and `head` are what --init_checkpoint carries over)."""
        return {"backbone": self.backbone, "head": self.head, "optimizer": self.optimizer, **self.own_trackables}

    @abc.abstractmethod
    def replica_step(self, step: int) -> ReplicaStep:
        """The per-replica callable to run at global step `step` (the same object while it does not change)."""

    def load_head(self, kernel: np.ndarray) -> None:
        """Sets the identity centres W [E, C] (from --init_checkpoint), split over the replicas if sharded."""
        if isinstance(self.head, ShardedCentres):
            self.head.assign_full(kernel)
        else:
            self.head.kernel.assign(kernel)

    def describe(self, step: int) -> str:
        """What a step that reports no identity loss does, for the progress line."""
        return "warm-up"

    def scalars(self, sums: Any) -> dict[str, float]:
        """TensorBoard scalars from the stage's own summed figures (StepSums.stage)."""
        return {}

    def figures(self, samples: Any) -> dict[str, np.ndarray]:
        """Pictures for TensorBoard from the latest step's samples."""
        return {}

    def histograms(self, samples: Any) -> dict[str, np.ndarray]:
        """Per-sample values for TensorBoard histograms."""
        return {}

    def learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))


# Builds the stage `name` of --stage for a config, its variables in the strategy's scope.
StageBuilder = Callable[[TrainConfig, str, tf.distribute.Strategy], Stage]
# Entries for metrics.json made from every stage's metrics (metrics["stages"]) once the run has trained.
RunSummary = Callable[[dict], dict]
