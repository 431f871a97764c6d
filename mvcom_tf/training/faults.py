"""Faults a run survives: SIGTERM (every worker saves one step, then stops), non-finite losses, a lost worker and a
damaged input shard (stop, naming the last good checkpoint)."""

from __future__ import annotations

import contextlib
import math
import re
import signal
import tempfile
import threading
from typing import Protocol

import tensorflow as tf

from mvcom_tf.data.shard_checks import first_damage, reader_reason
from mvcom_tf.data.tfrecord import shard_paths
from mvcom_tf.training.checkpoints import StageCheckpoints
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


class DamagedInput(RuntimeError):
    """A training shard could not be read (truncated copy, corrupt record): the message names it and what to do."""


class Preempted(RuntimeError):
    """SIGTERM arrived: a checkpoint of the step reached was saved; re-running the command resumes there."""


class Preemption(Protocol):
    """What the loop asks after every call of the step function: stop here? (then it saves and raises Preempted)."""

    def check(self, checkpoints: StageCheckpoints, stage: str, step: int, resume_dir: str) -> None: ...


class SignalPreemption:
    """One process: SIGTERM sets a flag, and the loop saves the step reached and stops at its next check."""

    def __init__(self) -> None:
        self.received = threading.Event()

    def check(self, checkpoints: StageCheckpoints, stage: str, step: int, resume_dir: str) -> None:
        """After a call of the step function: on SIGTERM, saves `step` and raises Preempted."""
        if self.received.is_set():
            checkpoints.save(step)
            raise Preempted(f"[{stage}] SIGTERM: saved {checkpoints.latest} at step {step}; run the same command "
                            "again to resume from it")

    def close(self) -> None:
        """Nothing to release: the SIGTERM handler is restored by preemption_watch."""


class ClusterPreemption:
    """MultiWorkerMirroredStrategy: a SIGTERM to any worker stops every worker at one agreed step, saved.

    TensorFlow's PreemptionCheckpointHandler does the agreeing: the signalled worker posts the call
    after the next one to the coordination service, every worker acknowledges, and each saves when
    its own count of calls gets there (saving takes part in collectives, so all must save together).
    """

    def __init__(self, strategy: tf.distribute.Strategy, chief: bool) -> None:
        self._chief = chief
        self._stop: Preempted | None = None
        # The handler counts its calls and restores that count from its manager's folder. An empty
        # folder makes every worker of a restarted cluster count from 0, so their counts agree; the
        # stage's own step, in the stage's checkpoints, is what resumes.
        self._counts = tempfile.mkdtemp(prefix="mvcom_tf_preemption_")
        counts = tf.train.CheckpointManager(tf.train.Checkpoint(), self._counts, max_to_keep=1)
        termination = tf.distribute.experimental.TerminationConfig(save_fn=self._save, exit_fn=self._exit)
        self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            strategy.cluster_resolver, counts, termination_config=termination)

    def check(self, checkpoints: StageCheckpoints, stage: str, step: int, resume_dir: str) -> None:
        """After every call of the step function, on every worker: saves and raises Preempted at the agreed call."""
        self._handler.save_checkpoint_if_preempted(checkpoints, stage, step, resume_dir)

    def close(self) -> None:
        """Removes the handler's scratch folder of call counts."""
        tf.io.gfile.rmtree(self._counts)

    def _save(self, checkpoints: StageCheckpoints, stage: str, step: int, resume_dir: str) -> None:
        checkpoints.save(step)
        saved = resume_point(checkpoints.latest, self._chief, resume_dir)
        self._stop = Preempted(f"[{stage}] SIGTERM to a worker: every worker stopped after step {step}, saved as "
                               f"{saved}; run the same command on every worker to resume from it")

    def _exit(self) -> None:
        raise self._stop


def resume_point(latest: str | None, chief: bool, resume_dir: str) -> str:
    """The checkpoint a stopped worker names to resume from: its own latest save on the chief; a non-chief's own
    saves are in its scratch folder, deleted on exit, so it names the chief's."""
    if chief:
        return latest or "the start of the stage"
    return f"the chief's latest checkpoint in {resume_dir}"


@contextlib.contextmanager
def preemption_watch(strategy: tf.distribute.Strategy, chief: bool):
    """What stops a run on SIGTERM while the block runs: ClusterPreemption across workers, SignalPreemption in one
    process (the previous SIGTERM handler is restored; off the main thread, nothing watches)."""
    if threading.current_thread() is not threading.main_thread():
        yield SignalPreemption()
        return
    previous = signal.getsignal(signal.SIGTERM)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.cluster_resolver.cluster_spec():
        watch = ClusterPreemption(strategy, chief)
    else:
        watch = SignalPreemption()
        signal.signal(signal.SIGTERM, lambda signum, frame: watch.received.set())
    try:
        yield watch
    finally:
        signal.signal(signal.SIGTERM, previous)
        watch.close()


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


def damaged_input(error: tf.errors.DataLossError, stage, step: int, saved: str | None) -> DamagedInput:
    """The one line a run ends with when an input shard is damaged, instead of TensorFlow's traceback: the shard
    (found by reading the stage's shards again), where it breaks, what was saved and what to do."""
    damage = None
    for spec in stage.inputs():
        paths = shard_paths(spec.data_dir, spec.info)
        damage = first_damage(paths, [int(shard["num_images"]) for shard in spec.info.shards])
        if damage:
            where = f"--{spec.flag} shard {damage.describe()}"
            break
    else:
        where = f"an input shard ({reader_reason(error)}; every shard reads whole now: a read error of the file system?)"
    kept = f"saved {saved}" if saved else "nothing saved yet in this stage"
    return DamagedInput(f"[{stage.name}] after step {step}: {where}. Copy or convert the shard again and re-run to "
                        f"resume ({kept}), or add --skip_corrupt_records to train on without the records from the "
                        "damage to the shard's end")
