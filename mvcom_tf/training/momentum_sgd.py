"""Keras' SGD with its momentum update in one kernel per variable."""

from __future__ import annotations

import keras
import tensorflow as tf


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras or TensorFlow variable (under a strategy's update: this device's copy)."""
    return variable.value.handle if isinstance(variable, keras.Variable) else variable.handle


@keras.saving.register_keras_serializable(package="mvcom_tf")
class MomentumSGD(keras.optimizers.SGD):
    """keras.optimizers.SGD whose momentum update is TensorFlow's ResourceApplyKerasMomentum kernel.

    Keras composes `m = m * momentum - lr * g; w += m` from about eight ops a variable; the kernel
    computes the same expression (bit for bit: tests/test_momentum_sgd.py) in one, which takes
    about 40% off the optimizer's share of an IResNet-100 step (docs/benchmarks.md). Weight decay,
    the schedule, Nesterov momentum and everything else stay Keras'.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0 or self.nesterov:
            return super().update_step(gradient, variable, learning_rate)
        momentum = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(momentum), lr=tf.cast(learning_rate, variable.dtype),
            grad=tf.cast(gradient, variable.dtype), momentum=tf.cast(self.momentum, variable.dtype),
            use_locking=False, use_nesterov=False)
        return None
