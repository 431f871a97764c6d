"""Faults a run survives: SIGTERM (save, then stop) and non-finite losses (stop, naming the last good checkpoint)."""

from __future__ import annotations

import contextlib
import math
import signal
import threading

from mvcom_tf.training.metrics import StepSums


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf (with --nan_policy=stop): the message names the step and the last good checkpoint."""


class Preempted(RuntimeError):
    """SIGTERM arrived: a checkpoint of the step reached was saved; re-running the command resumes there."""


@contextlib.contextmanager
def preemption_signal():
    """An Event set by SIGTERM while the block runs (main thread only; the previous handler is restored)."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.set())
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_finite(sums: StepSums, stage: str, first: int, count: int, last_checkpoint: str | None) -> None:
    """--nan_policy=stop: a NaN or Inf loss in the steps after `first` ends the run before any of them is saved."""
    if not sums.identity:  # a warm-up reports no identity loss
        return
    loss = float(sums.identity.loss)
    if math.isfinite(loss):
        return
    steps = f"step {first + 1}" if count == 1 else f"one of steps {first + 1}-{first + count}"
    last = last_checkpoint or "none (the stage had not saved one yet)"
    raise NonFiniteLoss(f"[{stage}] the loss is {loss} at {steps}; nothing of this step was saved. The last "
                        f"good checkpoint, {last}, is kept, and re-running resumes from it. Lower --lr, or use "
                        "--nan_policy=skip to skip such steps")
