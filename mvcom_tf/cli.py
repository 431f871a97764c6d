"""What the commands share on the command line: their --help, whether run as `python -m` or as a console script."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from absl import flags


def define_command_flags(define: Callable[[], None], usage: str | None) -> None:
    """Runs `define` (the command's DEFINE_* calls) and makes --help show those flags and `usage`.

    absl's --help lists the key flags of the module that runs as __main__, and prints its
    docstring: for a console script (mvcom-train) that is pip's wrapper, which has neither.
    """
    before = set(flags.FLAGS)
    define()
    main = sys.modules["__main__"]
    if not main.__doc__:
        main.__doc__ = usage
    for name in sorted(set(flags.FLAGS) - before):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


def exit_now(status: int) -> None:
    """Ends the process with `status` once its output is flushed, without running destructors: a tf.data
    iterator's can block for minutes (mvcom_tf.training.distribute.retire). Everything the run keeps
    (checkpoints, metrics.json, the SavedModel, TensorBoard files) is closed before this is called."""
    logging.shutdown()  # absl's handler is a logging handler: flush and close it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# --align's values (mvcom_tf.data.alignment.ALIGN_MODES; repeated so that --help does not load TensorFlow).
ALIGN_MODES = ("arcface", "facenet", "none")


def define_align_flags(values: flags.FlagValues) -> None:
    """--align and --align_margin, for the commands that read photographs (evaluate, embed)."""
    flags.DEFINE_enum("align", "arcface", list(ALIGN_MODES), "How a photo's detected face becomes the model's input: "
                      "arcface (5 landmarks onto insightface's 112-px template, scaled to the model's size: this "
                      "project's and insightface's models), facenet (the MTCNN box grown by --align_margin photo "
                      "pixels, cropped and resized square, as davidsandberg/facenet aligns), none (photos already "
                      "cropped: resized whole). Recorded in results.json.", flag_values=values)
    flags.DEFINE_float("align_margin", 32.0, "--align=facenet: pixels of the photo added to the box in all, half on "
                       "each side (davidsandberg/facenet validates LFW with 32 at 160 px).", lower_bound=0.0,
                       flag_values=values)


def placement_from_flags(values: flags.FlagValues):
    """The alignment.Placement that --align and --align_margin describe."""
    from mvcom_tf.data.alignment import Placement

    return Placement(values.align, values.align_margin)
