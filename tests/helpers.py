"""Helpers the tests share: the repository, fresh-process runs, tiny recipes, and the meta step on random batches."""

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from mvcom_tf.config import TrainConfig
from mvcom_tf.data import schema
from mvcom_tf.models.iresnet import build_iresnet
from mvcom_tf.stages.build import build_margin_step, build_meta_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = f"--flagfile={REPO}/flags/demo.cfg"
# The demo with MvCoM (so that a meta stage learns residuals), shrunk: a tiny network that takes a step in a fraction
# of a second. Its data folders are the demo's, which the flags after it (data_flags) replace: put those after TINY.
# No SavedModel (a few seconds of every run): a test that reads one adds --export.
TINY = [f"--flagfile={REPO}/flags/demo_mvcom.cfg", "--backbone=iresnet18", "--width_multiplier=0.125", "--embedding_size=16", "--batch_size=16",
        "--stage=pretrain", "--log_every=2", "--noexport"]
NUM_IDS, BATCH, META, SIZE, ETA = 6, 8, 8, 16, 0.5
# The identity head's scale s, which the verification objective also scores the meta batch at.
SCALE = 8.0


def run_module(args, cwd=REPO, timeout=600, env=None):
    """Runs `python <args>` in a fresh process; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def data_flags(root):
    """--train_data, --meta_data and --eval_data of a folder holding train/, meta/ and test/."""
    return [f"--train_data={root}/train", f"--meta_data={root}/meta", f"--eval_data={root}/test"]


def final_weights(run_dir, step):
    reader = tf.train.load_checkpoint(f"{run_dir}/checkpoints/pretrain/ckpt-{step}")
    # save_counter counts the saves, which depends on when the kill came: bookkeeping, not state.
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH" and not name.startswith("save_counter")}


def kill_during_a_save(folder, processes, from_step=2):
    """SIGKILLs `processes` while TensorFlow writes a checkpoint N >= from_step into `folder` (its ckpt-N_temp/
    exists).

    Returns N, or None when the kill landed after that save completed (the temporary folder gone and
    the `checkpoint` file naming N): the caller then starts the run again and tries once more.
    """
    folder = str(folder)
    while all(p.poll() is None for p in processes):
        try:
            temporary = [name for name in os.listdir(folder)
                         if name.endswith("_temp") and int(name[len("ckpt-"):-len("_temp")]) >= from_step]
        except FileNotFoundError:
            continue
        if temporary:
            for process in processes:
                process.send_signal(signal.SIGKILL)
            for process in processes:
                process.wait()
            step = int(temporary[0][len("ckpt-"):-len("_temp")])
            latest = tf.train.latest_checkpoint(folder) or ""
            mid_save = os.path.isdir(os.path.join(folder, temporary[0])) or not latest.endswith(f"-{step}")
            return step if mid_save else None
    raise AssertionError("the run ended before a save could be interrupted")


def make_batches(seed=0):
    rng = np.random.default_rng(seed)
    batch = {"image": rng.normal(size=(BATCH, SIZE, SIZE, 3)), "identity": rng.integers(0, NUM_IDS, BATCH)}
    # P x K identities in V (K = 2), each replica's half holding whole pairs: the verification objective's batch.
    meta = {"image": rng.normal(size=(META, SIZE, SIZE, 3)), "identity": np.arange(META) // 2}
    for factor in schema.FACTORS:
        batch[factor] = rng.integers(0, schema.NUM_CLASSES[factor], BATCH)
        labels = rng.integers(0, schema.NUM_CLASSES[factor], META)
        labels[rng.random(META) < 0.3] = -1  # unknown labels mixed in
        meta[factor] = labels
    def cast(data):
        return {k: tf.constant(v, keras.config.floatx() if k == "image" else tf.int32) for k, v in data.items()}

    return cast(batch), cast(meta)


def small_backbone(sync_bn):
    """conv-BN-PReLU twice, then the IResNet output block: the meta step only needs the `output_` names.

    Tracing the second-order pass through a whole IResNet takes most of a meta-step test's time
    (under MirroredStrategy every synchronised BatchNorm adds all-reduces whose custom gradients
    TensorFlow traces slowly at second order); this keeps the checks quick. One check runs the real
    network (build(network="iresnet18"))."""
    from mvcom_tf.models.iresnet import SyncBatchNormalization

    norm = SyncBatchNormalization if sync_bn else keras.layers.BatchNormalization
    inputs = keras.Input((SIZE, SIZE, 3))
    x = inputs
    for index in range(2):
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False, name=f"conv{index}")(x)
        x = norm(name=f"bn{index}")(x)
        x = keras.layers.PReLU(shared_axes=[1, 2], name=f"prelu{index}")(x)
    x = norm(name="output_bn")(x)
    x = keras.layers.Flatten(name="output_flatten")(x)
    x = keras.layers.Dense(8, name="output_fc")(x)
    outputs = norm(name="output_features", scale=False)(x)
    return keras.Model(inputs, outputs)


def build(strategy, scope="all", tau=1.0, weights=(1.0, 1.0, 1.0, 1.0), sync_bn=False, sharded=False,
          objective="variation", network="small", target="margins", weight_mix=1.0, weight_power=1.0):
    """The meta step (mvcom_tf.stages.build's wiring) around a small backbone (or network="iresnet18", a narrow
    IResNet-18), in float64 under the float64 fixture; `sharded`: its identity centres split over the replicas
    (the same initial values)."""
    config = TrainConfig.from_flags(
        batch_size=BATCH, meta_batch_size=META, embedding_size=8, meta_lr_tau=tau, meta_inner_lr=ETA,
        residual_max=1e9, meta_scope=scope, factor_weights=weights, meta_sampling="random", variation_lr=0.1,
        momentum=0.9, weight_decay=0.0, meta_objective=objective, meta_images_per_identity=2, scale=SCALE,
        lr=0.1, lr_steps=(), head_sharding="sharded" if sharded else "replicated", meta_target=target,
        meta_weight_mix=weight_mix, meta_weight_power=weight_power)
    keras.utils.set_random_seed(1)
    with strategy.scope():
        backbone = (build_iresnet("iresnet18", SIZE, 8, width_multiplier=0.0625, sync_bn=sync_bn)
                    if network == "iresnet18" else small_backbone(sync_bn))
    prior = tf.constant(np.linspace(0.25, 0.45, NUM_IDS), keras.config.floatx())
    margin_step = build_margin_step(config, NUM_IDS, prior, strategy, backbone=backbone)
    with strategy.scope():
        meta_step, _ = build_meta_step(config, margin_step, {}, strategy.num_replicas_in_sync)
        for layer in meta_step.variation_heads.classifiers.values():  # non-trivial heads: every factor's loss has a gradient
            layer.kernel.assign(np.random.default_rng(2).normal(0, 1, layer.kernel.shape))
    return meta_step


def run_per_replica(strategy, fn, batch, meta):
    """fn(batch, meta) under tf.function, each replica on its slice of both batches; every output (a tensor or a
    tuple of them) concatenated over the replicas, as numpy."""
    replicas = strategy.num_replicas_in_sync

    def slice_of(data, context):
        n = len(next(iter(data.values()))) // replicas
        i = context.replica_id_in_sync_group
        return {k: v[i * n:(i + 1) * n] for k, v in data.items()}

    local_batch = strategy.experimental_distribute_values_from_function(lambda c: slice_of(batch, c))
    local_meta = strategy.experimental_distribute_values_from_function(lambda c: slice_of(meta, c))
    outputs = tf.function(lambda b, m: strategy.run(fn, args=(b, m)))(local_batch, local_meta)

    def gathered(output):
        return np.concatenate([t.numpy() for t in strategy.experimental_local_results(output)])

    return tuple(gathered(output) for output in outputs) if isinstance(outputs, tuple) else gathered(outputs)
