"""TrainConfig: everything a training run reads, with its defaults (the paper's and insightface's).

A run's settings come in parts, one per consumer: the data, the model, the identity head and
its margins, the optimizer, a schedule per stage, the meta step, evaluation, export and the
runtime. Each builder takes only its part (`MetaStep` the meta part). The parts are also the
one source of the training flags: `mvcom_tf.config_flags` defines and validates an absl flag
per field from its type, default and metadata, under the field's flag name (its own name, or
the `flag` it declares: `MetaConfig.tau` is `--meta_lr_tau`), so flag names stay flat and every
flagfile keeps working. The CPU demo is not the default; it is `flags/demo.cfg`, which
`python -m mvcom_tf.train` applies when given neither --train_data nor a flagfile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

FACTOR_LIST = "(pose, occlusion, blur, ethnicity)"
# What --stage may list: CosFace pre-training; CosFace fine-tuning, the control MvCoM is measured against (the
# meta stage's schedule, batches and warm-ups with a constant margin and no residuals); MvCoM fine-tuning.
STAGE_NAMES = ("pretrain", "finetune", "meta")
FINE_TUNING_STAGES = ("finetune", "meta")  # both start from the last pre-training (or --init_checkpoint)


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           aliases: dict[str, str] | None = None, lower: float | None = None, upper: float | None = None,
           length: int | None = None) -> Any:
    """A config field: its default, the flag's help text and name (default: the field's), the bounds the flag
    validates, and old spellings of its choices that it still accepts (`aliases`: old -> current)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                                          "aliases": aliases or {}, "lower": lower, "upper": upper,
                                                          "length": length})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the stages read and how batches are drawn and augmented."""

    train_data: str = option("", "Training dataset folder (TFRecord schema v1 shards + dataset.json); required.")
    meta_data: str = option("", "Meta set folder (variation labels needed); required by --stage=meta.")
    train_sampling: str = option("natural", "How training batches are drawn: natural (every image once an epoch) or "
                                            "balanced (images kept at random so that the classes of each variation "
                                            "factor come about equally often: the bias study's resample reference); "
                                            "the meta stage's (pre-training and the finetune control draw "
                                            "naturally).",
                                 choices=("natural", "balanced"))
    shuffle_buffer: int = option(20_000, "Records in the shuffle buffer.", lower=1)
    skip_corrupt_records: bool = option(False, "Read a damaged shard (truncated copy, corrupt record) up to its first "
                                               "bad record and train on, counting the records lost in metrics.json "
                                               "and the progress line; without it the run stops naming the shard.")
    synth_blur_prob: float = option(0.0, "Probability of blurring a training or meta image (Gaussian, blur class "
                                         "1-3 uniformly); its blur label becomes the class applied.",
                                    lower=0.0, upper=1.0)
    synth_occlusion_prob: float = option(0.0, "Probability of occluding a training or meta image (occluder type "
                                              "1-4 uniformly); its occlusion label becomes the type applied.",
                                         lower=0.0, upper=1.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The embedding network and its input."""

    backbone: str = option("iresnet100", "Embedding network.",
                           choices=("iresnet18", "iresnet34", "iresnet50", "iresnet100"))
    image_size: int = option(112, "Input size in pixels (square, divisible by 16): every image is read at it.",
                             lower=16)
    width_multiplier: float = option(1.0, "Multiplies the stage widths 64-128-256-512.", lower=0.01)
    embedding_size: int = option(512, "Embedding dimension.", lower=2)
    dropout: float = option(0.0, "Dropout before the embedding layer.", lower=0.0, upper=0.99)
    sync_bn: bool = option(False, "Synchronise BatchNorm statistics across replicas.")
    fused_bn: bool = option(False, "Train BatchNorm on TensorFlow's fused kernel (FusedBatchNormV3) in the compute "
                                   "dtype: same outputs and statistics to rounding, a faster step "
                                   "(docs/benchmarks.md); with --sync_bn only on one replica.")


