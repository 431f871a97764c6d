"""TrainConfig: everything a training run reads, with its defaults (the paper's and insightface's).

This is the one source of the training flags: `mvcom_tf.config_flags` defines and validates
an absl flag per field from its type, default and metadata. The CPU demo is not the default;
it is `flags/demo.cfg`, which `python -m mvcom_tf.train` applies when given neither --train_data nor a
flagfile.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, lower: float | None = None,
           upper: float | None = None, length: int | None = None) -> Any:
    """A TrainConfig field: its default, the flag's help text and the bounds the flag validates."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "lower": lower,
                                                          "upper": upper, "length": length})


FACTOR_LIST = "(pose, occlusion, blur, ethnicity)"
# What --stage may list: CosFace pre-training; CosFace fine-tuning, the control MvCoM is measured against (the
# meta stage's schedule, batches and warm-ups with a constant margin and no residuals); MvCoM fine-tuning.
STAGE_NAMES = ("pretrain", "finetune", "meta")
FINE_TUNING_STAGES = ("finetune", "meta")  # both start from the last pre-training (or --init_checkpoint)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A stage's length and learning rate: lr, times 0.1 at each epoch of lr_steps."""

    epochs: int
    lr: float
    lr_steps: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run; the field names are the flag names (`python -m mvcom_tf.train --helpfull`)."""

    # Data.
    train_data: str = option("", "Training dataset folder (TFRecord schema v1 shards + dataset.json); required.")
    meta_data: str = option("", "Meta set folder (variation labels needed); required by --stage=meta.")
    eval_data: tuple[str, ...] = option((), "Benchmarks evaluated after each stage (and every --eval_every steps), "
                                            "comma-separated <kind>:<path> as in mvcom_tf.evaluate (kinds bin, "
                                            "pairs, csv, rfw, ijb, synthetic; a bare path is a synthetic test "
                                            "split); empty: no evaluation.")
    train_sampling: str = option("natural", "How training batches are drawn: natural (every image once an epoch) or "
                                            "balanced (images kept at random so that the classes of each variation "
                                            "factor come about equally often: the bias study's resample reference).",
                                 choices=("natural", "balanced"))
    image_size: int = option(112, "Input size in pixels (square, divisible by 16).", lower=16)
    shuffle_buffer: int = option(20_000, "Records in the shuffle buffer.", lower=1)
    synth_blur_prob: float = option(0.0, "Probability of blurring a training or meta image (Gaussian, blur class "
                                         "1-3 uniformly); its blur label becomes the class applied.",
                                    lower=0.0, upper=1.0)
    synth_occlusion_prob: float = option(0.0, "Probability of occluding a training or meta image (occluder type "
                                              "1-4 uniformly); its occlusion label becomes the type applied.",
                                         lower=0.0, upper=1.0)
    # Model.
    backbone: str = option("iresnet100", "Embedding network.",
                           choices=("iresnet18", "iresnet34", "iresnet50", "iresnet100"))
    width_multiplier: float = option(1.0, "Multiplies the stage widths 64-128-256-512.", lower=0.01)
    embedding_size: int = option(512, "Embedding dimension.", lower=2)
    dropout: float = option(0.0, "Dropout before the embedding layer.", lower=0.0, upper=0.99)
    sync_bn: bool = option(False, "Synchronise BatchNorm statistics across replicas.")
    head_sharding: str = option("replicated", "Identity head centres: replicated on every replica, or sharded (each "
                                              "replica holds its contiguous share of the classes, as insightface's "
                                              "partial_fc_v2; README, \"Millions of identities\").",
                                choices=("replicated", "sharded"))
    partial_fc_rate: float = option(1.0, "Partial FC: the share of its classes each replica scores per step, its "
                                         "positives always among them (1.0: every class); needs "
                                         "--head_sharding=sharded.", lower=0.001, upper=1.0)
    # Identity loss and margins.
    loss: str = option("cosface", "Margin loss of the identity head.", choices=("cosface", "arcface"))
    margin: float = option(0.35, "Margin m: the constant margin of pre-training and m_base of the meta prior.",
                           lower=0.0)
    scale: float = option(64.0, "Logit scale s (the 32-px demo uses 32: README).", lower=0.0)
    margin_prior: str = option("volume", "Meta stage: per-identity margin prior; volume: m_y = m * (n_ref / n_y) "
                                         "** power, clipped (METHOD.md).", choices=("constant", "volume"))
    margin_prior_power: float = option(0.25, "Power p of the volume prior (0 gives the constant margin).", lower=0.0)
    margin_min: float = option(0.25, "Lower clip of the volume prior.")
    margin_max: float = option(0.45, "Upper clip of the volume prior.")
    # Optimisation (the pretrain stage's schedule: seed Sec. C).
    batch_size: int = option(512, "Global batch size (split over replicas).", lower=1)
    epochs: int = option(30, "Epochs of the pretrain stage.", lower=1)
    max_steps: int = option(0, "Stop a stage after this many steps (0: no limit).", lower=0)
    lr: float = option(0.1, "Initial learning rate of the pretrain stage.", lower=0.0)
    lr_steps: tuple[float, ...] = option((14.0, 20.0, 23.0), "Epochs of the pretrain stage (may be fractional) at "
                                                             "which the learning rate is multiplied by 0.1.")
    momentum: float = option(0.9, "SGD momentum.", lower=0.0)
    weight_decay: float = option(5e-4, "SGD weight decay (Keras' decoupled form: w -= lr * wd * w).", lower=0.0)
    # MvCoM meta fine-tuning (--stage=meta): its own schedule, as seed Sec. C fine-tunes after pre-training.
    meta_epochs: int = option(18, "Epochs of the meta stage.", lower=1)
    meta_lr: float = option(0.001, "Initial learning rate of the meta stage.", lower=0.0)
    meta_lr_steps: tuple[float, ...] = option((8.0, 14.0, 16.0), "Epochs of the meta stage at which its learning "
                                                                 "rate is multiplied by 0.1.")
    meta_batch_size: int = option(0, "Meta batch size |V| (global); 0: the training batch size.", lower=0)
    meta_lr_tau: float = option(1000.0, "Step size tau of the residual update (Eq. 13); chosen by the spread of r "
                                        "it gives (README, \"Choosing tau\").", lower=0.0)
    meta_inner_lr: float = option(0.0, "Step size eta of the pseudo update (Eq. 12); 0: the current lr.", lower=0.0)
    residual_max: float = option(0.2, "Residuals r are clipped to [-residual_max, residual_max].", lower=0.0)
    meta_scope: str = option("all", "What the pseudo update changes: all: the whole backbone (the paper); head: "
                                    "only the output block (cheap approximation).", choices=("all", "head"))
    factor_weights: tuple[float, ...] = option((1.0, 1.0, 1.0, 1.0), f"Weights of the residuals {FACTOR_LIST} (0 "
                                                                      "switches a factor off).", length=4)
    meta_objective: str = option("variation", "What the residuals descend on the meta batch: variation (Eq. 13, the "
                                              "paper: the variation classifiers' losses) or verification (ours: a "
                                              "contrastive loss over P identities x K images, every class of a "
                                              "factor weighted equally; docs/method.md).",
                                 choices=("variation", "verification"))
    meta_images_per_identity: int = option(4, "K of the verification objective's P x K meta batch (its images of "
                                              "one identity are its positives).", lower=2)
    meta_sampling: str = option("hard", "Meta batch rule: hard keeps the pool's samples rarest under the training "
                                        "batch's label histograms; random takes the batch as drawn.",
                                choices=("hard", "random"))
    meta_pool_factor: int = option(4, "Hard sampling draws a pool of this many times |V|.", lower=1)
    variation_warmup_steps: int = option(20, "Meta stage: steps that train only the variation heads first.",
                                         lower=0)
    variation_lr: float = option(0.01, "Learning rate of the variation heads (SGD, same momentum).", lower=0.0)
    head_warmup_steps: int = option(0, "Meta stage: steps that first train only the identity head, the backbone "
                                       "frozen with BatchNorm in inference mode (a model imported without its class "
                                       "centres; README, \"Start from a published model\").", lower=0)
    head_warmup_lr: float = option(0.1, "Learning rate of the identity head's warm-up (SGD, same momentum).",
                                   lower=0.0)
    oracle_margin_deltas: tuple[float, ...] = option(
        (0.0, 0.0, 0.0, 0.0), "Meta stage, a reference for the bias study (benchmarks/bias.py), not a method: add "
        f"delta_k to a sample's margin when its ground-truth class of factor k {FACTOR_LIST} is not that factor's "
        "most frequent class in --train_data; use with --meta_lr_tau=0.", length=4)
    # The run.
    stage: tuple[str, ...] = option(("pretrain",), "Stages to run in order: pretrain (CosFace), finetune (CosFace "
                                                   "fine-tuning with the meta stage's schedule and batches: the "
                                                   "control MvCoM is credited against), meta (MvCoM).")
    model_dir: str = option("runs/train", "Run folder: checkpoints/, tensorboard/, flags.txt, metrics.json, "
                                          "export/. Re-running with the same folder resumes.")
    init_checkpoint: str = option("", "Checkpoint (or folder) whose backbone and identity head start the first "
                                      "stage; a finetune or meta stage after a pretrain stage of the same run "
                                      "starts from it.")
    strategy: str = option("default", "tf.distribute strategy: mirrored on one host, multi_worker from TF_CONFIG.",
                           choices=("default", "mirrored", "multi_worker"))
    cpu_replicas: int = option(0, "Split the CPU into this many logical devices (testing MirroredStrategy without "
                                  "GPUs); 0: leave it whole.", lower=0)
    seed: int = option(0, "Seed of initialisation, data order and augmentation.")
    deterministic: bool = option(True, "tf.config.experimental.enable_op_determinism (resumed runs then end with "
                                       "the same weights as uninterrupted ones; may be slower on GPUs).")
    checkpoint_every: int = option(2000, "Steps between checkpoints.", lower=1)
    keep_checkpoints: int = option(3, "Checkpoints kept per stage.", lower=1)
    log_every: int = option(100, "Steps between progress lines and TensorBoard scalars.", lower=1)
    eval_batch_size: int = option(256, "Batch size of evaluation.", lower=1)
    eval_every: int = option(0, "Steps between evaluations during a stage (0: only after it).", lower=0)
    nan_policy: str = option("stop", "A NaN or Inf loss: stop (the run ends naming the step and the last good "
                                     "checkpoint) or skip (such steps change nothing and are counted).",
                             choices=("stop", "skip"))
    debug_nan_step: int = option(-1, "Fault drill: the training images of this global step are replaced by NaN, "
                                     "to try --nan_policy (-1: off).", lower=-1)
    jit_compile: bool = option(False, "Compile the training and meta steps with XLA (--strategy=default only: the "
                                      "distributed steps' merge_calls do not compile).")
    steps_per_execution: int = option(1, "Training steps per call of the compiled step (a tf.while_loop inside one "
                                         "tf.function, as Keras' compile(steps_per_execution=...)). Calls end at "
                                         "every step where the loop logs, saves, evaluates or changes epoch, so "
                                         "runs take the same steps with any value.", lower=1)
    mixed_precision: str = option("none", "Compute in bfloat16 or float16 with float32 weights (Keras mixed_<dtype> "
                                          "policy); the embedding, margin logits, variation heads and meta-gradient "
                                          "stay float32; float16 adds dynamic loss scaling (pretrain stage only).",
                                  choices=("none", "bfloat16", "float16"))
    export_dir: str = option("", "SavedModel folder; empty: <model_dir>/export.")
    export_tflite: bool = option(False, "Also write <export_dir>_tflite/embedding_{float,int8}.tflite (float32, "
                                        "and dynamic-range int8 weights).")
    export_onnx: bool = option(False, "Also write <export_dir>_onnx/embedding_{float,int8}.onnx (tf2onnx, opset "
                                      "17; int8: dynamic-range int8 weights).")

    @property
    def global_meta_batch(self) -> int:
        """|V| over all replicas: --meta_batch_size, or the training batch size."""
        return self.meta_batch_size or self.batch_size
