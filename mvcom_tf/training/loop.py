"""The training loop: any Stage, step by step, with its checkpoints, progress, faults and evaluations."""

from __future__ import annotations

import dataclasses
import posixpath
import tempfile

import tensorflow as tf
from absl import logging

from mvcom_tf.config import TrainConfig
from mvcom_tf.data.pipeline import DecodeFailures
from mvcom_tf.data.shard_checks import CorruptRecords
from mvcom_tf.files import write_array
from mvcom_tf.training import eval_data, faults, outputs
from mvcom_tf.training.checkpoints import StageCheckpoints, stage_folder
from mvcom_tf.training.compiled import CompiledSteps, execution_length
from mvcom_tf.training.distribute import (InputOptions, distributed_batches, is_chief, make_strategy, retire,
                                          task_name)
from mvcom_tf.training.progress import Progress, log_distributions, skipped_steps
from mvcom_tf.training.stage import RunSummary, Stage, StageBuilder


@dataclasses.dataclass
class StageRun:
    """One stage's run in this process: where it is and what watches it."""

    config: TrainConfig
    stage: Stage
    strategy: tf.distribute.Strategy
    checkpoints: StageCheckpoints
    progress: Progress
    writer: tf.summary.SummaryWriter
    total_steps: int
    failures: DecodeFailures = dataclasses.field(default_factory=DecodeFailures)
    corrupt: CorruptRecords | None = None  # --skip_corrupt_records
    skipped: int = 0

    def dropped(self) -> dict[str, int]:
        """What the input has dropped so far: undecodable images, records lost to damaged shards."""
        counts = {"undecodable_images": int(self.failures.count.numpy())}
        if self.corrupt is not None:
            counts["corrupt_records"] = int(self.corrupt.count.numpy())
        return counts


def run_stage(config: TrainConfig, stage: Stage, strategy: tf.distribute.Strategy, init_checkpoint: str,
              preemption: faults.Preemption, resume_dir: str) -> dict[str, float]:
    """Trains a stage to its last step, resuming from resume_dir (the chief's checkpoints); returns the stage's
    own scalars over the stage. Raises Preempted after saving when `preemption` says so, NonFiniteLoss on a
    non-finite loss (--nan_policy=stop), WorkerLost when another worker is gone."""
    run = _start(config, stage, strategy, init_checkpoint, resume_dir)
    step, per_epoch = int(run.checkpoints.step.numpy()), stage.steps_per_epoch
    runtime, evaluation = config.runtime, config.evaluation
    compiled = CompiledSteps(strategy, runtime.jit_compile, runtime.steps_per_execution)
    every = [runtime.log_every, runtime.checkpoint_every, evaluation.every if evaluation.benchmarks else 0]
    iterators = _inputs(run, _input_options(config), range(step, run.total_steps))
    try:
        while step < run.total_steps:
            epoch = step // per_epoch
            last = min((epoch + 1) * per_epoch, run.total_steps)  # a call ends at the end of an epoch
            count = execution_length(stage, step, last, runtime.steps_per_execution, every)
            output = compiled(stage.replica_step(step), iterators, count)
            faults.check_finite(output.sums, stage.name, step, count, run.checkpoints.latest)
            run.skipped += skipped_steps(output.sums, strategy.num_replicas_in_sync)
            run.progress.add(output)
            step += count
            _after_steps(run, step, epoch, preemption, resume_dir)
    except faults.PEER_ERRORS as error:
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        resume_from = faults.resume_point(run.checkpoints.latest, is_chief(), resume_dir)
        raise faults.worker_lost(error, stage.name, step, task_name(), resume_from) from None
    except tf.errors.DataLossError as error:
        # One step per call: the failed call read no batch and applied nothing, so `step` is whole. With more, the
        # steps of the call before the bad batch were applied but not counted: keep the last checkpoint instead.
        if runtime.steps_per_execution == 1:
            run.checkpoints.save(step)
        raise faults.damaged_input(error, stage, step, run.checkpoints.latest) from None
    finally:
        retire(iterators)  # not deleted: see distribute.retire
        run.writer.flush()  # the command ends without destructors (mvcom_tf.cli.exit_now)
    run.checkpoints.save(step)
    return {**run.progress.stage_summary(), **{key: value for key, value in run.dropped().items() if value}}


def _start(config: TrainConfig, stage: Stage, strategy: tf.distribute.Strategy, init_checkpoint: str,
           resume_dir: str) -> StageRun:
    """Restores the stage, opens its TensorBoard folder and says what it will train."""
    total_steps = stage_length(config, stage)
    checkpoints = StageCheckpoints(stage, stage_folder(config.runtime.model_dir, stage.name),
                                   config.runtime.keep_checkpoints)
    step = checkpoints.restore(resume_dir, init_checkpoint)
    writer = tf.summary.create_file_writer(posixpath.join(config.runtime.model_dir, "tensorboard", stage.name))
    if step == 0:
        log_distributions(writer, {spec.flag: spec.info for spec in stage.inputs()})
    info = stage.train.info
    logging.info("[%s] %d images, %d identities, %d steps/epoch, training steps %d to %d, %d replica(s)",
                 stage.name, info.num_images, info.num_identities, stage.steps_per_epoch, step, total_steps,
                 strategy.num_replicas_in_sync)
    return StageRun(config, stage, strategy, checkpoints, Progress(stage, total_steps, step, writer), writer,
                    total_steps, corrupt=CorruptRecords() if config.data.skip_corrupt_records else None)


def _inputs(run: StageRun, options: InputOptions, steps: range) -> tuple:
    """One iterator per input of the stage over the steps left (none once the stage is done)."""
    if not steps:
        return ()
    return tuple(distributed_batches(run.strategy, spec, options, steps, run.stage.steps_per_epoch, run.failures,
                                     nan_drill=index == 0, corrupt=run.corrupt)
                 for index, spec in enumerate(run.stage.inputs()))