@dataclasses.dataclass(frozen=True)
class IdentityHeadConfig:
    """The identity head (the class centres), its margin loss and the per-identity margin prior."""

    loss: str = option("cosface", "Margin loss of the identity head.", choices=("cosface", "arcface"))
    margin: float = option(0.35, "Margin m: the constant margin of pre-training and m_base of the meta prior.",
                           lower=0.0)
    scale: float = option(64.0, "Logit scale s (the 32-px demo uses 16: docs/demo.md).", lower=0.0)
    sharding: str = option("replicated", "Identity head centres: replicated on every replica, or sharded (each "
                                         "replica holds its contiguous share of the classes, as insightface's "
                                         "partial_fc_v2; docs/scale.md).",
                           flag="head_sharding", choices=("replicated", "sharded"))
    partial_fc_rate: float = option(1.0, "Partial FC: the share of its classes each replica scores per step, its "
                                         "positives always among them (1.0: every class); needs "
                                         "--head_sharding=sharded.", lower=0.001, upper=1.0)
    margin_prior: str = option("volume", "Meta stage: per-identity margin prior; volume: m_y = m * (n_ref / n_y) "
                                         "** power, clipped (METHOD.md).", choices=("constant", "volume"))
    margin_prior_power: float = option(0.25, "Power p of the volume prior (0 gives the constant margin).", lower=0.0)
    margin_min: float = option(0.25, "Lower clip of the volume prior.")
    margin_max: float = option(0.45, "Upper clip of the volume prior.")


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
    """How much each training sample counts in the identity loss (the worst-group methods; docs/method.md)."""

    loss_weighting: str = option("none", "Per-sample loss weights: none; balanced (resampling's ratios as weights: "
                                         "mean over factors of 1 / (K p(class)), mean 1 over the split); error_set "
                                         "(JTT: the images of --error_set up-weighted by --error_set_upweight, "
                                         "normalised to mean 1); groupdro (GroupDRO: online exponential weights on "
                                         "each factor's classes' losses, step --groupdro_step_size).",
                                 choices=("none", "balanced", "error_set", "groupdro"))
    error_set: str = option("", "--loss_weighting=error_set: a file listing the `image/source` of each training "
                                "image the first model got wrong (tools/jtt_error_set.py writes it).")
    error_set_upweight: float = option(5.0, "--loss_weighting=error_set: how many times an error-set image counts "
                                            "(JTT's lambda_up).", lower=1.0)
    groupdro_step_size: float = option(0.01, "--loss_weighting=groupdro: eta_q of q_g <- q_g exp(eta_q L_g).",
                                       lower=0.0)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """SGD and the batch it steps on (every stage)."""

    batch_size: int = option(512, "Global batch size (split over replicas).", lower=1)
    momentum: float = option(0.9, "SGD momentum.", lower=0.0)
    weight_decay: float = option(5e-4, "SGD weight decay (Keras' decoupled form: w -= lr * wd * w).", lower=0.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A stage's length and learning rate: lr, times 0.1 at each epoch of lr_steps (the pretrain stage's: seed
    Sec. C)."""

    epochs: int = option(30, "Epochs of the pretrain stage.", lower=1)
    lr: float = option(0.1, "Initial learning rate of the pretrain stage.", lower=0.0)
    lr_steps: tuple[float, ...] = option((14.0, 20.0, 23.0), "Epochs of the pretrain stage (may be fractional) at "
                                                             "which the learning rate is multiplied by 0.1.")


@dataclasses.dataclass(frozen=True)
class FineTuneSchedule(Schedule):
    """The finetune and meta stages' schedule: their own, as seed Sec. C fine-tunes after pre-training."""

    epochs: int = option(18, "Epochs of the meta stage (and of finetune, its control).", flag="meta_epochs", lower=1)
    lr: float = option(0.001, "Initial learning rate of the meta stage.", flag="meta_lr", lower=0.0)
    lr_steps: tuple[float, ...] = option((8.0, 14.0, 16.0), "Epochs of the meta stage at which its learning rate is "
                                                            "multiplied by 0.1.", flag="meta_lr_steps")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """MvCoM's meta step (--stage=meta) and the meta stage's warm-ups; the bias study's oracle margins."""

    batch_size: int = option(0, "Meta batch size |V| (global); 0: the training batch size.", flag="meta_batch_size",
                             lower=0)
    tau: float = option(1000.0, "Step size tau of the residual update (Eq. 13); chosen by the spread of r it gives "
                                "(docs/method.md, \"Choosing tau\").", flag="meta_lr_tau", lower=0.0)
    inner_lr: float = option(0.0, "Step size eta of the pseudo update (Eq. 12); 0: the current lr.",
                             flag="meta_inner_lr", lower=0.0)
    residual_max: float = option(0.2, "Residuals r are clipped to [-residual_max, residual_max].", lower=0.0)
    scope: str = option("all", "What the pseudo update changes: all: the whole backbone (the paper); output_block: "
                               "only the backbone's output block, BN-Dropout-Dense-BN (cheap approximation; `head` "
                               "is its old name, still accepted).", flag="meta_scope",
                        choices=("all", "output_block"), aliases={"head": "output_block"})
    factor_weights: tuple[float, ...] = option((1.0, 1.0, 1.0, 1.0), f"Weights of the residuals {FACTOR_LIST} (0 "
                                                                      "switches a factor off).", length=4)
    objective: str = option("variation", "What the residuals descend on the meta batch: variation (Eq. 13, the "
                                         "paper: the variation classifiers' losses) or verification (ours: a "
                                         "contrastive loss over P identities x K images, every class of a factor "
                                         "weighted equally; docs/method.md).", flag="meta_objective",
                            choices=("variation", "verification"))
    images_per_identity: int = option(4, "K of the verification objective's P x K meta batch (its images of one "
                                         "identity are its positives).", flag="meta_images_per_identity", lower=2)
    sampling: str = option("hard", "Meta batch rule: hard keeps the pool's samples rarest under the training batch's "
                                   "label histograms; random takes the batch as drawn.", flag="meta_sampling",
                           choices=("hard", "random"))
    pool_factor: int = option(4, "Hard sampling draws a pool of this many times |V|.", flag="meta_pool_factor",
                              lower=1)
    variation_warmup_steps: int = option(20, "Meta stage: steps that train only the variation heads first.",
                                         lower=0)
    variation_lr: float = option(0.01, "Learning rate of the variation heads (SGD, same momentum).", lower=0.0)
    head_warmup_steps: int = option(0, "Meta stage: steps that first train only the identity head, the backbone "
                                       "frozen with BatchNorm in inference mode (a model imported without its class "
                                       "centres; docs/pretrained.md).", lower=0)
    head_warmup_lr: float = option(0.1, "Learning rate of the identity head's warm-up (SGD, same momentum).",
                                   lower=0.0)
    target: str = option("margins", "What the meta-gradient learns per training sample: margins (the paper: residuals "
                                    "added to the margin, Eq. 13), weights (a loss weight per sample, as learning to "
                                    "reweight: max(-dL_meta/d eps, 0) normalised over the batch), or both, from one "
                                    "pseudo-update (docs/method.md).", flag="meta_target",
                         choices=("margins", "weights", "both"))
    weight_mix: float = option(1.0, "--meta_target=weights/both: a sample's loss weight is (1 - mix) + mix * its "
                                    "learned weight (1: learning to reweight's weights alone; 0: uniform).",
                               flag="meta_weight_mix", lower=0.0, upper=1.0)
    weight_power: float = option(1.0, "--meta_target=weights/both: the learned weight is max(-dL_meta/d eps, 0) to "
                                      "this power, then normalised (1: learning to reweight's; above 1 sharper: the "
                                      "samples that help the meta batch most take more of the batch's weight).",
                                 flag="meta_weight_power", lower=0.0)
    oracle_margin_deltas: tuple[float, ...] = option(
        (0.0, 0.0, 0.0, 0.0), "Meta stage, a reference for the bias study (benchmarks/bias.py), not a method: add "
        f"delta_k to a sample's margin when its ground-truth class of factor k {FACTOR_LIST} is not that factor's "
        "most frequent class in --train_data; use with --meta_lr_tau=0.", length=4)
    oracle_side: str = option("tail", "Where the oracle's deltas go: tail (delta_k added when a sample's class of "
                                      "factor k is not the head class) or head (delta_k subtracted when it is: the "
                                      "head's margins lowered instead of the tail's raised).",
                              choices=("tail", "head"))

    @property
    def group_size(self) -> int:
        """Images of one identity drawn together into the meta batch: K for the verification objective, else 1."""
        return self.images_per_identity if self.objective == "verification" else 1


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """The benchmarks a run evaluates itself on, and when."""

    benchmarks: tuple[str, ...] = option((), "Benchmarks evaluated after each stage (and every --eval_every steps), "
                                             "comma-separated <kind>:<path> as in mvcom_tf.evaluate (kinds bin, "
                                             "pairs, csv, rfw, ijb, synthetic; a bare path is a synthetic test "
                                             "split); empty: no evaluation.", flag="eval_data")
    batch_size: int = option(256, "Batch size of evaluation.", flag="eval_batch_size", lower=1)
    every: int = option(0, "Steps between evaluations during a stage (0: only after it).", flag="eval_every",
                        lower=0)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What the run writes for serving once its last stage ends."""

    saved_model: bool = option(True, "Export the backbone as a SavedModel when the run ends; --noexport keeps only "
                                     "the checkpoints and metrics.json (sweeps: re-running the command with --export "
                                     "exports a finished run).", flag="export")
    dir: str = option("", "SavedModel folder; empty: <model_dir>/export.", flag="export_dir")
    tflite: bool = option(False, "Also write <export_dir>_tflite/embedding_{float,int8}.tflite (float32, and "
                                 "dynamic-range int8 weights).", flag="export_tflite")
    onnx: bool = option(False, "Also write <export_dir>_onnx/embedding_{float,int8}.onnx (tf2onnx, opset 17; int8: "
                               "dynamic-range int8 weights).", flag="export_onnx")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """The run itself: its stages and folder, devices and strategy, seeds, saves, logs and fault handling."""

    stages: tuple[str, ...] = option(("pretrain",), "Stages to run in order: pretrain (CosFace), finetune (CosFace "
                                                    "fine-tuning with the meta stage's schedule and batches: the "
                                                    "control MvCoM is credited against), meta (MvCoM).",
                                     flag="stage")
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
    deterministic: bool = option(True, "tf.config.experimental.enable_op_determinism and one op at a time "
                                       "(inter-op parallelism 1): resumed runs end with the same weights as "
                                       "uninterrupted ones, on a busy machine too; may be slower.")
    max_steps: int = option(0, "Stop a stage after this many steps (0: no limit).", lower=0)
    checkpoint_every: int = option(2000, "Steps between checkpoints.", lower=1)
    keep_checkpoints: int = option(3, "Checkpoints kept per stage.", lower=1)
    log_every: int = option(100, "Steps between progress lines and TensorBoard scalars.", lower=1)
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One run, in parts (`python -m mvcom_tf.train --helpfull` lists every part's flags)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    head: IdentityHeadConfig = dataclasses.field(default_factory=IdentityHeadConfig)
    weighting: WeightingConfig = dataclasses.field(default_factory=WeightingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    pretrain: Schedule = dataclasses.field(default_factory=Schedule)
    finetune: FineTuneSchedule = dataclasses.field(default_factory=FineTuneSchedule)
    meta: MetaConfig = dataclasses.field(default_factory=MetaConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    @classmethod
    def from_flags(cls, **values: Any) -> TrainConfig:
        """A config from flag-named values (`batch_size=64, meta_lr_tau=10.0`), the rest at their defaults."""
        return cls().with_flags(**values)

    def with_flags(self, **values: Any) -> TrainConfig:
        """This config with the fields named by these flags replaced."""
        changes: dict[str, dict[str, Any]] = {}
        for name, value in values.items():
            part, field = FLAG_FIELDS[name]
            aliases = field.metadata["aliases"]  # an old spelling of a choice, as its current one
            changes.setdefault(part, {})[field.name] = aliases.get(value, value) if aliases else value
        return dataclasses.replace(self, **{part: dataclasses.replace(getattr(self, part), **fields)
                                            for part, fields in changes.items()})

    def schedule(self, stage: str) -> Schedule:
        """The stage's schedule: --epochs/--lr/--lr_steps for pretrain, --meta_epochs/... for finetune and meta."""
        return self.finetune if stage in FINE_TUNING_STAGES else self.pretrain

    @property
    def global_meta_batch(self) -> int:
        """|V| over all replicas: --meta_batch_size, or the training batch size."""
        return self.meta.batch_size or self.optimizer.batch_size


def flag_fields() -> Iterator[tuple[str, str, dataclasses.Field]]:
    """(flag name, part name, field) for every field of every part of TrainConfig, in declaration order."""
    for part in dataclasses.fields(TrainConfig):
        for field in dataclasses.fields(part.default_factory):
            yield field.metadata["flag"] or field.name, part.name, field


def _by_flag() -> dict[str, tuple[str, dataclasses.Field]]:
    table: dict[str, tuple[str, dataclasses.Field]] = {}
    for flag, part, field in flag_fields():
        if flag in table:
            raise TypeError(f"two config fields are both --{flag}")
        table[flag] = (part, field)
    return table


# Flag name -> (part, field): how the flat flags map onto the parts.
FLAG_FIELDS = _by_flag()
