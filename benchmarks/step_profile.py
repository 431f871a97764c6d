"""Where one training step's time goes: the TensorFlow profiler's trace, grouped into op families.

    python -m benchmarks.step_profile [--backbone=iresnet100 --image_size=112 --batch=8
                                       --precisions=float32,bfloat16 --changes=momentum_sgd,fused_bn --steps=3]

Each precision and each step variant runs in its own process: the plain step of
benchmarks.timed_steps (CosFace, SGD with momentum and weight decay) first without the changes of
--changes (Keras' SGD and BatchNorm), then with each change added on top of the ones before it (so
each is measured alone against the previous step, in one run); warmed up, timed without the profiler (median of --repeats), then
--steps steps under `tf.profiler.experimental` with host tracing. The trace's op events (one per
kernel, on the executor's inter-op threads) are attributed to the step's wall time: at each instant
the time is split evenly among the ops running then, so the groups add up to the step, and time
when no op runs (scheduling, Python and function dispatch) is its own row. Groups: convolutions
(forward and both backward kernels), BatchNorm (its layers' ops, forward and backward), PReLU, casts
(every Cast op, wherever it sits), layout changes (transposes and oneDNN layout conversions), the
identity head (margin logits and loss), the optimizer update, and the rest (residual additions,
gradient sums, padding, the BN statistics' assignment). Prints the CPU's model and kernel flags and a
table per precision, then one JSON object: per precision and variant the step's seconds and each
group's share, with `cpu`.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

from absl import app, flags

from benchmarks.timed_steps import REPO, cpu_summary

FLAGS = flags.FLAGS
# What --changes can apply, each on top of the ones before it: name -> what it is.
CHANGES = {"momentum_sgd": "the optimizer's momentum update in one kernel a variable (MomentumSGD, the default)",
           "fused_bn": "--fused_bn: BatchNorm on the fused kernel, in the compute dtype"}
GROUPS = ("convolutions", "batchnorm", "prelu", "casts", "layout", "identity_head", "optimizer", "rest", "no_op")
LAYOUT_OPS = {"Transpose", "ConjugateTranspose", "_MklToTf", "_MklInputConversion", "DataFormatVecPermute"}
BN_LAYER = re.compile(r"(_bn\d*|_features|batch_normalization)(_\d+)?$")
PRELU_LAYER = re.compile(r"_prelu(_\d+)?$")
HEAD_LAYER = re.compile(r"^identity_head(_\d+)?$")


def op_group(name: str) -> str:
    """The group of one op event of the trace, named `scope/.../op_name:OpType`."""
    path, _, op_type = name.rpartition(":")
    if "Conv2D" in op_type:
        return "convolutions"
    if op_type == "Cast":
        return "casts"
    if op_type in LAYOUT_OPS:
        return "layout"
    scopes = path.split("/")
    if any(BN_LAYER.search(scope) for scope in scopes):
        return "batchnorm"
    if any(PRELU_LAYER.search(scope) for scope in scopes):
        return "prelu"
    if any(HEAD_LAYER.match(scope) for scope in scopes) or "SoftmaxCrossEntropy" in op_type:
        return "identity_head"
    if op_type.startswith("ResourceApply") or scopes[0] in ("sgd", "momentum_sgd") or scopes[0].startswith("sgd_"):
        return "optimizer"
    return "rest"


def wall_attribution(window: tuple[int, int], intervals: list[tuple[int, int, str]]) -> dict[str, float]:
    """Each group's share of `window`'s wall time: concurrent intervals split each instant evenly, instants with
    none go to `no_op`. Intervals are (start, end, group), clipped to the window; times in any one unit."""
    begin, end = window
    edges = []
    for start, stop, group in intervals:
        start, stop = max(start, begin), min(stop, end)
        if stop > start:
            edges += [(start, 1, group), (stop, -1, group)]
    edges.sort(key=lambda edge: (edge[0], edge[1]))
    totals = collections.Counter()
    running: collections.Counter = collections.Counter()
    last = begin
    for time, change, group in edges:
        if time > last:
            active = sum(running.values())
            if active:
                for name, count in running.items():
                    totals[name] += (time - last) * count / active
            else:
                totals["no_op"] += time - last
            last = time
        running[group] += change
        if not running[group]:
            del running[group]
    totals["no_op"] += end - last
    return {group: totals[group] / (end - begin) for group in GROUPS}


def trace_shares(logdir: str) -> tuple[list[dict[str, float]], list[float]]:
    """Per profiled step, the groups' shares of its wall time, and its seconds, read from the trace's XSpace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(sorted(paths)[-1], "rb") as f:
        space.ParseFromString(f.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    names = {key: meta.name for key, meta in plane.event_metadata.items()}
    steps, intervals = [], []
    for line in plane.lines:
        base = line.timestamp_ns * 1000
        for event in line.events:
            name = names[event.metadata_id]
            start = base + event.offset_ps
            if name == "KernelAndDeviceFunc::Run":
                steps.append((start, start + event.duration_ps))
            elif line.name.startswith("tf_Compute") and ":" in name and "::" not in name:
                intervals.append((start, start + event.duration_ps, op_group(name)))
    steps.sort()
    return [wall_attribution(step, intervals) for step in steps], [(b - a) / 1e12 for a, b in steps]


def profile(backbone: str, image_size: int, batch: int, precision: str, steps: int, repeats: int,
            changes: tuple[str, ...] = ()) -> dict:
    """In this process: the step's median seconds unprofiled, then the mean group shares of `steps` traced steps.
    `changes` are CHANGES applied to the step."""
    import statistics

    import tensorflow as tf

    from benchmarks.timed_steps import build_step, call_seconds

    import keras

    from mvcom_tf.stages import build

    ours = build.MomentumSGD
    if "momentum_sgd" not in changes:  # the step as it was before MomentumSGD: Keras' own SGD
        build.MomentumSGD = keras.optimizers.SGD
    try:
        step, _ = build_step("plain", backbone, image_size, batch, batch, precision=precision,
                             fused_bn="fused_bn" in changes)
    finally:
        build.MomentumSGD = ours
    seconds = call_seconds(step, repeats, warmup=2)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir, tf.profiler.experimental.ProfilerOptions(host_tracer_level=2))
        for _ in range(steps):
            step()
        tf.profiler.experimental.stop()
        shares, traced = trace_shares(logdir)
    mean = {group: statistics.fmean(share[group] for share in shares) for group in GROUPS}
    return {"seconds": statistics.median(seconds), "traced_seconds": traced, "shares": mean,
            "images_per_s": batch / statistics.median(seconds)}


