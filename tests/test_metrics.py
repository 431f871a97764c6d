"""Typed step outputs: identity sums against numpy, accumulation across steps with absent parts, the pseudo-update."""

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.meta.statistics import MetaSums, VariationSums
from mvcom_tf.meta.step import pseudo_update
from mvcom_tf.losses.margins import wins_without_margin
from mvcom_tf.models.heads import MarginHead
from mvcom_tf.margin_step import MarginStep
from mvcom_tf.training.metrics import IdentitySums, StepSums, accumulate, sums_of_samples, to_numpy


def test_identity_sums_give_the_batch_means_numpy_gives():
    rng = np.random.default_rng(0)
    correct = np.array([True, False, True, True, False, False])
    losses, margins = rng.random(6).astype(np.float32), rng.uniform(0.2, 0.5, 6).astype(np.float32)
    sums = to_numpy(sums_of_samples(tf.constant(losses), tf.constant(correct), tf.constant(margins)))
    scalars = sums.scalars()
    assert scalars["loss"] == pytest.approx(losses.mean(), rel=1e-6)
    assert scalars["accuracy"] == pytest.approx(0.5)
    assert scalars["margin/mean"] == pytest.approx(margins.mean(), rel=1e-6)
    assert scalars["margin/std"] == pytest.approx(margins.std(), rel=1e-4)
    skipped = to_numpy(sums_of_samples(tf.constant(losses * np.nan), tf.constant(correct), tf.constant(margins),
                                       applied=tf.constant(0.0)))
    assert float(skipped.skipped) == 1.0 and float(skipped.count) == 0.0 and float(skipped.loss) == 0.0


def test_training_accuracy_is_the_nearest_centre_without_the_margin():
    rng = np.random.default_rng(4)
    head = MarginHead(5, scale=16.0)
    head.build((None, 3))
    embeddings = rng.normal(size=(40, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 40).astype(np.int32)
    kernel = head.kernel.numpy()
    cosine = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)) @ (kernel / np.linalg.norm(kernel, axis=0))
    nearest = cosine.argmax(axis=1) == labels
    step = MarginStep(None, head, None, tf.fill([5], 0.35), 40)
    _, correct = step.identity_losses(tf.constant(embeddings), tf.constant(labels), tf.fill([40], 0.35))
    np.testing.assert_array_equal(correct.numpy(), nearest)
    # Under the margin fewer samples win: the figure the progress line used to show.
    logits = head(tf.constant(embeddings), tf.constant(labels), tf.fill([40], 0.35)).numpy()
    assert (logits.argmax(axis=1) == labels).sum() < nearest.sum()
    plain = tf.constant(16.0 * cosine[np.arange(40), labels])
    np.testing.assert_array_equal(wins_without_margin(tf.constant(logits), tf.constant(labels), plain).numpy(), nearest)


def test_steps_accumulate_field_by_field_and_absent_parts_take_the_other_side():
    variation = VariationSums({"pose": 1.0}, {"pose": 2.0}, {"pose": 3.0})
    warmup = StepSums(images=8.0, stage=MetaSums(variation))
    step = StepSums(images=8.0, identity=IdentitySums(4.0, 2.0, 1.0, 0.5, 8.0, 0.0),
                    stage=MetaSums(variation, tail=()))
    total = accumulate(accumulate((), warmup), step)
    assert total.images == 16.0 and total.identity == step.identity
    assert total.stage.variation == VariationSums({"pose": 2.0}, {"pose": 4.0}, {"pose": 6.0})
    with pytest.raises(AttributeError):
        total.identity.losses  # a renamed field fails where it is read


def test_pseudo_update_changes_only_the_masked_weights():
    weights = [tf.constant([1.0, 2.0]), tf.constant([3.0]), tf.constant([4.0, 5.0])]
    gradients = [tf.constant([10.0, 20.0]), tf.constant([1.0, -1.0])]  # for weights 0 and 2 only
    updated = pseudo_update(weights, gradients, [True, False, True], tf.constant(0.1))
    np.testing.assert_allclose([u.numpy() for u in updated][0], [0.0, 0.0], atol=1e-6)
    assert updated[1] is weights[1]
    np.testing.assert_allclose(updated[2].numpy(), [3.9, 5.1], rtol=1e-6)
