"""The sharded identity head: the replicated head's steps at r = 1, Partial FC against numpy, resharding on restore."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.config import TrainConfig
from mvcom_tf.config_flags import parse_config
from mvcom_tf.models.sharded_head import ShardedCentres, ShardedMarginHead, ShardLayout, default_devices
from mvcom_tf.stages.build import build_margin_step, build_stage
from mvcom_tf.margin_step import ShardedMarginStep
from mvcom_tf.training.distribute import make_strategy
from tests.helpers import TINY, build as build_meta, data_flags, make_batches, run_module, small_backbone

CLASSES, BATCH, SIZE, EMBEDDING, SCALE, MOMENTUM, DECAY = 11, 8, 16, 8, 8.0, 0.9, 5e-4


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        batch = {"image": tf.constant(rng.normal(size=(BATCH, SIZE, SIZE, 3)), keras.config.floatx()),
                 "identity": tf.constant(rng.integers(0, CLASSES, BATCH), tf.int32)}
        batch.update({f: tf.constant(rng.integers(0, schema.NUM_CLASSES[f], BATCH), tf.int32) for f in schema.FACTORS})
        out.append(batch)
    return out


def build(strategy, sharded):
    """A small synchronised-BN network and its margin step (the stage builder's), replicated or sharded; the same
    initial weights."""
    keras.utils.set_random_seed(0)
    config = TrainConfig.from_flags(embedding_size=EMBEDDING, scale=SCALE, batch_size=BATCH, lr=0.1, lr_steps=(),
                                    momentum=MOMENTUM, weight_decay=DECAY,
                                    head_sharding="sharded" if sharded else "replicated")
    with strategy.scope():
        backbone = small_backbone(sync_bn=True)
    margins = tf.constant(np.linspace(0.2, 0.4, CLASSES), keras.config.floatx())
    return build_margin_step(config, CLASSES, margins, strategy, backbone=backbone)


def run_steps(strategy, step, data):
    def slice_of(batch, context):
        n = BATCH // context.num_replicas_in_sync
        i = context.replica_id_in_sync_group
        return {key: value[i * n:(i + 1) * n] for key, value in batch.items()}

    @tf.function
    def run(batch):
        strategy.run(step, args=(batch,))

    for batch in data:
        run(strategy.experimental_distribute_values_from_function(lambda c: slice_of(batch, c)))


def state(step):
    """Backbone weights (BatchNorm statistics too), the centres W [E, C] and their momentum."""
    if isinstance(step, ShardedMarginStep):
        centres = step.head.centres
        kernel, momentum = centres.full(), tf.concat([tf.convert_to_tensor(m) for m in centres.momentums], axis=1)
    else:
        kernel = step.head.kernel
        momentum = step.optimizer.momentums[step.optimizer._get_variable_index(kernel)]
    return [w.numpy() for w in step.backbone.weights] + [np.asarray(kernel), np.asarray(momentum)]


def test_layout_splits_as_partial_fc_v2():
    layout = ShardLayout(11, 4)
    assert layout.sizes() == [3, 3, 3, 2] and [layout.start(i) for i in range(4)] == [0, 3, 6, 9]


def test_sharded_head_takes_the_replicated_heads_steps(float64):
    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2
    data = batches(2)
    replicated, sharded = build(strategy, sharded=False), build(strategy, sharded=True)
    initial = state(replicated)
    run_steps(strategy, replicated, data)
    run_steps(strategy, sharded, data)
    after_replicated, after_sharded = state(replicated), state(sharded)
    assert max(np.max(np.abs(a - b)) for a, b in zip(after_replicated, initial)) > 1e-3  # the steps moved it
    for a, b in zip(after_replicated, after_sharded):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)


def test_sharded_head_takes_the_replicated_heads_meta_steps(float64):
    """The MvCoM step differentiates the identity loss through the pseudo-update (second order): through the
    sharded head's all-gathers and all-reduces it must give the replicated head's residuals and weights."""
    strategy = make_strategy("mirrored")
    # Per-replica BatchNorm: synchronised BatchNorm's second order is checked in test_meta.py, and with it this
    # test spent 3 minutes tracing.
    replicated, sharded = build_meta(strategy), build_meta(strategy, sharded=True)
    assert isinstance(sharded.margin_step, ShardedMarginStep)

    def meta_state(meta_step):
        return state(meta_step.margin_step) + [w.numpy() for w in meta_step.variation_heads.weights]

    def slice_of(data, context):
        n = len(data["image"]) // context.num_replicas_in_sync
        i = context.replica_id_in_sync_group
        return {key: value[i * n:(i + 1) * n] for key, value in data.items()}

    initial = meta_state(replicated)
    residuals = {}
    for name, meta_step in (("replicated", replicated), ("sharded", sharded)):
        @tf.function
        def run(batch, meta):
            return strategy.run(meta_step, args=(batch, meta)).samples.residual

        for seed in range(2):
            batch, meta = make_batches(seed)
            out = run(strategy.experimental_distribute_values_from_function(lambda c: slice_of(batch, c)),
                      strategy.experimental_distribute_values_from_function(lambda c: slice_of(meta, c)))
        residuals[name] = {f: np.concatenate([t.numpy() for t in strategy.experimental_local_results(v)])
                           for f, v in out.items()}
    assert max(np.max(np.abs(r)) for r in residuals["replicated"].values()) > 1e-4  # the residuals are learned
    for factor, values in residuals["replicated"].items():
        np.testing.assert_allclose(residuals["sharded"][factor], values, rtol=0, atol=1e-10, err_msg=factor)
    after_replicated, after_sharded = meta_state(replicated), meta_state(sharded)
    assert max(np.max(np.abs(a - b)) for a, b in zip(after_replicated, initial)) > 1e-3
    for a, b in zip(after_replicated, after_sharded):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)


def test_a_seed_starts_both_heads_from_the_same_centres(tiny_data):
    """The stage builder draws the sharded W where the replicated head draws its kernel: same seed, same start."""
    strategy = make_strategy("mirrored")
    stages = {}
    for sharding in ("replicated", "sharded"):
        config = parse_config([*TINY, *data_flags(tiny_data), f"--head_sharding={sharding}", "--seed=4"])
        keras.utils.set_random_seed(config.runtime.seed)
        stages[sharding] = build_stage(config, "pretrain", strategy)
    replicated, sharded = stages["replicated"], stages["sharded"]
    assert [len(k.numpy()[0]) for k in sharded.head.kernels] == [30, 30]
    np.testing.assert_array_equal(sharded.head.full().numpy(), replicated.head.kernel.numpy())
    for a, b in zip(replicated.backbone.weights, sharded.backbone.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_partial_fc_keeps_every_positive_and_its_loss_is_the_sampled_softmax(float64):
    strategy = make_strategy("mirrored")
    classes, rate = 40, 0.25
    centres = ShardedCentres(classes, EMBEDDING, default_devices(strategy), seed=3, dtype="float64")
    head = ShardedMarginHead(centres, scale=SCALE, sample_rate=rate, global_batch=BATCH)
    assert [head.sample_count(i) for i in range(2)] == [8, 8]  # max(ceil(0.25 * 20), B)
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(BATCH, EMBEDDING))
    labels = rng.integers(0, classes, BATCH).astype(np.int32)
    margins = rng.uniform(0.2, 0.4, BATCH)

    @tf.function
    def run():
        def replica(context_values):
            return head.per_sample_loss(*context_values, step=tf.constant(5))

        def local(context):
            i, n = context.replica_id_in_sync_group, BATCH // 2
            return tuple(tf.constant(v[i * n:(i + 1) * n]) for v in (embeddings, labels, margins))

        return strategy.run(replica, args=(strategy.experimental_distribute_values_from_function(local),))

    losses, _, sampled = (np.concatenate([np.atleast_1d(t.numpy()) for t in strategy.experimental_local_results(part)])
                          for part in run())
    assert len(sampled) == 16 and len(set(sampled)) == 16
    assert set(labels) <= set(sampled)
    assert len(set(sampled) - set(labels)) > 0  # some negatives were sampled, not all 40 classes
    kernel = centres.full().numpy()[:, sampled]
    cosine = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)) @ (
        kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
    target = np.array([list(sampled).index(label) for label in labels])
    logits = SCALE * cosine
    logits[np.arange(BATCH), target] -= SCALE * margins
    expected = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(BATCH), target]
    np.testing.assert_allclose(losses, expected, rtol=1e-10)


def test_a_checkpoint_of_two_replicas_resumes_on_one(float64, tmp_path):
    mirrored, single = make_strategy("mirrored"), tf.distribute.OneDeviceStrategy("/cpu:0")
    data = batches(4, seed=2)
    straight = build(mirrored, sharded=True)
    run_steps(mirrored, straight, data[:2])
    checkpoint = tf.train.Checkpoint(backbone=straight.backbone, head=straight.head.centres,
                                     optimizer=straight.optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    run_steps(mirrored, straight, data[2:])

    resumed = build(single, sharded=True)
    assert len(resumed.head.centres.kernels) == 1
    tf.train.Checkpoint(backbone=resumed.backbone, head=resumed.head.centres,
                        optimizer=resumed.optimizer).restore(path).assert_existing_objects_matched()
    run_steps(single, resumed, data[2:])
    for a, b in zip(state(straight), state(resumed)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="has 11 classes, this run 12"):
        other = ShardedCentres(12, EMBEDDING, ["/cpu:0"], dtype="float64")
        tf.train.Checkpoint(head=other).restore(path).expect_partial().assert_existing_objects_matched()


def test_the_command_shards_resumes_on_one_replica_and_hands_its_centres_to_a_replicated_stage(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    common = [*TINY, *data_flags(tiny_data), "--eval_data=", f"--model_dir={run_dir}", "--head_sharding=sharded",
              "--partial_fc_rate=0.5", "--checkpoint_every=2"]
    first = run_module(["-m", "mvcom_tf.train", *common, "--cpu_replicas=2", "--strategy=mirrored", "--max_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "identity head, sharded over 2 replica(s): 30 centres per replica" in first.stderr
    resumed = run_module(["-m", "mvcom_tf.train", *common, "--max_steps=6"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/pretrain/ckpt-4 at step 4" in resumed.stderr
    kernel = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "pretrain")).get_tensor("head/.ATTRIBUTES/kernel")
    assert kernel.shape == (16, 60)
    meta = run_module(["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--stage=meta",
                       f"--init_checkpoint={run_dir}/checkpoints/pretrain", f"--model_dir={tmp_path}/meta",
                       "--max_steps=1", "--meta_scope=output_block"])
    assert meta.returncode == 0, meta.stderr[-3000:]
    assert "initialised backbone and identity head" in meta.stderr
    # The meta stage with a sharded head, from the sharded pre-training's checkpoint, on 2 replicas
    # (scope `output_block`: the second-order pass of the whole network takes minutes to trace here, and the
    # equivalence test above already covers it).
    sharded_meta = run_module(["-m", "mvcom_tf.train", *common, "--stage=meta", "--cpu_replicas=2",
                               "--strategy=mirrored", f"--init_checkpoint={run_dir}/checkpoints/pretrain",
                               f"--model_dir={tmp_path}/sharded_meta", "--max_steps=3", "--variation_warmup_steps=1",
                               "--meta_scope=output_block"])
    assert sharded_meta.returncode == 0, sharded_meta.stderr[-3000:]
    kernel = tf.train.load_checkpoint(str(tmp_path / "sharded_meta" / "checkpoints" / "meta")).get_tensor(
        "head/.ATTRIBUTES/kernel")
    assert kernel.shape == (16, 60)
    refused = run_module(["-m", "mvcom_tf.train", *common, "--stage=meta", "--head_warmup_steps=2"])
    assert refused.returncode != 0 and "--head_warmup_steps needs --head_sharding=replicated" in refused.stderr
