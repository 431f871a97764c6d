"""Train a face-recognition model: `python -m mvcom_tf.train [--flagfile=flags/<recipe>.cfg] [--flag=value ...]`.

The defaults are the CPU demo: with no flags it makes the synthetic data under
data/synthetic/ if missing, pre-trains with CosFace, fine-tunes with MvCoM, evaluates on the
synthetic test pairs and exports a SavedModel under runs/demo/. The recipes in flags/ set
every flag the paper's configuration needs.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import sys

from absl import app, flags, logging

from mvcom_tf.config import STAGES, TrainConfig
from mvcom_tf.evaluation.benchmark_spec import KINDS, parse_benchmark

DEMO_DATA = "data/synthetic"

# Data.
flags.DEFINE_string("train_data", f"{DEMO_DATA}/train", "Training dataset folder (TFRecord schema v1 shards + "
                    "dataset.json). The default synthetic folder is generated when missing.")
flags.DEFINE_string("meta_data", f"{DEMO_DATA}/meta", "Meta set folder for --stage=meta (variation labels needed).")
flags.DEFINE_list("eval_data", [f"{DEMO_DATA}/test"], "Benchmarks evaluated after each stage (and every "
                  "--eval_every steps), comma-separated <kind>:<path> as in mvcom_tf.evaluate (kinds bin, pairs, "
                  "rfw, ijb, synthetic; a bare path is a synthetic test split); empty: no evaluation.")
flags.DEFINE_bool("jit_compile", False, "Compile the training and meta steps with XLA (--strategy=default only: "
                  "the distributed steps' merge_calls do not compile).")
flags.DEFINE_integer("steps_per_execution", 1, "Training steps per call of the compiled step (a tf.while_loop "
                     "inside one tf.function, as Keras' compile(steps_per_execution=...)), so that small steps are "
                     "not dominated by Python dispatch. Calls end at every step where the loop logs, saves, "
                     "evaluates or changes epoch, so runs take the same steps with any value.", lower_bound=1)
flags.DEFINE_enum("mixed_precision", "none", ["none", "bfloat16", "float16"], "Compute in bfloat16 or float16 "
                  "with float32 weights (Keras mixed_<dtype> policy); the embedding, margin logits, variation heads "
                  "and meta-gradient stay float32; float16 adds dynamic loss scaling (pretrain stage only).")
flags.DEFINE_enum("nan_policy", "stop", ["stop", "skip"], "A NaN or Inf loss: stop (the run ends naming the "
                  "step and the last good checkpoint) or skip (such steps change nothing and are counted).")
flags.DEFINE_integer("eval_every", 0, "Steps between evaluations during a stage (0: only after it).",
                     lower_bound=0)
flags.DEFINE_integer("image_size", 32, "Input size in pixels (square, divisible by 16); 112 for the paper.",
                     lower_bound=16)
flags.DEFINE_integer("shuffle_buffer", 20_000, "Records in the shuffle buffer.", lower_bound=1)
flags.DEFINE_float("synth_blur_prob", 0.0, "Probability of blurring a training or meta image (Gaussian, blur "
                   "class 1-3 uniformly); its blur label becomes the class applied.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("synth_occlusion_prob", 0.0, "Probability of occluding a training or meta image (occluder "
                   "type 1-4 uniformly); its occlusion label becomes the type applied.", lower_bound=0.0,
                   upper_bound=1.0)
# Model.
flags.DEFINE_enum("backbone", "iresnet18", ["iresnet18", "iresnet34", "iresnet50", "iresnet100"], "Embedding network.")
flags.DEFINE_float("width_multiplier", 0.25, "Multiplies the stage widths 64-128-256-512 (1.0 for the paper).",
                   lower_bound=0.01)
flags.DEFINE_integer("embedding_size", 128, "Embedding dimension (512 for the paper).", lower_bound=2)
flags.DEFINE_float("dropout", 0.0, "Dropout before the embedding layer.", lower_bound=0.0, upper_bound=0.99)
flags.DEFINE_bool("sync_bn", False, "Synchronise BatchNorm statistics across replicas.")
# Identity loss and margins.
flags.DEFINE_enum("loss", "cosface", ["cosface", "arcface"], "Margin loss of the identity head.")
flags.DEFINE_float("margin", 0.35, "Margin m: the constant margin of pre-training and m_base of the meta prior.",
                   lower_bound=0.0)
flags.DEFINE_float("scale", 32.0, "Logit scale s (64 for the paper; the 32-px demo learns far better with 32: README).",
                   lower_bound=0.0)
flags.DEFINE_enum("margin_prior", "volume", ["constant", "volume"], "Meta stage: per-identity margin prior; "
                  "volume: m_y = m * (n_ref / n_y) ** power, clipped (METHOD.md).")
flags.DEFINE_float("margin_prior_power", 0.25, "Power p of the volume prior (0 gives the constant margin).",
                   lower_bound=0.0)
flags.DEFINE_float("margin_min", 0.25, "Lower clip of the volume prior.")
flags.DEFINE_float("margin_max", 0.45, "Upper clip of the volume prior.")
# Optimisation.
flags.DEFINE_integer("batch_size", 64, "Global batch size (split over replicas).", lower_bound=1)
flags.DEFINE_integer("epochs", 12, "Epochs of the pretrain stage.", lower_bound=1)
flags.DEFINE_integer("max_steps", 0, "Stop a stage after this many steps (0: no limit).", lower_bound=0)
flags.DEFINE_float("lr", 0.1, "Initial learning rate of the pretrain stage.", lower_bound=0.0)
flags.DEFINE_list("lr_steps", ["8", "11"], "Epochs of the pretrain stage (may be fractional) at which the learning "
                  "rate is multiplied by 0.1.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.", lower_bound=0.0)
flags.DEFINE_float("weight_decay", 5e-4, "SGD weight decay (Keras' decoupled form: w -= lr * wd * w).",
                   lower_bound=0.0)
# MvCoM meta fine-tuning (--stage=meta): its own schedule, as seed Sec. C fine-tunes after pre-training.
flags.DEFINE_integer("meta_epochs", 2, "Epochs of the meta stage.", lower_bound=1)
flags.DEFINE_float("meta_lr", 0.01, "Initial learning rate of the meta stage.", lower_bound=0.0)
flags.DEFINE_list("meta_lr_steps", [], "Epochs of the meta stage at which its learning rate is multiplied by 0.1.")
flags.DEFINE_integer("meta_batch_size", 0, "Meta batch size |V| (global); 0: the training batch size.", lower_bound=0)
flags.DEFINE_float("meta_lr_tau", 1000.0, "Step size tau of the residual update (Eq. 13); chosen by the spread of r "
                   "it gives (README, \"Choosing tau\").", lower_bound=0.0)
flags.DEFINE_float("meta_inner_lr", 0.0, "Step size eta of the pseudo update (Eq. 12); 0: the current lr.",
                   lower_bound=0.0)
flags.DEFINE_float("residual_max", 0.2, "Residuals r are clipped to [-residual_max, residual_max].", lower_bound=0.0)
flags.DEFINE_enum("meta_scope", "all", ["all", "head"], "What the pseudo update changes: all: the whole backbone "
                  "(the paper); head: only the output block (cheap approximation).")
flags.DEFINE_list("factor_weights", ["1", "1", "1", "1"], "Weights of the pose, occlusion, blur and ethnicity "
                  "residuals (0 switches a factor off).")
flags.DEFINE_enum("meta_sampling", "hard", ["hard", "random"], "Meta batch rule: hard keeps the pool's samples "
                  "rarest under the training batch's label histograms; random takes the batch as drawn.")
flags.DEFINE_integer("meta_pool_factor", 4, "Hard sampling draws a pool of this many times |V|.", lower_bound=1)
flags.DEFINE_integer("variation_warmup_steps", 20, "Meta stage: steps that train only the variation heads first.",
                     lower_bound=0)
flags.DEFINE_float("variation_lr", 0.01, "Learning rate of the variation heads (SGD, same momentum).",
                   lower_bound=0.0)
flags.DEFINE_integer("head_warmup_steps", 0, "Meta stage: steps that first train only the identity head, the "
                     "backbone frozen with BatchNorm in inference mode (a model imported without its class centres; "
                     "README, \"Start from a published model\").", lower_bound=0)
flags.DEFINE_float("head_warmup_lr", 0.1, "Learning rate of the identity head's warm-up (SGD, same momentum).",
                   lower_bound=0.0)
flags.DEFINE_list("oracle_margin_deltas", ["0", "0", "0", "0"], "Meta stage, a reference for the bias study "
                  "(benchmarks/bias.py), not a method: add delta_k to a sample's margin when its ground-truth class "
                  "of factor k (pose, occlusion, blur, ethnicity) is not that factor's most frequent class in "
                  "--train_data; use with --meta_lr_tau=0.")
# The run.
flags.DEFINE_list("stage", ["pretrain", "meta"], "Stages to run in order: pretrain (CosFace), meta (MvCoM).")
flags.DEFINE_string("model_dir", "runs/demo", "Run folder: checkpoints/, tensorboard/, flags.txt, metrics.json, "
                    "export/. Re-running with the same folder resumes.")
flags.DEFINE_string("init_checkpoint", "", "Checkpoint (or folder) whose backbone and identity head start the "
                    "first stage; a meta stage after a pretrain stage of the same run starts from it.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"], "tf.distribute strategy: "
                  "mirrored on one host, multi_worker from TF_CONFIG.")
flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many logical devices (testing MirroredStrategy "
                     "without GPUs); 0: leave it whole.", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of initialisation, data order and augmentation.")
flags.DEFINE_bool("deterministic", True, "tf.config.experimental.enable_op_determinism (resumed runs then end with "
                  "the same weights as uninterrupted ones; may be slower on GPUs).")
flags.DEFINE_integer("checkpoint_every", 200, "Steps between checkpoints.", lower_bound=1)
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept per stage.", lower_bound=1)
flags.DEFINE_integer("log_every", 20, "Steps between progress lines and TensorBoard scalars.", lower_bound=1)
flags.DEFINE_integer("eval_batch_size", 256, "Batch size of evaluation.", lower_bound=1)
flags.DEFINE_string("export_dir", "", "SavedModel folder; empty: <model_dir>/export.")
flags.DEFINE_bool("export_tflite", False, "Also write <export_dir>_tflite/embedding_{float,int8}.tflite (float32, and "
                  "dynamic-range int8 weights).")
flags.DEFINE_bool("export_onnx", False, "Also write <export_dir>_onnx/embedding_{float,int8}.onnx (tf2onnx, opset "
                  "17; int8: dynamic-range int8 weights).")

FLAGS = flags.FLAGS


def _float_list(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def _is_benchmark(spec: str) -> bool:
    try:
        parse_benchmark(spec)
    except ValueError:
        return False
    return True


flags.register_validator("lr_steps", _float_list, "--lr_steps must be a comma-separated list of epochs")
flags.register_validator("meta_lr_steps", _float_list, "--meta_lr_steps must be a comma-separated list of epochs")
flags.register_validator("factor_weights", lambda v: _float_list(v) and len(v) == 4,
                         "--factor_weights must be 4 numbers (pose, occlusion, blur, ethnicity)")
flags.register_validator("oracle_margin_deltas", lambda v: _float_list(v) and len(v) == 4,
                         "--oracle_margin_deltas must be 4 numbers (pose, occlusion, blur, ethnicity)")
flags.register_validator("stage", lambda v: bool(v) and all(s in STAGES for s in v) and len(set(v)) == len(v),
                         f"--stage must list some of {', '.join(STAGES)}, each once")
flags.register_validator("eval_data", lambda v: all(_is_benchmark(spec) for spec in v),
                         f"--eval_data entries must be <kind>:<path> with a kind among {', '.join(KINDS)}, "
                         "or a synthetic test split's folder")
flags.register_validator("image_size", lambda v: v % 16 == 0, "--image_size must be divisible by 16")
flags.register_multi_flags_validator(
    ["mixed_precision", "stage"], lambda f: not (f["mixed_precision"] == "float16" and "meta" in f["stage"]),
    "--mixed_precision=float16 trains the pretrain stage only (the meta step's second-order gradients are not "
    "loss-scaled): use --mixed_precision=bfloat16 with --stage=meta")
flags.register_multi_flags_validator(
    ["jit_compile", "strategy"], lambda f: not (f["jit_compile"] and f["strategy"] != "default"),
    "--jit_compile needs --strategy=default (one device per process)")
flags.register_multi_flags_validator(["margin_min", "margin_max"], lambda f: f["margin_min"] <= f["margin_max"],
                                     "--margin_min must not exceed --margin_max")


def config_from_flags() -> TrainConfig:
    """The parsed flags as a TrainConfig."""
    values = {field.name: getattr(FLAGS, field.name) for field in dataclasses.fields(TrainConfig)}
    values["lr_steps"] = tuple(float(v) for v in FLAGS.lr_steps)
    values["meta_lr_steps"] = tuple(float(v) for v in FLAGS.meta_lr_steps)
    values["factor_weights"] = tuple(float(v) for v in FLAGS.factor_weights)
    values["oracle_margin_deltas"] = tuple(float(v) for v in FLAGS.oracle_margin_deltas)
    values["stage"] = tuple(FLAGS.stage)
    values["eval_data"] = tuple(FLAGS.eval_data)
    values["meta_batch_size"] = FLAGS.meta_batch_size or FLAGS.batch_size
    return TrainConfig(**values)


def parse_config(argv: list[str]) -> TrainConfig:
    """Parses flag strings (e.g. ["--backbone=iresnet18"]) on top of the defaults: for tests and notebooks."""
    FLAGS.unparse_flags()
    FLAGS(["mvcom_tf.train", *argv])
    return config_from_flags()


def _configure_devices(config: TrainConfig) -> None:
    import tensorflow as tf

    if config.cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * config.cpu_replicas)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    import keras

    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{config.mixed_precision}")


def _make_demo_data_if_missing(config: TrainConfig) -> None:
    """Renders the demo's synthetic splits when a data flag names one of them and it is missing."""
    demo_folders = {f"{DEMO_DATA}/{split}" for split in ("train", "meta", "test")}
    needed = {config.train_data, config.meta_data, *config.eval_data} & demo_folders
    if not needed or all(os.path.exists(posixpath.join(path, "dataset.json")) for path in needed):
        return
    from mvcom_tf.data import synthetic

    logging.info("making the demo's synthetic data under %s/ (once)", DEMO_DATA)
    synthetic.write_demo_data(DEMO_DATA, config.image_size, config.seed)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_from_flags()
    _configure_devices(config)
    from mvcom_tf import loop  # TensorFlow starts here, after the device configuration
    from mvcom_tf.data.tfrecord import DatasetError

    try:
        if loop.is_chief():  # other workers of a multi-worker run write nothing to the run folder
            _make_demo_data_if_missing(config)
            import tensorflow as tf

            tf.io.gfile.makedirs(config.model_dir)
            with tf.io.gfile.GFile(posixpath.join(config.model_dir, "flags.txt"), "w") as f:
                f.write(FLAGS.flags_into_string())
        metrics = loop.run(config)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except loop.NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except loop.Preempted as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 0
    logging.info("run folder %s: checkpoints/, tensorboard/ (tensorboard --logdir %s/tensorboard), flags.txt, "
                 "metrics.json; SavedModel in %s", config.model_dir, config.model_dir, metrics["export_dir"])
    if "accuracy" in metrics:
        logging.info("verification accuracy %.4f", metrics["accuracy"])
    return 0


def run_main() -> None:
    # TensorFlow's C++ logging repeats harmless start-up and tf.data notices that hide the
    # progress lines; Python exceptions still show. Set TF_CPP_MIN_LOG_LEVEL to see them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)


if __name__ == "__main__":
    run_main()
