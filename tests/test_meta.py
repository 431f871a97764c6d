"""The MvCoM meta stage: the meta-gradient against finite differences, tau = 0, unknown labels, the prior, sampling."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.losses.contrastive import class_balanced_sums, contrastive_losses
from mvcom_tf.losses.margins import class_aware_margins
from mvcom_tf.training.distribute import make_strategy
from mvcom_tf.meta.sampling import select_meta_batch
from tests.helpers import BATCH, ETA, META, SCALE, build, make_batches, run_per_replica


def residuals_under(strategy, meta_step, batch, meta):
    """r [B, 4] computed per replica (each replica gets its slice of both batches)."""
    def residuals(b, m):
        return meta_step.residuals(b, m, meta_step.margin_step.margins(b), meta_step.trunk_features(m))[0]

    return run_per_replica(strategy, residuals, batch, meta)


def features_after_pseudo_update(meta_step, batch, meta, margins):
    """Independent reference: copy the weights into a fresh network, take a real SGD step with
    variable assignments, then V's features (numpy)."""
    source = meta_step.margin_step
    clone = keras.models.clone_model(source.backbone)
    clone.set_weights(source.backbone.get_weights())
    with tf.GradientTape() as tape:
        logits = source.head(clone(batch["image"], training=True), batch["identity"], tf.constant(margins))
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(batch["identity"], logits)) / BATCH
    variables = [v for v, m in zip(clone.trainable_variables, meta_step.pseudo_mask) if m]
    for variable, gradient in zip(variables, tape.gradient(loss, variables)):
        variable.assign_sub(ETA * gradient)
    return clone(meta["image"], training=True).numpy()


def variation_losses_after_pseudo_update(meta_step, batch, meta, margins):
    """The variation losses on V after the reference pseudo update (unknown labels excluded by hand)."""
    features = features_after_pseudo_update(meta_step, batch, meta, margins)
    losses = {}
    for factor, layer in meta_step.variation_heads.classifiers.items():
        logits = (features @ layer.kernel.numpy() + layer.bias.numpy())
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        labels = meta[factor].numpy()
        known = labels >= 0
        losses[factor] = -log_probs[np.arange(META)[known], labels[known]].sum() / META
    return losses


@pytest.mark.parametrize("strategy_name,scope,sync_bn,network", [
    ("default", "all", False, "iresnet18"), ("default", "output_block", False, "small"),
    ("default", "all", True, "small"), ("mirrored", "all", True, "small")])
def test_residual_update_is_minus_tau_times_the_finite_difference(float64, strategy_name, scope, sync_bn, network):
    strategy = make_strategy(strategy_name)
    meta_step = build(strategy, scope=scope, tau=1.0, sync_bn=sync_bn, network=network)
    batch, meta = make_batches()
    residuals = residuals_under(strategy, meta_step, batch, meta)
    prior = meta_step.margin_step.margins(batch).numpy()
    epsilon = 1e-4
    for j in (0, 3, 6):
        up, down = prior.copy(), prior.copy()
        up[j] += epsilon
        down[j] -= epsilon
        plus = variation_losses_after_pseudo_update(meta_step, batch, meta, up)
        minus = variation_losses_after_pseudo_update(meta_step, batch, meta, down)
        for k, factor in enumerate(schema.FACTORS):
            derivative = (plus[factor] - minus[factor]) / (2 * epsilon)
            assert abs(derivative) > 1e-8, (factor, j)  # a real signal, not 0 = 0
            assert residuals[j, k] == pytest.approx(-derivative, rel=1e-4), (factor, j)


def supervised_contrastive(features, identities, scale):
    """Loop reference of the per-anchor supervised contrastive loss."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    logits = scale * unit @ unit.T
    losses = []
    for i in range(len(features)):
        others = [j for j in range(len(features)) if j != i]
        denominator = np.log(np.sum(np.exp(logits[i, others])))
        positives = [p for p in others if identities[p] == identities[i]]
        losses.append(-np.mean([logits[i, p] - denominator for p in positives]) if positives else 0.0)
    return np.array(losses)


def class_balanced(per_sample, labels, factor):
    """Mean over the factor's classes present (unknown labels in none) of the mean loss in each class."""
    present = sorted({int(label) for label in labels if label >= 0})
    return np.mean([per_sample[labels == c].mean() for c in present])


def verification_objective_after_pseudo_update(meta_step, batch, meta, margins, replicas):
    """Each replica's half of V scored on its own (positives within it), the classes balanced over all of V."""
    features = features_after_pseudo_update(meta_step, batch, meta, margins)
    identities = meta["identity"].numpy()
    n = META // replicas
    per_sample = np.concatenate([supervised_contrastive(features[r * n:(r + 1) * n], identities[r * n:(r + 1) * n],
                                                        SCALE) for r in range(replicas)])
    return {factor: class_balanced(per_sample, meta[factor].numpy(), factor) for factor in schema.FACTORS}


