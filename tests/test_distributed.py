"""MirroredStrategy over two logical CPUs takes the steps one device takes with the whole batch."""

import keras
import numpy as np
import tensorflow as tf

from mvcom_tf.config_flags import parse_config
from mvcom_tf.data.pipeline import DecodeFailures
from mvcom_tf.stages.build import build_stage
from mvcom_tf.training.distribute import InputOptions, distributed_batches, make_strategy
from tests.helpers import DEMO


def train_steps(strategy, config, steps=2):
    keras.utils.set_random_seed(0)
    stage = build_stage(config, "pretrain", strategy)
    options = InputOptions(config.model.image_size, config.data.shuffle_buffer)
    iterator = distributed_batches(strategy, stage.train, options, range(max(steps, 1)), stage.steps_per_epoch,
                                   DecodeFailures())

    @tf.function
    def run(iterator):
        strategy.run(stage.replica_step(0), args=(next(iterator),))

    for _ in range(steps):
        run(iterator)
    return [v.numpy() for v in stage.backbone.weights + stage.head.weights + stage.optimizer.variables]


def test_mirrored_two_replicas_with_sync_bn_equal_one_device(tiny_data, float64):
    # At initialisation a tiny network's BatchNorm layers amplify float32 rounding, which differs
    # between one sum over 16 images and two sums over 8, by orders of magnitude: float64 shows
    # that the two computations are the same mathematics.
    config = parse_config([DEMO, f"--train_data={tiny_data}/train", "--batch_size=16", "--width_multiplier=0.125",
                           "--embedding_size=16", "--sync_bn", "--lr=0.05", "--stage=pretrain"])
    mirrored = make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    single = train_steps(tf.distribute.OneDeviceStrategy("/cpu:0"), config)
    double = train_steps(mirrored, config)
    initial = train_steps(tf.distribute.OneDeviceStrategy("/cpu:0"), config, steps=0)
    assert len(single) == len(double)
    # The steps moved the weights, so the equality below means something.
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(single, initial)) > 1e-2
    for a, b in zip(single, double):
        np.testing.assert_allclose(a, b, atol=1e-5)
