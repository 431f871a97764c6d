"""A stage's checkpoints: what they hold, saving each step once, resuming, and starting from --init_checkpoint."""

from __future__ import annotations

import posixpath

import tensorflow as tf
from absl import logging


class CheckpointError(ValueError):
    """A checkpoint that cannot start this run (missing, or made for other data): the message says which and why."""

class SaveFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, a folder that refuses writes): the message names the folder and
    the last good checkpoint, which the same command resumes from once the cause is fixed."""

# The identity centres W [E, C] in a checkpoint: a replicated head's kernel, or a sharded head's gathered one.
HEAD_KERNELS = ("head/kernel/.ATTRIBUTES/VARIABLE_VALUE", "head/.ATTRIBUTES/kernel")


def stage_folder(model_dir: str, stage_name: str) -> str:
    """Where a stage of a run keeps its checkpoints."""
    return posixpath.join(model_dir, "checkpoints", stage_name)


class StageCheckpoints:
    """The stage's own variables (Stage.trackables) and the global step, saved under `folder`."""

    def __init__(self, stage, folder: str, keep: int) -> None:
        self.stage = stage
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        self.checkpoint = tf.train.Checkpoint(step=self.step, **stage.trackables())
        self.manager = tf.train.CheckpointManager(self.checkpoint, folder, max_to_keep=keep)

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def save(self, step: int) -> None:
        """Saves the state at `step` unless that step is already saved; a failed save removes what it had written
        and raises SaveFailed."""
        self.step.assign(step)
        if (self.latest or "").endswith(f"-{step}"):
            return
        last_good = self.latest
        try:
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as error:
            self._remove_partial(step)
            reason = getattr(error, "message", None) or str(error)
            raise SaveFailed(f"[{self.stage.name}] could not save step {step} to {self.manager.directory} "
                             f"({type(error).__name__}: {reason.splitlines()[0][:160]}); the last good checkpoint is "
                             f"{last_good or 'none (the stage had saved none)'}. Free space or fix the folder, then "
                             "run the same command to resume from it") from None

    def _remove_partial(self, step: int) -> None:
        """What a failed save of `step` leaves: TensorFlow's temporary folder and any of the step's files."""
        prefix = posixpath.join(self.manager.directory, f"ckpt-{step}")
        for path in tf.io.gfile.glob(f"{prefix}_temp*") + tf.io.gfile.glob(f"{prefix}.*"):
            try:
                if tf.io.gfile.isdir(path):
                    tf.io.gfile.rmtree(path)
                else:
                    tf.io.gfile.remove(path)
            except (tf.errors.OpError, OSError) as error:
                logging.warning("[%s] could not remove %s after the failed save: %s", self.stage.name, path, error)

    def restore(self, resume_dir: str, init_checkpoint: str) -> int:
        """Resumes from the last checkpoint in resume_dir, or starts from --init_checkpoint's backbone and head;
        returns the step reached."""
        latest = tf.train.latest_checkpoint(resume_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("[%s] resumed from %s at step %d", self.stage.name, latest, int(self.step))
        elif init_checkpoint:
            initialise(self.stage, init_checkpoint)
        return int(self.step.numpy())


def initialise(stage, init_checkpoint: str) -> None:
    """The backbone and identity head from a checkpoint, as seed Sec. C keeps them; optimizer and step start anew."""
    prefix = _latest(init_checkpoint)
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    head_key = next((key for key in HEAD_KERNELS if key in shapes), None)
    head_shape = shapes[head_key] if head_key else None
    identities = stage.train.info.num_identities
    if head_shape is not None and head_shape[1] != identities:
        raise CheckpointError(f"--init_checkpoint: {prefix} has an identity head of {head_shape[1]} classes, but "
                              f"--train_data has {identities} identities")
    tf.train.Checkpoint(backbone=stage.backbone).restore(prefix).expect_partial()
    if head_key:
        stage.load_head(reader.get_tensor(head_key))
    logging.info("[%s] initialised backbone%s from %s", stage.name, " and identity head" if head_shape else "",
                 init_checkpoint)
    if head_shape is None:
        logging.warning("[%s] %s holds no identity head: it starts untrained (--head_warmup_steps trains it alone "
                        "first)", stage.name, init_checkpoint)


def _latest(path: str) -> str:
    """A checkpoint prefix, or the latest checkpoint in a folder (a run folder's checkpoints/<stage>)."""
    if tf.io.gfile.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"--init_checkpoint: {path} holds no checkpoint")
        return latest
    return path
