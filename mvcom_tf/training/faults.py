"""Faults a run survives: SIGTERM (save, then stop), non-finite losses and a lost worker (stop, naming the last good
checkpoint)."""

from __future__ import annotations

import contextlib
import math
import re
import signal
import threading

import tensorflow as tf

from mvcom_tf.training.metrics import StepSums

# What TensorFlow's collectives and coordination service raise on the survivors when a worker of a
# MultiWorkerMirroredStrategy run is gone (killed, crashed host): its heartbeats stop and pending
# collectives fail, within the service's heartbeat timeout.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf (with --nan_policy=stop): the message names the step and the last good checkpoint."""


class WorkerLost(RuntimeError):
    """Another worker of a multi-worker run stopped: the message names it and the checkpoint to resume from."""


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


def lost_tasks(error: tf.errors.OpError, own_task: str) -> str:
    """The tasks an error of the collectives names (as /job:worker/replica:0/task:1), other than this one."""
    named = dict.fromkeys(re.findall(r"/job:\w+/replica:\d+/task:\d+", error.message or ""))
    return ", ".join(task for task in named if task != own_task) or "another worker"


def worker_lost(error: tf.errors.OpError, stage: str, step: int, own_task: str, resume_from: str) -> WorkerLost:
    """The one line a survivor ends with when a peer is gone, instead of TensorFlow's traceback."""
    return WorkerLost(f"[{stage}] lost {lost_tasks(error, own_task)} after step {step} ({type(error).__name__}: "
                      f"{_first_line(error)}); restart every worker with the same command to resume from "
                      f"{resume_from}")


def _first_line(error: tf.errors.OpError) -> str:
    lines = [line.strip() for line in (error.message or "").splitlines() if line.strip()]
    return lines[0][:200] if lines else "no message"
