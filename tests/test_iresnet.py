import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.models.iresnet import build_iresnet, output_block_layers


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
    layers = output_block_layers(model)
    assert [layer.name for layer in layers] == ["output_bn", "output_dropout", "output_flatten", "output_fc",
                                                "output_features"]
    assert layers[-1] is model.layers[-1]
    names = {v.path.split("/")[0] for layer in layers for v in layer.trainable_variables}
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
