"""TrainConfig: everything a training run reads, filled from the flags of `mvcom_tf.train`."""

from __future__ import annotations

import dataclasses

STAGES = ("pretrain", "meta")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A stage's length and learning rate: lr, times 0.1 at each epoch of lr_steps."""

    epochs: int
    lr: float
    lr_steps: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run; the field names are the flag names (see `python -m mvcom_tf.train --helpfull`)."""

    # Data.
    train_data: str
    meta_data: str
    eval_data: tuple[str, ...]
    image_size: int
    shuffle_buffer: int
    synth_blur_prob: float
    synth_occlusion_prob: float
    # Model.
    backbone: str
    width_multiplier: float
    embedding_size: int
    dropout: float
    sync_bn: bool
    # Identity loss and margins.
    loss: str
    margin: float
    scale: float
    margin_prior: str
    margin_prior_power: float
    margin_min: float
    margin_max: float
    # Optimisation.
    batch_size: int
    epochs: int
    max_steps: int
    lr: float
    lr_steps: tuple[float, ...]
    momentum: float
    weight_decay: float
    # MvCoM meta fine-tuning.
    meta_epochs: int
    meta_lr: float
    meta_lr_steps: tuple[float, ...]
    meta_batch_size: int
    meta_lr_tau: float
    meta_inner_lr: float
    residual_max: float
    meta_scope: str
    factor_weights: tuple[float, ...]
    meta_sampling: str
    meta_pool_factor: int
    variation_warmup_steps: int
    variation_lr: float
    oracle_margin_deltas: tuple[float, ...]
    head_warmup_steps: int
    head_warmup_lr: float
    # The run.
    stage: tuple[str, ...]
    model_dir: str
    init_checkpoint: str
    strategy: str
    cpu_replicas: int
    seed: int
    deterministic: bool
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    eval_batch_size: int
    eval_every: int
    nan_policy: str
    jit_compile: bool
    steps_per_execution: int
    mixed_precision: str
    export_dir: str
    export_tflite: bool
    export_onnx: bool

    def schedule(self, stage: str) -> Schedule:
        """The pretrain stage follows --epochs/--lr/--lr_steps, the meta stage --meta_epochs/--meta_lr/..."""
        if stage == "meta":
            return Schedule(self.meta_epochs, self.meta_lr, self.meta_lr_steps)
        return Schedule(self.epochs, self.lr, self.lr_steps)
