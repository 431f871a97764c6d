import math

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.losses.margins import identity_loss
from mvcom_tf.models.heads import MarginHead, VariationHeads


def numpy_logits(embeddings, kernel, labels, margins, loss, scale):
    """Independent reference: angles explicitly, then cos(theta + m) or cos(theta) - m on the target."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cosine = e @ w
    logits = cosine.copy()
    for i, (y, m) in enumerate(zip(labels, margins)):
        if loss == "cosface":
            logits[i, y] = cosine[i, y] - m
        else:
            theta = math.acos(np.clip(cosine[i, y], -1, 1))
            logits[i, y] = math.cos(theta + m) if theta + m <= math.pi else cosine[i, y] - m * math.sin(m)
    return logits * scale


def numpy_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


@pytest.mark.parametrize("loss", ["cosface", "arcface"])
def test_margin_logits_and_loss_match_numpy(loss):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(12, 8))
    labels = rng.integers(0, 5, 12)
    margins = rng.uniform(0.1, 0.6, 12)
    head = MarginHead(5, loss=loss, scale=30.0)
    head.build((None, 8))
    kernel = head.kernel.numpy().astype(np.float64)
    logits = head(tf.constant(embeddings, tf.float32), tf.constant(labels), tf.constant(margins, tf.float32))
    expected = numpy_logits(embeddings, kernel, labels, margins, loss, 30.0)
    np.testing.assert_allclose(logits.numpy(), expected, atol=2e-4)
    np.testing.assert_allclose(identity_loss(logits, tf.constant(labels)).numpy(),
                               numpy_cross_entropy(expected, labels), rtol=1e-4, atol=1e-4)


def test_arcface_past_pi_falls_back_to_cosface_form():
    head = MarginHead(2, loss="arcface", scale=1.0)
    head.build((None, 2))
    head.kernel.assign([[1.0, 0.0], [0.0, 1.0]])
    # The sample points almost opposite its class centre: theta close to pi, theta + m > pi.
    logits = head(tf.constant([[-1.0, 0.01]]), tf.constant([0]), tf.constant([0.5]))
    cosine = -1.0 / math.hypot(1.0, 0.01)
    assert logits.numpy()[0, 0] == pytest.approx(cosine - 0.5 * math.sin(0.5), abs=1e-5)


@pytest.mark.parametrize("loss", ["cosface", "arcface"])
def test_zero_margin_is_plain_scaled_cosine_softmax(loss):
    rng = np.random.default_rng(1)
    embeddings = tf.constant(rng.normal(size=(6, 4)), tf.float32)
    head = MarginHead(3, loss=loss, scale=16.0)
    head.build((None, 4))
    labels = tf.constant([0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(head(embeddings, labels, margins=0.0).numpy(), 16.0 * head.cosine(embeddings).numpy(),
                               atol=1e-4)


def test_scalar_margin_equals_per_sample_constant():
    head = MarginHead(4, scale=64.0)
    embeddings = tf.random.normal([5, 6], seed=2)
    labels = tf.constant([0, 1, 2, 3, 0])
    head.build((None, 6))
    np.testing.assert_allclose(head(embeddings, labels, margins=0.35).numpy(),
                               head(embeddings, labels, tf.fill([5], 0.35)).numpy())


def test_heads_round_trip_their_config():
    head = MarginHead.from_config(MarginHead(7, loss="arcface", scale=32.0).get_config())
    assert (head.num_classes, head.loss, head.scale) == (7, "arcface", 32.0)
    with pytest.raises(ValueError, match="sphereface"):
        MarginHead(3, loss="sphereface")
    heads = VariationHeads()
    outputs = heads(tf.zeros([2, 8]))
    assert {k: v.shape[-1] for k, v in outputs.items()} == {"pose": 7, "occlusion": 5, "blur": 4, "ethnicity": 4}


def test_a_cosface_margin_only_rescales_a_samples_gradient_by_one_minus_p_y():
    # benchmarks/meta_signal.py's tail_weight rests on this: on fixed features a per-sample CosFace margin
    # multiplies the sample's whole gradient (embedding and centres) by (1 - p_y), so it is a weight in [0, 1].
    rng = np.random.default_rng(3)
    head = MarginHead(5, loss="cosface", scale=16.0, dtype="float64")
    head.build((None, 8))
    head.kernel.assign(rng.normal(size=(8, 5)))
    labels = tf.constant(rng.integers(0, 5, 6))
    # Near their centres, so that p_y is far from 0 and the margins below change it.
    embeddings = tf.constant(head.kernel.numpy().T[labels.numpy()] + rng.normal(0, 0.01, (6, 8)), tf.float64)
    gradients, weights = [], []
    for margin in (0.0, 0.35, 1.0):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            per_sample = identity_loss(head(embeddings, labels, tf.fill([6], tf.constant(margin, tf.float64))), labels)
        jacobian = tape.jacobian(per_sample, embeddings)  # [sample, sample, feature]: each row its own sample
        gradients.append(np.einsum("iif->if", jacobian.numpy()))
        weights.append(1.0 - np.exp(-per_sample.numpy()))
    for gradient, weight in zip(gradients[1:], weights[1:]):
        np.testing.assert_allclose(gradient, gradients[0] * (weight / weights[0])[:, None], rtol=1e-9, atol=1e-12)
    assert np.all(weights[0] < 0.5) and np.all(weights[0] < weights[1]) and np.all(weights[1] < weights[2])