@pytest.mark.parametrize("strategy_name,scope,sync_bn", [("default", "output_block", False), ("mirrored", "all", True)])
def test_verification_objective_residual_is_minus_tau_times_the_finite_difference(float64, strategy_name, scope,
                                                                                  sync_bn):
    strategy = make_strategy(strategy_name)
    # Two replicas: synchronised BatchNorm, so that each normalises with the whole batch as the reference does.
    meta_step = build(strategy, scope=scope, tau=1.0, objective="verification", sync_bn=sync_bn)
    batch, meta = make_batches()
    residuals = residuals_under(strategy, meta_step, batch, meta)
    prior = meta_step.margin_step.margins(batch).numpy()
    epsilon = 1e-4
    replicas = strategy.num_replicas_in_sync
    for j in (0, 5):
        up, down = prior.copy(), prior.copy()
        up[j] += epsilon
        down[j] -= epsilon
        plus = verification_objective_after_pseudo_update(meta_step, batch, meta, up, replicas)
        minus = verification_objective_after_pseudo_update(meta_step, batch, meta, down, replicas)
        for k, factor in enumerate(schema.FACTORS):
            derivative = (plus[factor] - minus[factor]) / (2 * epsilon)
            assert abs(derivative) > 1e-8, (factor, j)
            assert residuals[j, k] == pytest.approx(-derivative, rel=1e-4), (factor, j)
    # The factors weigh V's samples differently, so their residuals differ (one loss would give equal columns).
    assert np.max(np.abs(residuals[:, 0] - residuals[:, 1])) > 1e-8


def test_contrastive_losses_and_class_balancing_match_loops(float64):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(10, 5))
    identities = np.array([0, 0, 1, 1, 1, 2, 2, 3, 4, 4])  # identity 3 has no positive: loss 0
    losses = contrastive_losses(tf.constant(features), tf.constant(identities), 3.0).numpy()
    np.testing.assert_allclose(losses, supervised_contrastive(features, identities, 3.0), rtol=1e-10)
    assert losses[7] == 0.0
    labels = {factor: tf.constant(rng.integers(-1, 3, 10), tf.int32) for factor in schema.FACTORS}
    sums = class_balanced_sums(tf.constant(losses), labels)
    for factor in schema.FACTORS:
        assert float(sums[factor]) == pytest.approx(class_balanced(losses, labels[factor].numpy(), factor), rel=1e-12)


def test_unknown_labels_give_zero_loss_and_zero_residual(float64):
    meta_step = build(tf.distribute.get_strategy())
    batch, meta = make_batches()
    meta["blur"] = tf.fill([META], -1)
    residuals = residuals_under(tf.distribute.get_strategy(), meta_step, batch, meta)
    assert np.all(residuals[:, schema.FACTORS.index("blur")] == 0.0)
    assert np.all(residuals[:, schema.FACTORS.index("pose")] != 0.0)
    from mvcom_tf.losses.margins import variation_losses
    losses = variation_losses({"blur": tf.ones([3, 4], tf.float64)}, {"blur": tf.constant([-1, 2, -1])})
    np.testing.assert_allclose(losses["blur"].numpy(), [0.0, np.log(4.0), 0.0])


def test_factor_weight_zero_switches_a_factor_off(float64):
    meta_step = build(tf.distribute.get_strategy(), weights=(1.0, 0.0, 2.0, 1.0))
    reference = build(tf.distribute.get_strategy())
    batch, meta = make_batches()
    weighted = residuals_under(tf.distribute.get_strategy(), meta_step, batch, meta)
    plain = residuals_under(tf.distribute.get_strategy(), reference, batch, meta)
    np.testing.assert_array_equal(weighted[:, 1], 0.0)
    np.testing.assert_allclose(weighted[:, 2], 2.0 * plain[:, 2], rtol=1e-12)


def test_xla_compiles_the_whole_network_second_order_pass_to_the_same_residuals(float64):
    """--jit_compile with --meta_scope=all: XLA's residuals equal the plain graph's (the command-line test of XLA
    runs the output-block scope, whose trace is quicker)."""
    meta_step = build(make_strategy("default"), scope="all", tau=1.0, sync_bn=False)
    batch, meta = make_batches()

    def residuals(b, m):
        return meta_step.residuals(b, m, meta_step.margin_step.margins(b), meta_step.trunk_features(m))[0]

    plain = tf.function(residuals)(batch, meta).numpy()
    compiled = tf.function(residuals, jit_compile=True)(batch, meta).numpy()
    assert np.abs(plain).max() > 1e-6  # a real meta-gradient
    np.testing.assert_allclose(compiled, plain, rtol=1e-7, atol=1e-12)


