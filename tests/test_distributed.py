import keras
import numpy as np
import tensorflow as tf

from mvcom_tf.data.pipeline import DecodeFailures
from mvcom_tf.data.tfrecord import read_info
from mvcom_tf.loop import build_state, distributed_batches, make_strategy
from mvcom_tf.steps import MarginStep
from mvcom_tf.train import parse_config


def train_steps(strategy, config, info, steps=2):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        state = build_state(config, info, steps_per_epoch=100)
        step = MarginStep(state.backbone, state.head, state.optimizer,
                          tf.fill([info.num_identities], 0.35), config.batch_size)
    iterator = distributed_batches(strategy, config.train_data, info, config, config.batch_size, 0, 0,
                                   DecodeFailures(), config.seed)

    @tf.function
    def run(iterator):
        strategy.run(step, args=(next(iterator), None))

    for _ in range(steps):
        run(iterator)
    return [v.numpy() for v in state.backbone.weights + state.head.weights + state.optimizer.variables]


def test_mirrored_two_replicas_with_sync_bn_equal_one_device(tiny_data, float64):
    # At initialisation a tiny network's BatchNorm layers amplify float32 rounding, which differs
    # between one sum over 16 images and two sums over 8, by orders of magnitude: float64 shows
    # that the two computations are the same mathematics.
    config = parse_config([f"--train_data={tiny_data}/train", "--batch_size=16", "--width_multiplier=0.125",
                           "--embedding_size=16", "--sync_bn", "--lr=0.05"])
    info = read_info(config.train_data)
    mirrored = make_strategy("mirrored")
    assert mirrored.num_replicas_in_sync == 2
    single = train_steps(tf.distribute.OneDeviceStrategy("/cpu:0"), config, info)
    double = train_steps(mirrored, config, info)
    initial = train_steps(tf.distribute.OneDeviceStrategy("/cpu:0"), config, info, steps=0)
    assert len(single) == len(double)
    # The steps moved the weights, so the equality below means something.
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(single, initial)) > 1e-2
    for a, b in zip(single, double):
        np.testing.assert_allclose(a, b, atol=1e-5)
