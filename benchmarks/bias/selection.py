"""Selection on val: every arm's knobs chosen by the val score with the first seed(s), then the stacked arm."""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.bias.arms import ARM_KINDS, STACK_BEST, STACK_PREFIX, Arm, grid_arms
from benchmarks.bias.runner import Runner
from mvcom_tf.data import schema

# Arms that need no per-sample tail labels of the training images and learn something: the stacking candidates.
LABEL_FREE = tuple(kind for kind, spec in ARM_KINDS.items() if not spec.tail_labels and kind not in ("cosface", "prior"))


def val_score(result: dict) -> float:
    """What selection maximises: the mean over the four factors of the worst group's accuracy on val."""
    return float(np.mean([result["factors"][factor]["worst_accuracy"] for factor in schema.FACTORS]))


def select(runner: Runner, seeds: list[str], wanted: tuple[str, ...]) -> tuple[dict[str, Arm], list[dict]]:
    """Chooses on val each wanted arm's knobs (its grid in the study), cosface always; `resample+<kind>` takes
    <kind>'s choice with balanced resampling, `resample+best` the best label-free arm's. Returns the final arms and
    the val table (runs scored by the mean over the selection seeds)."""
    study, table, scores = runner.study, [], {}

    def best(arms: list[Arm], step: str) -> Arm:
        runner.fine_tune(seeds, arms)
        means = []
        for arm in arms:
            results = [runner.val_result(seed, arm) for seed in seeds]
            means.append(float(np.mean([val_score(result) for result in results])))
            table.append({"step": step, "run": arm.name, "val_score": means[-1],
                          "val_accuracy": float(np.mean([result["accuracy"] for result in results])),
                          "worst": {factor: float(np.mean([result["factors"][factor]["worst_accuracy"]
                                                           for result in results])) for factor in schema.FACTORS}})
        chosen = int(np.argmax(means))
        scores[arms[chosen].arm] = means[chosen]
        return arms[chosen]

    def choose(arm: str) -> Arm:
        if arm not in chosen:
            if arm.startswith(STACK_PREFIX):
                chosen[arm] = best([dataclasses.replace(choose(arm.removeprefix(STACK_PREFIX)), arm=arm)], "stacked")
            else:
                chosen[arm] = best(grid_arms(arm, study.length, study.grid(arm), study.scope), arm)
        return chosen[arm]

    chosen: dict[str, Arm] = {}
    choose("cosface")
    for arm in wanted:
        if arm != STACK_BEST:
            choose(arm)
    if STACK_BEST in wanted:
        candidates = [arm for arm in LABEL_FREE if arm in chosen]
        if not candidates:
            raise ValueError(f"{STACK_BEST} needs one of {', '.join(LABEL_FREE)} among the arms")
        choose(STACK_PREFIX + max(candidates, key=lambda arm: scores[arm]))
    return chosen, table
