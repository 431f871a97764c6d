"""--steps_per_execution: several steps in one tf.function call take the steps of one step per call."""

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.training.compiled import CompiledSteps, execution_length
from tests.helpers import build, make_batches

STEPS = 3


def dataset_of(batches):
    """The batches, in order, as a dataset of batches."""
    stacked = {key: tf.concat([batch[key] for batch in batches], axis=0) for key in batches[0]}
    size = int(batches[0]["image"].shape[0])
    return tf.data.Dataset.from_tensor_slices(stacked).batch(size)


def run(kind, steps_per_execution, batches):
    """STEPS steps of the margin step or the meta step, in calls of steps_per_execution; weights and metrics."""
    strategy = tf.distribute.get_strategy()
    # Scope `output_block`: the loop is the same for either scope, and this graph traces in a fraction of the time.
    meta_step = build(strategy, scope="output_block")
    step_fn = meta_step if kind == "meta" else meta_step.margin_step
    compiled = CompiledSteps(strategy, steps_per_execution=steps_per_execution)
    iterators = (iter(dataset_of([batch for batch, _ in batches])),)
    if kind == "meta":
        iterators += (iter(dataset_of([meta for _, meta in batches])),)
    calls = [compiled(step_fn, iterators, steps_per_execution) for _ in range(STEPS // steps_per_execution)]
    model = meta_step.margin_step
    weights = model.backbone.get_weights() + model.head.get_weights() + meta_step.variation_heads.get_weights()
    return weights, calls


@pytest.mark.parametrize("kind", ["meta"])  # the margin step's calls: test_faults.py's skip drill
def test_one_call_of_three_steps_equals_three_calls(float64, kind):
    batches = [make_batches(seed) for seed in range(STEPS)]
    looped, (summed,) = run(kind, STEPS, batches)
    stepped, calls = run(kind, 1, batches)
    initial = build(tf.distribute.get_strategy())
    moved = initial.margin_step.backbone.get_weights()
    assert max(np.max(np.abs(a - b)) for a, b in zip(stepped, moved)) > 1e-3
    for a, b in zip(looped, stepped):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # Sums over the call's steps; per-sample values: the last step's.
    expected = tf.nest.map_structure(lambda *values: sum(values), *[call.sums for call in calls])
    tf.nest.assert_same_structure(summed.sums, expected)
    for value, reference in zip(tf.nest.flatten(summed.sums), tf.nest.flatten(expected)):
        np.testing.assert_allclose(value, reference, rtol=1e-10)
    assert summed.sums.stage.residual and summed.samples
    for value, reference in zip(tf.nest.flatten(summed.samples), tf.nest.flatten(calls[-1].samples)):
        np.testing.assert_allclose(value, reference, rtol=1e-10)


class Warmup:
    """A stage whose replica step changes after `warmup_steps`, like the meta stage's."""

    def __init__(self, warmup_steps):
        self.warmup_steps = warmup_steps

    def replica_step(self, step):
        return "warmup" if step < self.warmup_steps else "meta"


@pytest.mark.parametrize("step,last,warmup,expected", [
    (0, 100, 0, 8),    # --steps_per_execution
    (8, 100, 0, 2),    # up to the checkpoint at 10
    (10, 100, 0, 5),   # up to the log step at 15
    (15, 17, 0, 2),    # up to the end of the epoch
    (0, 100, 3, 3),    # up to the end of the warm-up
    (3, 100, 3, 7),
])
def test_calls_end_where_the_loop_has_work(step, last, warmup, expected):
    # --steps_per_execution=8, --log_every=15, --checkpoint_every=10; evaluations every 12 steps or none (0).
    assert execution_length(Warmup(warmup), step, last, 8, [15, 10, 0]) == expected
    with_eval = [15, 10, 12]
    assert execution_length(Warmup(0), 8, 100, 8, with_eval) == 2
    assert execution_length(Warmup(0), 10, 100, 8, with_eval) == 2
