"""--eval_data during and after a stage: the backbone's flip-fused embeddings on each benchmark, logged."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mvcom_tf.evaluation.benchmark_spec import benchmark_key, parse_benchmark
from mvcom_tf.evaluation.protocols import run_benchmark
from mvcom_tf.export import embedding_fn


def evaluate(eval_data: tuple[str, ...], backbone: keras.Model, image_size: int, batch_size: int,
             outcomes: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Every benchmark of --eval_data on the flip-fused embeddings of the backbone, keyed `<kind>:<name>`;
    `outcomes`, if given, receives each verification benchmark's per-pair 10-fold outcomes."""
    embed = tf.function(embedding_fn(backbone), reduce_retracing=True)
    results = {}
    for spec in eval_data:
        kind, path = parse_benchmark(spec)
        key = benchmark_key(kind, path)
        scored = run_benchmark(kind, path, embed, image_size, batch_size)
        results[key] = scored.result
        if outcomes is not None and scored.outcomes is not None:
            outcomes[key] = scored.outcomes
    return results


def headline(result: dict) -> str:
    """A benchmark's result in a few words: its accuracy, or its TAR at each FAR."""
    if "accuracy" in result:
        return f"accuracy {result['accuracy']:.4f}"
    return ", ".join(f"TAR@FAR={far} {tar:.4f}" for far, tar in result.get("tar_at_far", {}).items())


def log_evaluation(writer, step: int, results: dict[str, dict]) -> None:
    """TensorBoard scalars of an evaluation: eval/<benchmark>/accuracy and TAR@FAR, and for the first
    benchmark `eval/accuracy` and its per-group accuracies `eval/<factor>/<group>`."""
    with writer.as_default(step=step):
        for index, (key, result) in enumerate(results.items()):
            if "accuracy" in result:
                tf.summary.scalar(f"eval/{key}/accuracy", result["accuracy"])
            for far, tar in result.get("tar_at_far", {}).items():
                tf.summary.scalar(f"eval/{key}/tar@far={far}", tar)
            if index == 0:
                if "accuracy" in result:
                    tf.summary.scalar("eval/accuracy", result["accuracy"])
                for factor, groups in result.get("groups", {}).items():
                    for group, accuracy in groups.items():
                        tf.summary.scalar(f"eval/{factor}/{group}", accuracy)
    writer.flush()
