"""Writes JTT's error set: the training images a first run gets wrong, for --loss_weighting=error_set.

    python tools/jtt_error_set.py --model_dir=runs/first --train_data=data/train --output=runs/first/error_set.txt
    python -m mvcom_tf.train ... --stage=meta --init_checkpoint=runs/first/checkpoints/pretrain \\
        --loss_weighting=error_set --error_set=runs/first/error_set.txt --error_set_upweight=5
"""

from __future__ import annotations

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The tool's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("model_dir", None, "Run folder of the first model (its newest checkpoint is read).",
                        required=True)
    flags.DEFINE_string("train_data", None, "The training split the second run will read.", required=True)
    flags.DEFINE_string("output", None, "Error-set file to write (default <model_dir>/error_set.txt).")
    flags.DEFINE_integer("batch_size", 256, "Images per inference batch.", lower_bound=1)


def main(argv) -> None:
    del argv
    from mvcom_tf.error_set import error_share, find_errors, write_error_set

    output = FLAGS.output or f"{FLAGS.model_dir.rstrip('/')}/error_set.txt"
    errors, seen = find_errors(FLAGS.model_dir, FLAGS.train_data, FLAGS.batch_size)
    write_error_set(output, errors, seen, FLAGS.model_dir, FLAGS.train_data)
    logging.info("%d of %d training images misclassified (%.2f%%): %s", len(errors), seen,
                 100 * error_share(errors, seen), output)


if __name__ == "__main__":
    define_flags()
    app.run(main)
