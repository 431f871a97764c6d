"""Per-sample loss weights: the meta step's learned weights against finite differences (one device and two
replicas), learning to reweight's normalisation, GroupDRO against a loop, the data-side weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.data.sample_weights import DataWeighting, class_weight, class_weight_tables
from mvcom_tf.losses.group_dro import GroupDRO
from mvcom_tf.training.distribute import make_strategy
from tests.helpers import BATCH, ETA, META, build, make_batches, run_per_replica


def meta_gradients_under(strategy, meta_step, batch, meta):
    """dL_meta/d eps [B] and the learned weights [B], computed per replica on its slice of both batches."""
    def derivative_and_weights(b, m):
        _, derivative, _ = meta_step.meta_gradients(b, m, meta_step.margin_step.margins(b), meta_step.trunk_features(m))
        return derivative, meta_step.weights_from(derivative, b.get("weight"))

    return run_per_replica(strategy, derivative_and_weights, batch, meta)


def meta_loss_after_weighted_pseudo_update(meta_step, batch, meta, sample_weights):
    """Independent reference: a real SGD step of a cloned network on sum_j w_j L_j / B at the prior margins, then
    the sum over factors of the variation losses of V (unknown labels excluded by hand)."""
    source = meta_step.margin_step
    clone = keras.models.clone_model(source.backbone)
    clone.set_weights(source.backbone.get_weights())
    margins = source.margins(batch)
    with tf.GradientTape() as tape:
        logits = source.head(clone(batch["image"], training=True), batch["identity"], margins)
        per_sample = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["identity"], logits)
        loss = tf.reduce_sum(tf.constant(sample_weights) * per_sample) / BATCH
    variables = [v for v, m in zip(clone.trainable_variables, meta_step.pseudo_mask) if m]
    for variable, gradient in zip(variables, tape.gradient(loss, variables)):
        variable.assign_sub(ETA * gradient)
    features = clone(meta["image"], training=True).numpy()
    total = 0.0
    for factor, layer in meta_step.variation_heads.classifiers.items():
        logits = features @ layer.kernel.numpy() + layer.bias.numpy()
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        labels = meta[factor].numpy()
        known = labels >= 0
        total += -log_probs[np.arange(META)[known], labels[known]].sum() / META
    return total


@pytest.mark.parametrize("strategy_name,scope,sync_bn", [("default", "all", False), ("default", "output_block", False),
                                                         ("mirrored", "all", True)])
def test_weight_meta_gradient_is_the_finite_difference_and_weights_follow_learning_to_reweight(
        float64, strategy_name, scope, sync_bn):
    strategy = make_strategy(strategy_name)
    meta_step = build(strategy, scope=scope, sync_bn=sync_bn, target="weights")
    batch, meta = make_batches()
    derivative, weights = meta_gradients_under(strategy, meta_step, batch, meta)
    epsilon = 1e-5
    for j in (0, 3, 6):
        up, down = np.ones(BATCH), np.ones(BATCH)
        up[j] += epsilon
        down[j] -= epsilon
        difference = (meta_loss_after_weighted_pseudo_update(meta_step, batch, meta, up)
                      - meta_loss_after_weighted_pseudo_update(meta_step, batch, meta, down)) / (2 * epsilon)
        assert abs(difference) > 1e-8, j  # a real signal
        assert derivative[j] == pytest.approx(difference, rel=1e-4), j
    # Ren et al.: w = max(-g, 0) / sum, here scaled to mean 1 over the global batch.
    raw = np.maximum(-derivative, 0.0)
    assert 0 < np.count_nonzero(raw) < BATCH  # some samples help V, some do not
    np.testing.assert_allclose(weights, raw * BATCH / raw.sum(), rtol=1e-10)


@pytest.mark.parametrize("strategy_name,scope,sync_bn", [("default", "output_block", False), ("mirrored", "all", True)])
def test_learned_weights_on_data_weights_count_each_weight_once(float64, strategy_name, scope, sync_bn):
    """With --loss_weighting's weights u, eps is added to u: g_j is the finite difference of the meta loss in u_j
    (u_j not in it a second time), w is normalised so that sum u w = sum u over the global batch, and the real
    update weighs u_j w_j."""
    strategy = make_strategy(strategy_name)
    meta_step = build(strategy, scope=scope, sync_bn=sync_bn, target="weights", tau=0.0)
    batch, meta = make_batches()
    data_weights = np.linspace(0.5, 3.0, BATCH)
    batch = {**batch, "weight": tf.constant(data_weights)}
    derivative, weights = meta_gradients_under(strategy, meta_step, batch, meta)
    epsilon = 1e-5
    for j in (1, BATCH - 1):  # u_j = 0.5 + 2.5 / (B - 1) and 3
        up, down = data_weights.copy(), data_weights.copy()
        up[j] += epsilon
        down[j] -= epsilon
        difference = (meta_loss_after_weighted_pseudo_update(meta_step, batch, meta, up)
                      - meta_loss_after_weighted_pseudo_update(meta_step, batch, meta, down)) / (2 * epsilon)
        assert abs(difference) > 1e-8, j
        assert derivative[j] == pytest.approx(difference, rel=1e-4), j
    raw = np.maximum(-derivative, 0.0)
    np.testing.assert_allclose(weights, raw * data_weights.sum() / (data_weights * raw).sum(), rtol=1e-10)
    if strategy_name == "mirrored":
        return  # the real update's weighting is the same code on one device
    plain = build(strategy, tau=0.0).margin_step
    meta_step(batch, meta)
    plain({**batch, "weight": tf.constant(data_weights * weights)})
    for a, b in zip(meta_step.margin_step.backbone.get_weights(), plain.backbone.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_weight_mix_and_both_targets(float64):
    strategy = tf.distribute.get_strategy()
    batch, meta = make_batches()
    derivative, pure = meta_gradients_under(strategy, build(strategy, target="weights"), batch, meta)
    _, mixed = meta_gradients_under(strategy, build(strategy, target="weights", weight_mix=0.25), batch, meta)
    np.testing.assert_allclose(mixed, 0.75 + 0.25 * pure, rtol=1e-12)
    _, sharper = meta_gradients_under(strategy, build(strategy, target="weights", weight_power=2.0), batch, meta)
    squared = np.maximum(-derivative, 0.0) ** 2
    np.testing.assert_allclose(sharper, squared * BATCH / squared.sum(), rtol=1e-10)
    # `both` learns the margins' residuals from the same pseudo-update: the same as `margins` alone.
    both = build(strategy, target="both")
    margins_only = build(strategy, target="margins")
    prior = both.margin_step.margins(batch)
    margin_both, weight_both, _ = both.meta_gradients(batch, meta, prior)
    margin_alone, weight_alone, _ = margins_only.meta_gradients(batch, meta, prior)
    assert weight_alone is None
    np.testing.assert_allclose(margin_both.numpy(), margin_alone.numpy(), rtol=1e-12)
    np.testing.assert_allclose(weight_both.numpy(), derivative, rtol=1e-12)


def test_a_weights_step_applies_the_learned_weights_in_the_real_update(float64):
    """The real update of --meta_target=weights equals a plain margin step on the learned weights' loss."""
    strategy = tf.distribute.get_strategy()
    batch, meta = make_batches()
    meta_step = build(strategy, target="weights", tau=0.0)
    _, weights = meta_gradients_under(strategy, meta_step, batch, meta)
    plain = build(strategy, tau=0.0).margin_step
    meta_step(batch, meta)
    plain({**batch, "weight": tf.constant(weights)})
    after = meta_step.margin_step.backbone.get_weights() + meta_step.margin_step.head.get_weights()
    reference = plain.backbone.get_weights() + plain.head.get_weights()
    unweighted = build(strategy, tau=0.0).margin_step
    unweighted(batch)
    assert max(np.abs(a - b).max() for a, b in zip(reference, unweighted.backbone.get_weights()
                                                  + unweighted.head.get_weights())) > 1e-8
    for a, b in zip(after, reference):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def group_dro_reference(q, labels, losses, step_size, batch_size):
    """Loop reference: per factor, move q towards the present groups' mean losses, then the per-sample weights."""
    weights, moved_q = np.zeros(len(losses)), {}
    for factor in schema.FACTORS:
        classes = schema.NUM_CLASSES[factor]
        moved = q[factor].copy()
        present = [c for c in range(classes) if np.any(labels[factor] == c)]
        for c in present:
            moved[c] *= np.exp(step_size * losses[labels[factor] == c].mean())
        moved /= moved.sum()
        mass = sum(moved[c] for c in present)
        for j, c in enumerate(labels[factor]):
            weights[j] += 1.0 if c < 0 else moved[c] * batch_size / (mass * np.sum(labels[factor] == c))
        moved_q[factor] = moved
    return weights / len(schema.FACTORS), moved_q


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_group_dro_weights_and_q_match_a_loop(strategy_name):
    strategy = make_strategy(strategy_name)
    rng = np.random.default_rng(4)
    n = 12
    labels = {f: rng.integers(-1, schema.NUM_CLASSES[f], n).astype(np.int32) for f in schema.FACTORS}
    losses = [rng.uniform(0.5, 8.0, n) for _ in range(2)]
    with strategy.scope():
        dro = GroupDRO(step_size=0.3)
    replicas = strategy.num_replicas_in_sync

    @tf.function
    def step(loss_values, commit):
        def fn():
            context = tf.distribute.get_replica_context()
            i, m = context.replica_id_in_sync_group, n // replicas
            batch = {f: tf.constant(v)[i * m:(i + 1) * m] for f, v in labels.items()}
            return dro.weights(batch, tf.cast(loss_values, tf.float32)[i * m:(i + 1) * m], n, commit)
        return strategy.run(fn)

    q = {f: np.full(schema.NUM_CLASSES[f], 1.0 / schema.NUM_CLASSES[f]) for f in schema.FACTORS}
    for loss_values in losses:  # two steps: the second starts from the first's q
        expected, moved = group_dro_reference(q, labels, loss_values, 0.3, n)
        peek = np.concatenate([t.numpy() for t in strategy.experimental_local_results(step(loss_values, False))])
        np.testing.assert_allclose(peek, expected, rtol=1e-5)
        for f in schema.FACTORS:  # a pseudo-update's weights leave q alone
            np.testing.assert_allclose(dro.q[f].numpy(), q[f], rtol=1e-6)
        weights = np.concatenate([t.numpy() for t in strategy.experimental_local_results(step(loss_values, True))])
        np.testing.assert_allclose(weights, expected, rtol=1e-5)
        for f in schema.FACTORS:
            np.testing.assert_allclose(dro.q[f].numpy(), moved[f], rtol=1e-5)
        q = moved
    # The worst group gains weight: a factor's class with the highest mean loss ends with the largest q.
    pose = labels["pose"]
    means = {c: np.mean([l[pose == c].mean() for l in losses]) for c in set(pose.tolist()) if c >= 0}
    assert int(np.argmax(q["pose"])) == max(means, key=means.get)