def stage_length(config: TrainConfig, stage: Stage) -> int:
    """The stage's last step: its epochs, or --max_steps if fewer."""
    total_steps = stage.schedule.epochs * stage.steps_per_epoch
    max_steps = config.runtime.max_steps
    return min(total_steps, max_steps) if max_steps else total_steps


def _input_options(config: TrainConfig) -> InputOptions:
    data = config.data
    return InputOptions(config.model.image_size, data.shuffle_buffer, data.synth_blur_prob, data.synth_occlusion_prob,
                        config.runtime.debug_nan_step)


def _after_steps(run: StageRun, step: int, epoch: int, preemption: faults.Preemption, resume_dir: str) -> None:
    """What falls due at `step`: the progress line, a checkpoint, stopping on SIGTERM, an evaluation."""
    config, stage, name = run.config, run.stage, run.stage.name
    runtime, evaluation = config.runtime, config.evaluation
    final = step == run.total_steps
    if step % runtime.log_every == 0 or final:
        if run.skipped:
            logging.warning("[%s] %d steps with a non-finite loss or gradient skipped so far", name, run.skipped)
        run.progress.report(step, epoch, stage.learning_rate(), run.dropped())
    if step % runtime.checkpoint_every == 0 or final:
        run.checkpoints.save(step)
    preemption.check(run.checkpoints, name, step, resume_dir)
    if evaluation.benchmarks and evaluation.every and step % evaluation.every == 0 and not final and is_chief():
        results = eval_data.evaluate(evaluation.benchmarks, stage.backbone, config.model.image_size,
                                      evaluation.batch_size)
        logging.info("[%s] step %d: %s", name, step,
                     "; ".join(f"{key} {eval_data.headline(result)}" for key, result in results.items()))
        eval_data.log_evaluation(run.writer, step, results)


def run(config: TrainConfig, build_stage: StageBuilder, summarise: RunSummary | None = None,
        strategy: tf.distribute.Strategy | None = None) -> dict:
    """Runs every stage of --stage in order, each made by `build_stage`, then evaluates and exports; returns
    metrics.json's content, with the entries `summarise` makes from the stages' metrics.

    Under MultiWorkerMirroredStrategy every worker trains and saves checkpoints (saving takes
    part in collectives), but only the chief writes the run folder: the others write to a
    temporary folder, removed at the end, and resume from the chief's checkpoints.
    """
    strategy = strategy or make_strategy(config.runtime.strategy)
    chief = is_chief()
    scratch = "" if chief else tempfile.mkdtemp(prefix="mvcom_tf_worker_")
    local = config if chief else config.with_flags(model_dir=scratch)
    try:
        return _run_stages(config, local, strategy, chief, build_stage, summarise)
    finally:
        if scratch:
            tf.io.gfile.rmtree(scratch)


def _run_stages(config: TrainConfig, local: TrainConfig, strategy: tf.distribute.Strategy, chief: bool,
                build_stage: StageBuilder, summarise: RunSummary | None) -> dict:
    tf.io.gfile.makedirs(local.runtime.model_dir)
    metrics: dict = {"stages": {}}
    init_checkpoint, stage = config.runtime.init_checkpoint, None
    # One watch for all stages: TensorFlow's handler coordinates through keys that outlive one stage.
    with faults.preemption_watch(strategy, chief) as preemption:
        for name in config.runtime.stages:
            stage = build_stage(config, name, strategy)
            resume_dir = stage_folder(config.runtime.model_dir, name)
            summary = run_stage(local, stage, strategy, init_checkpoint, preemption, resume_dir)
            if stage.later_stages_start_here:
                init_checkpoint = resume_dir
            metrics["stages"][name] = {"training": summary}
            if config.evaluation.benchmarks and chief:
                metrics["stages"][name].update(_evaluate_stage(config, stage))
    if summarise:
        metrics.update(summarise(metrics["stages"]))
    final = metrics["stages"].get(config.runtime.stages[-1], {})
    metrics.update({key: final[key] for key in ("accuracy", "accuracy_std", "groups", "benchmarks") if key in final})
    if export_dir := outputs.export_folder(config):
        metrics["export_dir"] = export_dir
    if chief:
        outputs.write_outputs(config, stage.backbone, metrics)
    return metrics


def _evaluate_stage(config: TrainConfig, stage: Stage) -> dict:
    """--eval_data after a stage, logged at its last step; the first benchmark's figures at the top level, and its
    per-pair outcomes kept in <model_dir>/pair_outcomes/<stage>.npy (`pair_outcomes`: paired comparisons of
    stages)."""
    evaluation = config.evaluation
    outcomes: dict = {}
    results = eval_data.evaluate(evaluation.benchmarks, stage.backbone, config.model.image_size,
                                  evaluation.batch_size, outcomes)
    for key, result in results.items():
        logging.info("[%s] %s: %s", stage.name, key, eval_data.headline(result))
    writer = tf.summary.create_file_writer(posixpath.join(config.runtime.model_dir, "tensorboard", stage.name))
    eval_data.log_evaluation(writer, stage_length(config, stage), results)
    writer.flush()  # the command ends without destructors (mvcom_tf.cli.exit_now)
    first = next(iter(results))
    kept = {}
    if first in outcomes:
        kept["pair_outcomes"] = posixpath.join(config.runtime.model_dir, "pair_outcomes", f"{stage.name}.npy")
        write_array(kept["pair_outcomes"], outcomes[first])
    return {**results[first], "benchmarks": results, **kept}
