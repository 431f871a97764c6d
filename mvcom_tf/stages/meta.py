"""MvCoM fine-tuning (seed Sec. B-C): the meta step on a training batch and a meta pool, after its warm-ups."""

from __future__ import annotations


import numpy as np

from mvcom_tf.data import schema
from mvcom_tf.meta.figure import margin_figure
from mvcom_tf.meta.statistics import MetaSamples, MetaSums, meta_scalars
from mvcom_tf.meta.step import FIGURE_FACES, MetaStep
from mvcom_tf.training.stage import Stage
from mvcom_tf.training.compiled import ReplicaStep
from mvcom_tf.training.distribute import InputSpec


class MetaStage(Stage):
    """Steps: --head_warmup_steps of the identity head alone, --variation_warmup_steps of the variation
    heads alone, then MvCoM iterations. Reads the training batches and a meta pool of |V| samples
    (times --meta_pool_factor for hard sampling, which keeps the pool's rarest)."""

    # A fine-tuning: the run's next fine-tuning (MvCoM after its CosFace control) starts from the same pre-training.
    later_stages_start_here = False

    def __init__(self, *args, meta_step: MetaStep, meta_pool: InputSpec,
                 head_warmup_steps: int, variation_warmup_steps: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meta_step, self.meta_pool = meta_step, meta_pool
        self.head_warmup_steps, self.variation_warmup_steps = head_warmup_steps, variation_warmup_steps

    def inputs(self) -> list[InputSpec]:
        return [self.train, self.meta_pool]

    def replica_step(self, step: int) -> ReplicaStep:
        if step < self.head_warmup_steps:
            return self.meta_step.head_warmup
        if step < self.head_warmup_steps + self.variation_warmup_steps:
            return self.meta_step.variation_warmup
        return self.meta_step

    def describe(self, step: int) -> str:
        return "warm-up of the variation heads"

    def scalars(self, sums: MetaSums) -> dict[str, float]:
        return meta_scalars(sums, self.meta_step.head_classes)

    def figures(self, samples: MetaSamples) -> dict[str, np.ndarray]:
        """The seed's Fig. 6: the first replica's first faces with their residuals."""
        # Gathered over replicas: replica r's faces are rows r * FIGURE_FACES onwards, and its
        # samples start at r * (B / replicas) in the residuals; the first replica's suffice.
        faces = samples.faces[:FIGURE_FACES]
        residuals = {factor: samples.residual[factor][:len(faces)] for factor in schema.FACTORS}
        return {"margins/faces": margin_figure(faces, residuals, samples.margin[:len(faces)])}

    def histograms(self, samples: MetaSamples) -> dict[str, np.ndarray]:
        return {"margin/final": samples.margin,
                **{f"residual/{factor}": values for factor, values in samples.residual.items()}}
