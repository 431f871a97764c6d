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
