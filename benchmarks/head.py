"""The identity head alone (forward, backward, SGD update): replicated against sharded, with Partial FC.

    python -m benchmarks.head [--classes=100000,1000000 --batch=256 --repeats=3]

Two logical CPU devices under MirroredStrategy, embedding 512, global batch 256 of fixed random
embeddings. Variants: the replicated head (every replica all C centres, the centres' gradient
all-reduced), the sharded head at r = 1.0 and at r = 0.1. Each variant runs in its own process:
its peak resident memory above a process that built nothing, halved for the two replicas it
holds, is the measured memory per replica; the formulas' own figure (head_footprint, what the
training command prints at start-up) is beside it. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_list("classes", ["100000", "1000000"], "Identity counts C.")
    flags.DEFINE_integer("batch", 256, "Global batch.")
    flags.DEFINE_integer("embedding", 512, "Embedding size E.")
    flags.DEFINE_integer("repeats", 3, "Timed steps per variant (after one warm-up step).")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = (("replicated", 1.0), ("sharded", 1.0), ("sharded", 0.1))


def time_head(sharding: str, rate: float, classes: int, batch: int, embedding: int, repeats: int) -> dict:
    """Median seconds per head step and the peak resident memory (MB) of this process; sharding "none" builds
    nothing (the baseline memory)."""
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mvcom_tf.training.distribute import make_strategy

    strategy = make_strategy("mirrored")
    if sharding == "none":
        return {"seconds": 0.0, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    step = _head_step(strategy, sharding, rate, classes, batch, embedding)
    rng = np.random.default_rng(0)
    embeddings = tf.constant(rng.normal(size=(batch, embedding)), tf.float32)
    labels = tf.constant(rng.integers(0, classes, batch), tf.int32)

    def local(context):
        n, i = batch // 2, context.replica_id_in_sync_group
        return embeddings[i * n:(i + 1) * n], labels[i * n:(i + 1) * n]

    inputs = strategy.experimental_distribute_values_from_function(local)
    run = tf.function(lambda values: strategy.run(step, args=values))
    seconds = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        [value.numpy() for value in strategy.experimental_local_results(run(inputs))]
        if index:
            seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _head_step(strategy, sharding: str, rate: float, classes: int, batch: int, embedding: int):
    """A per-replica callable: the margin loss of (embeddings, labels), its gradients, and the head's SGD update."""
    import keras
    import tensorflow as tf

    from mvcom_tf.models.heads import MarginHead
    from mvcom_tf.models.sharded_head import ShardedCentres, ShardedMarginHead, default_devices, sgd_update

    if sharding == "replicated":
        with strategy.scope():
            head = MarginHead(classes)
            head.build((None, embedding))
            optimizer = keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=5e-4)
            optimizer.build(head.trainable_variables)

        def replicated_step(embeddings, labels):
            with tf.GradientTape() as tape:
                tape.watch(embeddings)
                logits = head(embeddings, labels, margins=0.35)
                loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)) / batch
            embedding_gradient, kernel_gradient = tape.gradient(loss, [embeddings, head.kernel])
            optimizer.apply_gradients([(kernel_gradient, head.kernel)])
            return tf.reduce_sum(embedding_gradient)

        return replicated_step
    centres = ShardedCentres(classes, embedding, default_devices(strategy))
    sharded_head = ShardedMarginHead(centres, sample_rate=rate, global_batch=batch)

    def sharded_step(embeddings, labels):
        shard = int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))
        kernel = centres.kernels[shard]
        with tf.GradientTape() as tape:
            tape.watch([embeddings, kernel])
            losses, _, _ = sharded_head.per_sample_loss(embeddings, labels, tf.fill(tf.shape(labels), 0.35),
                                                        tf.constant(1))
            loss = tf.reduce_sum(losses) / batch
        embedding_gradient, kernel_gradient = tape.gradient(loss, [embeddings, kernel])
        sgd_update(kernel, centres.momentums[shard], tf.convert_to_tensor(kernel_gradient), 0.1, 0.9, 5e-4)
        return tf.reduce_sum(embedding_gradient)

    return sharded_step


def run_isolated(**kwargs) -> dict:
    """time_head in a fresh Python process, so that each variant's peak memory is its own."""
    code = f"import json; from benchmarks.head import time_head; print(json.dumps(time_head(**{kwargs!r})))"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if result.returncode == -9 or "RESOURCE_EXHAUSTED" in result.stderr:
        # Out of this machine's memory: TensorFlow's allocator said so, or the kernel killed the process.
        return {"seconds": None, "peak_mb": None}
    if result.returncode != 0:
        raise RuntimeError(f"benchmark variant {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _half_above(peak_mb: float | None, baseline_mb: float) -> float | None:
    """A two-replica process's peak above the bare process, per replica (None: out of memory)."""
    return None if peak_mb is None else (peak_mb - baseline_mb) / 2


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when a variant did not fit in memory."""
    return None if numerator is None or denominator is None else round(numerator / denominator, 3)


def main(argv):
    del argv
    from mvcom_tf.models.sharded_head import head_footprint

    common = {"batch": FLAGS.batch, "embedding": FLAGS.embedding, "repeats": FLAGS.repeats}
    baseline = run_isolated(sharding="none", rate=1.0, classes=1, **common)["peak_mb"]
    rows = []
    for classes in (int(c) for c in FLAGS.classes):
        for sharding, rate in VARIANTS:
            measured = run_isolated(sharding=sharding, rate=rate, classes=classes, **common)
            formula = head_footprint(classes, FLAGS.embedding, 2, FLAGS.batch, sharding == "sharded", rate)
            rows.append({"classes": classes, "sharding": sharding, "rate": rate, "seconds": measured["seconds"],
                         "mb_per_replica": _half_above(measured["peak_mb"], baseline),
                         "formula_mb_per_replica": (formula["state_bytes"] + formula["logits_bytes"]) / 1e6,
                         "formula_sent_mb": formula["sent_bytes"] / 1e6})
    print(f"head alone: E {FLAGS.embedding}, global batch {FLAGS.batch}, 2 logical CPU replicas (MirroredStrategy), "
          f"median of {FLAGS.repeats} steps; memory: peak RSS above a bare process ({baseline:.0f} MB), halved")
    print("| C | head | r | s/step | MB per replica (measured) | MB per replica (formula) | MB sent/step (formula) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        seconds, memory = ("out of memory", "-") if row["seconds"] is None else (
            f"{row['seconds']:.3f}", f"{row['mb_per_replica']:.0f}")
        print(f"| {row['classes']:,} | {row['sharding']} | {row['rate']} | {seconds} | {memory} | "
              f"{row['formula_mb_per_replica']:.0f} | {row['formula_sent_mb']:.1f} |")
    figures = {}
    for classes in (int(c) for c in FLAGS.classes):
        by = {(r["sharding"], r["rate"]): r for r in rows if r["classes"] == classes}
        figures[f"memory_ratio_sharded_{classes}"] = _ratio(by[("sharded", 1.0)]["mb_per_replica"],
                                                            by[("replicated", 1.0)]["mb_per_replica"])
        figures[f"speedup_r0.1_{classes}"] = _ratio(by[("sharded", 1.0)]["seconds"], by[("sharded", 0.1)]["seconds"])
    print(json.dumps({"rows": rows, **figures}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
