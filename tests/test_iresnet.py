import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.models.iresnet import build_iresnet, output_block_variables


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def test_iresnet100_has_65_2m_parameters_and_512d_output():
    model = build_iresnet("iresnet100", 112, 512)
    assert abs(count(model.trainable_variables) - 65.2e6) <= 0.1e6
    assert model.output_shape == (None, 512)
    # 100 layers: the stem, two convolutions in each of 3 + 13 + 30 + 3 blocks, and the embedding layer.
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D" and "downsample" not in layer.name]
    assert len(convs) + 1 == 100


@pytest.mark.parametrize("name,blocks", [("iresnet18", 8), ("iresnet34", 16), ("iresnet50", 24)])
def test_smaller_depths_share_the_code(name, blocks):
    model = build_iresnet(name, 32, 16, width_multiplier=0.125)
    assert model.output_shape == (None, 16)
    assert sum(layer.name.endswith("_add") for layer in model.layers) == blocks


def test_rejects_bad_sizes_and_names():
    with pytest.raises(ValueError, match="divisible by 16"):
        build_iresnet("iresnet18", 40)
    with pytest.raises(ValueError, match="iresnet99"):
        build_iresnet("iresnet99", 32)


def test_output_block_is_the_last_bn_dense_bn():
    model = build_iresnet("iresnet18", 32, 16, width_multiplier=0.125)
    names = {v.path.split("/")[0] for v in output_block_variables(model)}
    assert names == {"output_bn", "output_fc", "output_features"}


def test_tiny_iresnet_trains():
    tf.keras.utils.set_random_seed(0)
    model = build_iresnet("iresnet18", 32, 8, width_multiplier=0.125)
    images = tf.random.normal([16, 32, 32, 3], seed=1)
    targets = tf.one_hot(tf.range(16) % 4, 8) * 3.0
    optimizer = tf.keras.optimizers.SGD(0.05, momentum=0.9)

    def loss_value():
        return tf.reduce_mean(tf.square(model(images, training=True) - targets))

    first = float(loss_value())
    for _ in range(30):
        with tf.GradientTape() as tape:
            loss = loss_value()
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    assert float(loss_value()) < 0.5 * first


def _pair_of_layers(rank, scale=True):
    """A FusedBatchNormalization and a Keras BatchNormalization with the same (non-trivial) weights."""
    import keras

    from mvcom_tf.models.iresnet import FusedBatchNormalization

    shape = (None, 5, 5, 6) if rank == 4 else (None, 6)
    fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, scale=scale)
    plain = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, scale=scale)
    rng = np.random.default_rng(0)
    for layer in (fused, plain):
        layer.build(shape)
    for a, b in zip(fused.weights, plain.weights):
        value = rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        a.assign(value)
        b.assign(value)
    return fused, plain


@pytest.mark.parametrize("rank,scale", [(4, True), (2, False)])
def test_fused_batch_norm_equals_keras_to_second_order(rank, scale):
    """Outputs, moving statistics, gradients, and the second-order product the meta step takes through them."""
    fused, plain = _pair_of_layers(rank, scale)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(2.0, 3.0, (4, 5, 5, 6) if rank == 4 else (12, 6)), tf.float32)
    probe = tf.constant(rng.normal(size=x.shape), tf.float32)
    direction = tf.constant(rng.normal(size=x.shape), tf.float32)
    results = {}
    for name, layer in (("fused", fused), ("plain", plain)):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.sin(y) * probe)
            grads = inner.gradient(loss, [x, *layer.trainable_variables])
            second = tf.reduce_sum(grads[0] * direction)
        results[name] = [y, *grads, outer.gradient(second, x), *layer.non_trainable_variables]
    assert len(results["fused"]) == len(results["plain"])
    for a, b in zip(results["fused"], results["plain"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)
    # Inference uses the moving statistics (Keras' own path).
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), rtol=1e-5, atol=1e-5)


def test_fused_batch_norm_keeps_bfloat16_activations():
    import keras

    from mvcom_tf.models.iresnet import FusedBatchNormalization

    layer = FusedBatchNormalization(dtype="mixed_bfloat16")
    x = tf.constant(np.random.default_rng(2).normal(1.0, 2.0, (4, 5, 5, 6)), tf.float32)
    y = layer(x, training=True)
    assert y.dtype == tf.bfloat16 and layer.moving_mean.dtype == tf.float32
    reference = keras.layers.BatchNormalization()(x, training=True)
    np.testing.assert_allclose(tf.cast(y, tf.float32), reference, atol=0.05)