def test_balanced_weights_are_resamplings_ratios_with_mean_one():
    histograms = {"pose": [1, 2, 3, 90, 2, 1, 1], "occlusion": [80, 5, 5, 5, 5], "blur": [97, 1, 1, 1],
                  "ethnicity": [25, 25, 25, 25]}
    tables = class_weight_tables(histograms)
    assert tables[0][3] == pytest.approx(100 / 90 / 7) and tables[0][0] == pytest.approx(100 / 7)
    # The mean weight over a split with these histograms (each factor's labels independent): 1.
    expected = np.mean([sum(c * t for c, t in zip(histograms[f], table)) / 100
                        for f, table in zip(schema.FACTORS, tables)])
    assert expected == pytest.approx(1.0)
    features = {"pose": tf.constant([0, 3, -1]), "occlusion": tf.constant([0, 1, -1]),
                "blur": tf.constant([0, 3, -1]), "ethnicity": tf.constant([2, 2, -1])}
    weights = class_weight(tables, features).numpy()
    assert weights[2] == pytest.approx(1.0)  # every label unknown: weight 1
    assert weights[0] == pytest.approx((100 / 7 + 100 / 80 / 5 + 100 / 97 / 4 + 1.0) / 4, rel=1e-6)


def test_error_set_weights_upweight_the_listed_images_with_mean_one(tmp_path):
    path = tmp_path / "errors.txt"
    path.write_text("# made by a test\nimg-a\nimg-c\n")
    weight_fn = DataWeighting("error_set", str(path), upweight=5.0).weight_fn({}, num_images=10)
    weights = np.array([float(weight_fn({"source": tf.constant(s)})) for s in ["img-a", "img-b", "img-c"]])
    mean = 1 + 4 * 2 / 10
    np.testing.assert_allclose(weights, [5 / mean, 1 / mean, 5 / mean], rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="--error_set: .*missing.txt does not exist"):
        DataWeighting("error_set", str(tmp_path / "missing.txt"), 5.0).weight_fn({}, 10)
