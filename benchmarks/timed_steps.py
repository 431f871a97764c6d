"""Shared by the benchmarks: one training step of a given kind, timed in a fresh process."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The instruction sets that decide which oneDNN kernels a step gets (AMX: brgemm tiles; avx512_bf16: dot products).
KERNEL_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "amx_fp16")


def cpu_summary() -> dict:
    """The CPU's model name (lscpu), which of KERNEL_FLAGS it has, and its core count: printed beside every timing,
    since machines of one kind differ."""
    model, present = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    present = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [flag for flag in KERNEL_FLAGS if flag in present], "cores": os.cpu_count()}


def build_step(kind: str, backbone: str, image_size: int, batch: int, meta_batch: int, num_classes: int = 1000,
               precision: str = "float32", jit_compile: bool = False, inter_op_threads: int = 0,
               target: str = "margins", fused_bn: bool = False):
    """A compiled step function and its inputs: kind is plain, meta_all or meta_output_block; `target` what the meta
    step learns (--meta_target); fused_bn as --fused_bn (the plain step only).

    precision float32 or bfloat16 (Keras' mixed_bfloat16 policy, as --mixed_precision=bfloat16);
    jit_compile as --jit_compile (the step compiled by XLA); inter_op_threads > 0 caps TensorFlow's inter-op
    parallelism (1: what --deterministic sets).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)

    if precision != "float32":
        keras.mixed_precision.set_global_policy(f"mixed_{precision}")
    compile_step = (lambda fn: tf.function(fn, jit_compile=True)) if jit_compile else tf.function

    from mvcom_tf.config import Schedule, TrainConfig
    from mvcom_tf.data import schema
    from mvcom_tf.stages.build import build_margin_step, build_meta_step

    keras.utils.set_random_seed(0)
    scope = "all" if kind == "plain" else kind.removeprefix("meta_")
    config = TrainConfig.from_flags(backbone=backbone, image_size=image_size, batch_size=batch,
                                    meta_batch_size=meta_batch, meta_scope=scope, meta_sampling="random",
                                    meta_lr_tau=1000.0, residual_max=0.2, meta_target=target, fused_bn=fused_bn,
                                    mixed_precision="none" if precision == "float32" else precision)
    margins = tf.fill([num_classes], 0.35)
    rng = np.random.default_rng(0)

    def labelled(n):
        data = {"image": tf.constant(rng.normal(size=(n, image_size, image_size, 3)), tf.float32),
                "identity": tf.constant(rng.integers(0, num_classes, n), tf.int32)}
        data.update({f: tf.constant(rng.integers(0, schema.NUM_CLASSES[f], n), tf.int32) for f in schema.FACTORS})
        return data

    batch_data, meta_data = labelled(batch), labelled(meta_batch)
    margin_step = build_margin_step(config, num_classes, margins, schedule=Schedule(1, 0.01, ()))
    if kind == "plain":
        return compile_step(lambda: margin_step(batch_data)), batch
    meta_step, _ = build_meta_step(config, margin_step, {}, replicas=1)
    return compile_step(lambda: meta_step(batch_data, meta_data)), batch


def call_seconds(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_step(kind: str, backbone: str, image_size: int, batch: int, meta_batch: int, repeats: int,
              warmup: int = 2, precision: str = "float32", jit_compile: bool = False,
              inter_op_threads: int = 0, target: str = "margins", fused_bn: bool = False) -> dict:
    """Median seconds per step after warm-up, and the process's peak resident memory."""
    step, images = build_step(kind, backbone, image_size, batch, meta_batch, precision=precision,
                              jit_compile=jit_compile, inter_op_threads=inter_op_threads, target=target,
                              fused_bn=fused_bn)
    seconds = call_seconds(step, repeats, warmup)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    median = statistics.median(seconds)
    return {"kind": kind, "seconds": median, "images_per_s": images / median, "peak_mb": peak_mb,
            "all_seconds": seconds}


def run_isolated(**kwargs) -> dict:
    """time_step in a fresh Python process, so that each variant's peak memory is its own."""
    code = "import json; from benchmarks.timed_steps import time_step; " \
           f"print(json.dumps(time_step(**{kwargs!r})))"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark variant {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
