"""What an epoch boundary costs the training input under MirroredStrategy (two logical CPU replicas).

    python -m benchmarks.epoch_boundary [--epochs=6 --step_seconds=0.06 --images=2000 --rounds=2]

Reads a split of 32 px synthetic PNG faces (written to a temporary folder) in global batches of
64 over two replicas, for `--epochs` epochs, each step taking `--step_seconds` (a sleep standing
in for the training step, so that the pipeline runs ahead as it does in training). Two ways, in
one run, alternating: the baseline makes a distributed iterator per epoch (and deletes the last
one), as the training loop did before; `distributed_batches` makes one for the whole stage.
Reports the wall time, the slowest step and the time lost beyond the steps' own. Last line: JSON.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
BATCH = 64


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_integer("epochs", 6, "Epochs read per variant and round.", lower_bound=2)
    flags.DEFINE_float("step_seconds", 0.06, "Simulated training step (the demo's is about 0.06 s).", lower_bound=0.0)
    flags.DEFINE_integer("images", 2000, "Images in the split.", lower_bound=4 * BATCH)
    flags.DEFINE_integer("rounds", 2, "Rounds of both variants.", lower_bound=1)


def _write_split(folder: str, images: int):
    import tensorflow as tf

    from benchmarks.convert import _faces
    from mvcom_tf.data import schema
    from mvcom_tf.data.tfrecord import SplitWriter

    pngs = [tf.io.encode_png(face).numpy() for face in _faces(50, 32)]
    writer = SplitWriter(folder, "train", 4, 32)
    per_shard = images // 4
    for shard in range(4):
        writer.write_shard(shard, (schema.FaceRecord(pngs[i % len(pngs)], identity=i % 500, source=str(i))
                                   for i in range(shard * per_shard, (shard + 1) * per_shard)))
    return writer.finish({"tool": "benchmarks/epoch_boundary.py"})


def _consume(strategy, iterator_for_epoch, steps_per_epoch: int) -> list[float]:
    """Seconds of each step beyond its simulated work, iterator changes included."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def take(iterator):
        return strategy.run(lambda batch: tf.reduce_sum(batch["image"]), args=(next(iterator),))

    lost, iterator = [], None
    for epoch in range(FLAGS.epochs):
        start = time.perf_counter()
        iterator = iterator_for_epoch(epoch, iterator)
        for _ in range(steps_per_epoch):
            take(iterator)
            time.sleep(FLAGS.step_seconds)
            lost.append(time.perf_counter() - start - FLAGS.step_seconds)
            start = time.perf_counter()
    return lost


def main(argv) -> None:
    del argv
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mvcom_tf.data.pipeline import DecodeFailures, train_dataset
    from mvcom_tf.training.distribute import InputOptions, InputSpec, distributed_batches

    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    work = tempfile.mkdtemp(prefix="mvcom_epoch_bench_")
    try:
        info = _write_split(work, FLAGS.images)
        spec = InputSpec("train_data", work, info, BATCH, seed=0)
        options, per_epoch = InputOptions(32, 20_000), spec.steps_per_epoch

        def per_epoch_iterator(epoch, previous):
            del previous  # the loop's variable held it until the new one replaced it

            def dataset_fn(context):
                return train_dataset(work, info, batch_size=context.get_per_replica_batch_size(BATCH), image_size=32,
                                     seed=0, epoch=epoch, input_context=context, failures=DecodeFailures())

            return iter(strategy.distribute_datasets_from_function(dataset_fn))

        def stage_iterator(epoch, previous):
            if previous is not None:
                return previous
            return distributed_batches(strategy, spec, options, range(FLAGS.epochs * per_epoch), per_epoch,
                                       DecodeFailures())

        variants = {"an iterator per epoch (baseline)": per_epoch_iterator, "one iterator per stage": stage_iterator}
        lost = {name: [] for name in variants}
        for _ in range(FLAGS.rounds):
            for name, make in variants.items():
                lost[name].append(_consume(strategy, make, per_epoch))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{FLAGS.epochs} epochs of {per_epoch} steps (global batch {BATCH}, 2 CPU replicas), "
          f"{FLAGS.step_seconds} s per step, {FLAGS.rounds} round(s); the first step of each round traces")
    print("| input | s lost per round (mean) | slowest step after the first (s) | steps over 1 s |")
    print("|---|---|---|---|")
    figures = {}
    for name, rounds in lost.items():
        after_first = [seconds for steps in rounds for seconds in steps[1:]]
        figures[name] = {"lost_s": float(np.mean([sum(steps[1:]) for steps in rounds])),
                         "slowest_s": float(max(after_first)), "steps_over_1s": sum(s > 1.0 for s in after_first)}
        print(f"| {name} | {figures[name]['lost_s']:.2f} | {figures[name]['slowest_s']:.2f} | "
              f"{figures[name]['steps_over_1s']} |")
    print(json.dumps({"epochs": FLAGS.epochs, "steps_per_epoch": per_epoch, "step_seconds": FLAGS.step_seconds,
                      "rounds": FLAGS.rounds, "variants": figures}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