def test_every_write_to_a_variable_in_the_meta_step_is_ordered_against_its_other_uses():
    """The step's graph leaves no two uses of one variable, one of them a write, to the scheduler: what makes
    --deterministic's results under load a question of kernels, not of which update lands first
    (docs/training.md)."""
    meta_step = build(tf.distribute.get_strategy(), scope="all", objective="verification")
    graph = tf.function(meta_step, autograph=False).get_concrete_function(*make_batches()).graph
    reads = {"ReadVariableOp", "ResourceGather", "VariableShape", "VarIsInitializedOp"}
    uses: dict[str, list] = {}
    for op in graph.get_operations():
        for tensor in op.inputs:
            if tensor.dtype == tf.resource:
                while tensor.op.type == "Identity":
                    tensor = tensor.op.inputs[0]
                uses.setdefault(tensor.name, []).append(op)
    ancestors: dict = {}

    def before(op):
        """Every op that runs before `op` (through data or control edges)."""
        if op not in ancestors:
            found, stack = set(), [op]
            while stack:
                current = stack.pop()
                for parent in [tensor.op for tensor in current.inputs] + list(current.control_inputs):
                    if parent not in found:
                        found.add(parent)
                        stack.append(parent)
            ancestors[op] = found
        return ancestors[op]

    writes = sum(op.type not in reads for ops in uses.values() for op in ops)
    unordered = [(variable, a.name, b.name) for variable, ops in uses.items()
                 for i, a in enumerate(ops) for b in ops[i + 1:]
                 if not (a.type in reads and b.type in reads) and a not in before(b) and b not in before(a)]
    assert len(uses) > 20 and writes > 20  # the backbone, head, optimizers and variation heads are all there
    assert not unordered, unordered[:5]


def test_tau_zero_takes_exactly_the_plain_margin_steps():
    strategy = tf.distribute.get_strategy()
    batches = [make_batches(seed) for seed in range(3)]
    meta_step = build(strategy, tau=0.0)
    plain = build(strategy, tau=0.0).margin_step
    for batch, meta in batches:
        meta_step(batch, meta)
        plain(batch)
    a = meta_step.margin_step.backbone.get_weights() + meta_step.margin_step.head.get_weights()
    b = plain.backbone.get_weights() + plain.head.get_weights()
    assert any(np.max(np.abs(x - y)) > 0 for x, y in zip(a, build(strategy).margin_step.backbone.get_weights()))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_volume_prior_matches_the_formula():
    counts = np.array([1, 4, 16, 64, 256, 0])
    margins = class_aware_margins(counts, base=0.35, power=0.25, minimum=0.25, maximum=0.45)
    reference = np.exp(np.mean(np.log(counts[:5].astype(float))))  # geometric mean: 16
    expected = np.clip(0.35 * (reference / counts[:5]) ** 0.25, 0.25, 0.45)
    np.testing.assert_allclose(margins[:5], expected, rtol=1e-6)
    assert margins[0] == pytest.approx(0.45) and margins[2] == pytest.approx(0.35)
    assert margins[5] == pytest.approx(0.35)
    np.testing.assert_allclose(class_aware_margins(counts, power=0.0), 0.35)


def test_hard_sampling_picks_what_brute_force_scoring_picks():
    rng = np.random.default_rng(5)
    train = {f: tf.constant(rng.integers(-1, schema.NUM_CLASSES[f], 32), tf.int32) for f in schema.FACTORS}
    train["pose"] = tf.constant(np.r_[np.full(28, 3), [0, 6, -1, -1]], tf.int32)  # mostly frontal
    pool = {f: tf.constant(rng.integers(-1, schema.NUM_CLASSES[f], 40), tf.int32) for f in schema.FACTORS}
    pool["image"] = tf.range(40)
    chosen = select_meta_batch(pool, train, keep=10, rule="hard")["image"].numpy()

    def score(i):
        total = 0.0
        for f in schema.FACTORS:
            label = int(pool[f][i])
            if label < 0:
                continue
            known = [int(x) for x in train[f].numpy() if x >= 0]
            p = (known.count(label) + 1) / (len(known) + schema.NUM_CLASSES[f])
            total += -np.log(p)
        return total

    brute = sorted(range(40), key=lambda i: (-score(i), i))[:10]
    assert list(chosen) == brute
    assert list(select_meta_batch(pool, train, keep=10, rule="random")["image"].numpy()) == list(range(10))
    # Runs of K = 4 (one identity each) are kept whole, ranked by their images' mean score.
    groups = select_meta_batch(pool, train, keep=12, rule="hard", group_size=4)["image"].numpy()
    ranked = sorted(range(10), key=lambda g: (-np.mean([score(4 * g + i) for i in range(4)]), g))[:3]
    assert list(groups) == [4 * g + i for g in ranked for i in range(4)]
