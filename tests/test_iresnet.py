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


def _fused_and_keras_twins(policy: str = "float32"):
    """A tiny IResNet with fused BatchNorm and its Keras-BatchNorm twin, same weights, BN scales and shifts drawn
    away from 1 and 0 (so that no statistic is identically zero)."""
    import keras

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras_bn = build_iresnet("iresnet18", 32, 16, width_multiplier=0.125)
        fused = build_iresnet("iresnet18", 32, 16, width_multiplier=0.125, fused_bn=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(3)
    weights = [w + rng.normal(0, 0.2, w.shape).astype(w.dtype) if w.ndim == 1 else w for w in keras_bn.get_weights()]
    keras_bn.set_weights(weights)
    fused.set_weights(weights)
    return keras_bn, fused


def _step_parts(model, images, projection, vector=None):
    """Training-mode embeddings, new BN statistics, gradients of <embeddings, projection>, and (given `vector`)
    the Hessian-vector product of that loss: the derivative the meta step's pseudo-update needs."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    with tf.GradientTape() as outer:
        outer.watch(trainable)
        with tf.GradientTape() as inner:
            inner.watch(trainable)
            embeddings, statistics = model.stateless_call(trainable, non_trainable, images, training=True)
            loss = tf.reduce_sum(tf.cast(embeddings, tf.float32) * projection)
        gradients = inner.gradient(loss, trainable)
        product = tf.add_n([tf.reduce_sum(g * v) for g, v in zip(gradients, vector)]) if vector else None
    hessian_vector = outer.gradient(product, trainable) if vector else None
    return embeddings, statistics, gradients, hessian_vector


def _relative_gap(expected, actual) -> float:
    """max |expected - actual| over max |expected|, over all tensors together (entries with no gradient skipped)."""
    pairs = [(np.asarray(e, np.float64), np.asarray(a, np.float64)) for e, a in zip(expected, actual)
             if e is not None and a is not None]
    return max(np.max(np.abs(e - a)) for e, a in pairs) / max(np.max(np.abs(e)) for e, _ in pairs)


def test_fused_batchnorm_matches_keras_outputs_statistics_and_gradients():
    keras_bn, fused = _fused_and_keras_twins()
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(0.5, 2.0, (4, 32, 32, 3)), tf.float32)
    projection = tf.constant(rng.normal(size=(4, 16)), tf.float32)
    expected, actual = _step_parts(keras_bn, images, projection), _step_parts(fused, images, projection)
    assert _relative_gap([expected[0]], [actual[0]]) < 1e-4
    # Keras' moving variance averages the biased batch variance; at stage 4 (2x2 maps, 16 values a channel)
    # the kernel's Bessel-corrected one would be 6.7% larger.
    assert _relative_gap(expected[1], actual[1]) < 1e-4
    assert _relative_gap(expected[2], actual[2]) < 1e-4
    # Inference is Keras' path in both.
    np.testing.assert_array_equal(keras_bn(images, training=False), fused(images, training=False))
    assert fused.get_layer("stem_bn").get_config()["fused"] is True


def test_fused_batchnorm_runs_in_bfloat16_without_casts_to_float32():
    keras_bn, fused = _fused_and_keras_twins("mixed_bfloat16")
    layer = fused.get_layer("stage1_block1_bn1")
    inputs = tf.random.normal([2, 8, 8, layer.gamma.shape[0]], seed=0)
    graph = tf.function(lambda x: layer(tf.cast(x, tf.bfloat16), training=True)).get_concrete_function(inputs).graph
    op_types = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in op_types and "Mean" not in op_types
    # Against the float32 network, bfloat16 with the fused kernel errs about as much as with Keras' BatchNorm
    # (which normalises in float32 between bfloat16 convolutions).
    reference = _fused_and_keras_twins()[0]
    reference.set_weights(keras_bn.get_weights())
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(0.5, 2.0, (4, 32, 32, 3)), tf.float32)
    projection = tf.constant(rng.normal(size=(4, 16)), tf.float32)
    exact = list(_step_parts(reference, images, projection))
    keras_parts = list(_step_parts(keras_bn, images, projection))
    fused_parts = list(_step_parts(fused, images, projection))
    exact[0], keras_parts[0], fused_parts[0] = [exact[0]], [keras_parts[0]], [fused_parts[0]]
    for index in (0, 2):  # the embeddings, the gradients
        keras_error, fused_error = _relative_gap(exact[index], keras_parts[index]), _relative_gap(exact[index],
                                                                                                  fused_parts[index])
        assert fused_error < 2 * keras_error + 0.01


def test_fused_batchnorm_second_derivative_is_why_the_meta_stage_refuses_it():
    """TensorFlow's gradient of FusedBatchNormGradV3 is not the exact second derivative: what --fused_bn's
    validator guards against. If a TensorFlow release makes it exact, this fails: the meta stage may then allow
    --fused_bn."""
    keras_bn, fused = _fused_and_keras_twins()
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(0.5, 2.0, (4, 32, 32, 3)), tf.float32)
    projection = tf.constant(rng.normal(size=(4, 16)), tf.float32)
    vector = [tf.constant(rng.normal(size=v.shape), tf.float32) for v in keras_bn.trainable_variables]
    keras_product = _step_parts(keras_bn, images, projection, vector)[3]
    fused_product = _step_parts(fused, images, projection, vector)[3]
    gradient_gap = _relative_gap(_step_parts(keras_bn, images, projection)[2],
                                 _step_parts(fused, images, projection)[2])
    assert gradient_gap < 1e-4 and _relative_gap(keras_product, fused_product) > 100 * gradient_gap


def test_fused_batchnorm_is_refused_with_the_meta_stage():
    from absl import flags

    from mvcom_tf.config_flags import parse_config

    assert parse_config(["--train_data=x", "--fused_bn"]).model.fused_bn
    with pytest.raises(flags.IllegalFlagValueError, match="--fused_bn is for the pretrain and finetune stages"):
        parse_config(["--train_data=x", "--meta_data=m", "--fused_bn", "--stage=pretrain,meta"])


def test_fused_batchnorm_context_fuses_a_pass_and_puts_the_layers_back():
    from mvcom_tf.models.iresnet import BatchNormalization, fused_batchnorm

    keras_bn, fused = _fused_and_keras_twins()
    images = tf.constant(np.random.default_rng(0).normal(0.5, 2.0, (4, 32, 32, 3)), tf.float32)
    norms = [layer for layer in keras_bn.layers if isinstance(layer, BatchNormalization)]
    with fused_batchnorm(keras_bn):
        assert all(layer.fused for layer in norms)
        inside = keras_bn(images, training=True)
    assert not any(layer.fused for layer in norms)
    np.testing.assert_allclose(inside, fused(images, training=True), rtol=0, atol=1e-6)
    assert _relative_gap([keras_bn(images, training=True)], [inside]) < 1e-4