def run_isolated(**kwargs) -> dict:
    """profile() in a fresh Python process."""
    code = f"import json; from benchmarks.step_profile import profile; print(json.dumps(profile(**{kwargs!r})))"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"profile {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("backbone", "iresnet100", "Backbone.")
    flags.DEFINE_integer("image_size", 112, "Image size.")
    flags.DEFINE_integer("batch", 8, "Batch size.")
    flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Precisions, each in its own process.")
    flags.DEFINE_list("changes", list(CHANGES), "Changes profiled one after another, each on top of the ones before "
                      f"it, after the step without them: {', '.join(CHANGES)}.")
    flags.DEFINE_integer("steps", 3, "Profiled steps (their shares are averaged).", lower_bound=1)
    flags.DEFINE_integer("repeats", 5, "Timed steps without the profiler (after 2 warm-up steps).", lower_bound=1)
    flags.register_validator("changes", lambda v: set(v) <= set(CHANGES), f"--changes must be among {list(CHANGES)}")


def main(argv) -> None:
    del argv
    cpu = cpu_summary()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; kernel flags: {', '.join(cpu['flags']) or 'none of them'}")
    summary = {"cpu": cpu}
    variants = [tuple(FLAGS.changes[:count]) for count in range(len(FLAGS.changes) + 1)]
    for precision in FLAGS.precisions:
        rows = [run_isolated(backbone=FLAGS.backbone, image_size=FLAGS.image_size, batch=FLAGS.batch,
                             precision=precision, steps=FLAGS.steps, repeats=FLAGS.repeats, changes=changes)
                for changes in variants]
        names = ["before"] + [f"+ {change}" for change in FLAGS.changes]
        print(f"\n{FLAGS.backbone}, {precision}, batch {FLAGS.batch} at {FLAGS.image_size} px "
              "(share of the step, then its seconds)")
        print("| group | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for group in GROUPS:
            cells = [f"{row['shares'][group]:.1%} ({row['shares'][group] * row['seconds']:.3f} s)" for row in rows]
            print(f"| {group} | " + " | ".join(cells) + " |")
        print("| s/step | " + " | ".join(f"{row['seconds']:.3f}" for row in rows) + " |")
        print("| images/s | " + " | ".join(f"{row['images_per_s']:.2f}" for row in rows) + " |")
        print("| x previous | 1.00 | " + " | ".join(f"{before['seconds'] / row['seconds']:.2f}"
                                                 for before, row in zip(rows, rows[1:])) + " |")
        summary[precision] = {name: {"seconds": round(row["seconds"], 4), "images_per_s": round(row["images_per_s"], 3),
                                     "shares": {g: round(share, 4) for g, share in row["shares"].items()}}
                              for name, row in zip(["before", *FLAGS.changes], rows)}
    print(json.dumps({"backbone": FLAGS.backbone, "image_size": FLAGS.image_size, "batch": FLAGS.batch,
                      **summary}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
