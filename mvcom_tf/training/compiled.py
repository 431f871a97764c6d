"""Replica steps compiled into tf.functions, one or several steps per call."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from mvcom_tf.training.metrics import StepOutput, reduce_over_replicas

ReplicaStep = Callable[..., StepOutput]  # one batch per input of the stage -> StepOutput


class CompiledSteps:
    """One tf.function per replica step (a stage may have several: warm-ups, then its step).

    With jit_compile the replica step itself is compiled by XLA (the input iterators cannot be).
    With steps_per_execution > 1 a call runs `steps` steps in a tf.while_loop and returns their
    summed `sums` (and the last step's `samples`).
    """

    def __init__(self, strategy: tf.distribute.Strategy, jit_compile: bool = False,
                 steps_per_execution: int = 1) -> None:
        self.strategy, self.jit_compile, self.steps_per_execution = strategy, jit_compile, steps_per_execution
        self.functions: dict[ReplicaStep, Callable] = {}

    def __call__(self, replica_step: ReplicaStep, iterators: tuple, steps: int = 1) -> StepOutput:
        """Runs `steps` steps of replica_step on the next batches of the iterators; the reduced output."""
        if replica_step not in self.functions:
            self.functions[replica_step] = self._compile(replica_step)
        if self.steps_per_execution == 1:
            return self.functions[replica_step](iterators)
        # A tensor, so that the shorter calls before a log or checkpoint step do not retrace.
        return self.functions[replica_step](iterators, tf.constant(steps, tf.int32))

    def _compile(self, replica_step: ReplicaStep) -> Callable:
        strategy = self.strategy
        if self.jit_compile:
            replica_step = tf.function(replica_step, jit_compile=True)

        def one_step(iterators):
            batches = tuple(next(iterator) for iterator in iterators)
            return reduce_over_replicas(strategy, strategy.run(replica_step, args=batches))

        if self.steps_per_execution == 1:
            return tf.function(one_step, autograph=False)  # no Python control flow to convert

        @tf.function(autograph=False)
        def run(iterators, steps):
            def body(index, totals):
                output = one_step(iterators)
                return index + 1, output._replace(sums=tf.nest.map_structure(tf.add, totals.sums, output.sums))

            # The first step outside the loop gives the outputs' structure and shapes.
            _, totals = tf.while_loop(lambda index, totals: index < steps, body, (tf.constant(1), one_step(iterators)))
            return totals

        return run


def execution_length(stage, step: int, last: int, steps_per_execution: int, every: list[int]) -> int:
    """Steps the next call may run from `step`: at most steps_per_execution, up to `last` (end of the epoch
    or stage), stopping at the next multiple of each period in `every` (0: none) and where the stage's
    replica step changes (a warm-up's end)."""
    length = min([steps_per_execution, last - step] + [period - step % period for period in every if period])
    replica_step = stage.replica_step(step)
    return next((k for k in range(1, length) if stage.replica_step(step + k) != replica_step), length)
