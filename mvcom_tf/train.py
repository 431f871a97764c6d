"""Train a face-recognition model: `python -m mvcom_tf.train [--flagfile=flags/<recipe>.cfg] [--flag=value ...]`.

The defaults are the paper's (IResNet-100, 512-d, s = 64, CosFace pre-training only); the
recipes in flags/ set the rest. Without --train_data or a flagfile it runs the CPU demo,
flags/demo.cfg, with the given flags on top: it makes the synthetic data under data/synthetic/
if missing, pre-trains with CosFace, fine-tunes with MvCoM, evaluates on the synthetic test
pairs and exports a SavedModel under runs/demo/.
"""

from __future__ import annotations

import os
import posixpath
import sys

from absl import app, flags, logging

from mvcom_tf.cli import define_command_flags, exit_now
from mvcom_tf.config import TrainConfig
from mvcom_tf.config_flags import DEMO_FLAGFILE, config_from_flags, define_flags, flag_sources

DEMO_DATA = "data/synthetic"
FLAGS = flags.FLAGS


def _make_demo_data_if_missing(config: TrainConfig) -> None:
    """Renders the demo's synthetic splits when a data flag names one of them and it is missing."""
    demo_folders = {f"{DEMO_DATA}/{split}" for split in ("train", "meta", "test")}
    needed = {config.data.train_data, config.data.meta_data, *config.evaluation.benchmarks} & demo_folders
    if not needed or all(os.path.exists(posixpath.join(path, "dataset.json")) for path in needed):
        return
    from mvcom_tf.data import synthetic

    logging.info("making the demo's synthetic data under %s/ (once)", DEMO_DATA)
    synthetic.write_demo_data(DEMO_DATA, config.model.image_size, config.runtime.seed)


def main(argv: list[str], command: tuple[str, ...] = ()) -> int:
    """Trains the run the parsed flags describe; `command` is the flag list, to say where each flag came from."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = config_from_flags(FLAGS)
    if not config.data.train_data:
        raise app.UsageError("--train_data is required (a flagfile without it names no training data)")
    for source, names in flag_sources(list(command)).items():
        logging.info("flags from %s: %s", source, ", ".join(names))
    logging.info("every other flag has its default (python -m mvcom_tf.train --helpfull)")
    from mvcom_tf.training import runtime

    runtime.configure(config.runtime)  # before TensorFlow runs its first op
    from mvcom_tf.data.tfrecord import DatasetError
    from mvcom_tf.training.checkpoints import CheckpointError, SaveFailed
    from mvcom_tf.stages.build import build_stage, summarise_run
    from mvcom_tf.training import distribute, faults, loop

    try:
        if distribute.is_chief():  # other workers of a multi-worker run write nothing to the run folder
            _make_demo_data_if_missing(config)
            import tensorflow as tf

            tf.io.gfile.makedirs(config.runtime.model_dir)
            with tf.io.gfile.GFile(posixpath.join(config.runtime.model_dir, "flags.txt"), "w") as f:
                f.write(FLAGS.flags_into_string())
        metrics = loop.run(config, build_stage, summarise_run)
    except (DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except faults.NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except faults.WorkerLost as error:
        print(f"error: {error}", file=sys.stderr)
        return 4
    except faults.DamagedInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 5
    except SaveFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 6
    except faults.Preempted as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return 0
    exported = f"SavedModel in {metrics['export_dir']}" if "export_dir" in metrics else "no SavedModel (--noexport)"
    logging.info("run folder %s: checkpoints/, tensorboard/ (tensorboard --logdir %s/tensorboard), flags.txt, "
                 "metrics.json; %s", config.runtime.model_dir, config.runtime.model_dir, exported)
    if "accuracy" in metrics:
        logging.info("verification accuracy %.4f", metrics["accuracy"])
    return 0


def with_demo_unless_data(argv: list[str]) -> list[str]:
    """The command line, with flags/demo.cfg first when it names neither --train_data nor a flagfile:
    `python -m mvcom_tf.train --cpu_replicas=2` is the demo on two replicas (its own flags win)."""
    names = {arg.lstrip("-").split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")}
    if names & {"train_data", "flagfile", "help", "helpfull", "helpshort", "helpxml", "h", "?"}:
        return argv
    return [argv[0], f"--flagfile={DEMO_FLAGFILE}", *argv[1:]]


def run_main() -> None:
    """The console script `mvcom-train` (and `python -m mvcom_tf.train`)."""
    # TensorFlow's C++ logging repeats harmless start-up and tf.data notices that hide the
    # progress lines; Python exceptions still show. Set TF_CPP_MIN_LOG_LEVEL to see them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    define_command_flags(lambda: define_flags(FLAGS), __doc__)
    argv = with_demo_unless_data(sys.argv)
    app.run(lambda args: exit_now(main(args, command=tuple(argv[1:]))), argv=argv)


if __name__ == "__main__":
    run_main()
