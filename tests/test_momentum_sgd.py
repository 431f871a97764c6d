"""MomentumSGD: Keras' SGD, bit for bit, with its momentum update in one kernel, on one device and two replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.training.momentum_sgd import MomentumSGD


def _train(optimizer_class, strategy, steps: int = 4, **options):
    """Weights and momenta after `steps` SGD steps of a small network (same data, same start) under `strategy`."""
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
        optimizer = optimizer_class(schedule, **options)
        optimizer.build(model.trainable_variables)
    images = tf.constant(np.random.default_rng(1).normal(size=(8, 6)), tf.float32)
    replicas = strategy.num_replicas_in_sync

    @tf.function
    def step():
        def replica(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x, training=True) - 1.0)) / 8
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        strategy.run(replica, args=(images[: 8 // replicas],))

    for _ in range(steps):
        step()
    return [v.numpy() for v in model.trainable_variables + optimizer.variables]


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("options", [{"momentum": 0.9, "weight_decay": 5e-4}, {"momentum": 0.9},
                                     {"momentum": 0.9, "nesterov": True}, {"momentum": 0.0}])
def test_momentum_sgd_is_keras_sgd_bit_for_bit(replicas, options):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if replicas == 2 else tf.distribute.get_strategy()
    expected = _train(keras.optimizers.SGD, strategy, **options)
    actual = _train(MomentumSGD, strategy, **options)
    assert len(expected) == len(actual)
    for keras_value, our_value in zip(expected, actual):
        np.testing.assert_array_equal(keras_value, our_value)
    assert not np.array_equal(expected[0], _train(keras.optimizers.SGD, strategy, steps=0, **options)[0])


def test_momentum_sgd_runs_one_kernel_per_variable():
    def op_types(optimizer_class) -> list[str]:
        variables = [tf.Variable(tf.ones([4])), tf.Variable(tf.ones([2, 3]))]
        optimizer = optimizer_class(0.1, momentum=0.9)
        optimizer.build(variables)
        specs = [tf.TensorSpec(v.shape, tf.float32) for v in variables]
        graph = tf.function(lambda *g: optimizer.apply_gradients(zip(g, variables))).get_concrete_function(
            *specs).graph
        return [op.type for op in graph.get_operations()]

    ours, keras_ops = op_types(MomentumSGD), op_types(keras.optimizers.SGD)
    assert ours.count("ResourceApplyKerasMomentum") == 2 and "ResourceApplyKerasMomentum" not in keras_ops
    assert len(ours) < len(keras_ops)
