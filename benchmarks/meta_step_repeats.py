"""Does one MvCoM step give the same bits every time it runs? What --deterministic's one inter-op thread is for.

    python -m benchmarks.meta_step_repeats [--run=runs/demo --repeats=60]

From a finished run's meta checkpoint (the demo's by default: run `python -m mvcom_tf.train` first), the
stage's compiled MvCoM step is called --repeats times, each time from the same restored variables on the
same pair of batches; every call's updated variables and outputs are compared bit for bit with the first
call's. Two processes run at once, side by side, each loading the machine for the other: TensorFlow's
default inter-op parallelism and one inter-op thread (what --deterministic sets). Both enable op
determinism. Prints a table (per variant: calls that differ from the first, and the names of the values
that differed), then one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
VARIANTS = {"default": 0, "inter_op_1": 1}  # inter-op threads (0: TensorFlow's default)


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("run", "runs/demo", "A finished run folder with a meta stage (flags.txt, checkpoints/meta).")
    flags.DEFINE_integer("repeats", 60, "Calls of the step per variant.", lower_bound=2)
    flags.DEFINE_integer("inter_op_threads", -1, "Internal: run one variant in this process (0: default).")


def repeat_step(run: str, repeats: int, inter_op_threads: int) -> dict:
    """Calls the run's MvCoM step `repeats` times from the same state on the same batches; which calls differ."""
    import numpy as np
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    import keras

    from mvcom_tf.config_flags import config_of_run
    from mvcom_tf.data.pipeline import DecodeFailures
    from mvcom_tf.stages.build import build_stage
    from mvcom_tf.training.checkpoints import StageCheckpoints, stage_folder
    from mvcom_tf.training.distribute import InputOptions, distributed_batches

    config = config_of_run(run, "--stage=meta", "--eval_data=", "--strategy=default", "--cpu_replicas=0")
    keras.utils.set_random_seed(config.runtime.seed)
    strategy = tf.distribute.get_strategy()
    stage = build_stage(config, "meta", strategy)
    folder = stage_folder(run, "meta")
    StageCheckpoints(stage, folder, keep=1).restore(folder, init_checkpoint="")  # the whole stage, as a resume
    first_step = config.meta.variation_warmup_steps  # the MvCoM step proper, after the warm-up
    options = InputOptions(config.model.image_size, config.data.shuffle_buffer)
    batches = tuple(next(distributed_batches(strategy, spec, options, range(first_step, first_step + 1),
                                             stage.steps_per_epoch, DecodeFailures())) for spec in stage.inputs())
    replica_step = stage.replica_step(first_step)
    step = tf.function(lambda: strategy.run(replica_step, args=batches), autograph=False)

    variables = list({id(v): v for t in stage.trackables().values() for v in getattr(t, "variables", [])}.values())
    initial = [v.numpy() for v in variables]
    names, first, differing = [], None, []
    for call in range(repeats):
        for variable, value in zip(variables, initial):
            variable.assign(value)
        outputs = keras.tree.flatten_with_path(step())
        values = [v.numpy() for v in variables] + [np.asarray(value) for _, value in outputs]
        if first is None:
            names = [getattr(v, "path", v.name) for v in variables]
            names += ["output " + "/".join(map(str, path)) for path, _ in outputs]
            first = values
            continue
        changed = [name for name, a, b in zip(names, first, values) if a.tobytes() != b.tobytes()]
        if changed:
            differing.append({"call": call, "values": len(changed), "first_names": changed[:4]})
    return {"inter_op_threads": inter_op_threads, "repeats": repeats, "differing_calls": len(differing),
            "values_compared": len(names), "differing": differing}


def main(argv) -> None:
    del argv
    if FLAGS.inter_op_threads >= 0:
        print(json.dumps(repeat_step(FLAGS.run, FLAGS.repeats, FLAGS.inter_op_threads)))
        return
    if not os.path.exists(os.path.join(FLAGS.run, "checkpoints", "meta")):
        raise app.UsageError(f"--run: {FLAGS.run} has no checkpoints/meta (run `python -m mvcom_tf.train` first)")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
    processes = {name: subprocess.Popen([sys.executable, "-m", "benchmarks.meta_step_repeats", f"--run={FLAGS.run}",
                                         f"--repeats={FLAGS.repeats}", f"--inter_op_threads={threads}"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for name, threads in VARIANTS.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate()
        if process.returncode:
            raise SystemExit(f"variant {name} failed:\n{stderr[-3000:]}")
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    print(f"{FLAGS.run}: the MvCoM step called {FLAGS.repeats} times from one state on one pair of batches, "
          f"both variants at once (oneDNN {'off' if os.environ.get('TF_ENABLE_ONEDNN_OPTS') == '0' else 'on'})")
    print(f"{'variant':<12}{'calls differing from the first':>32}  values that differed first")
    for name, result in results.items():
        seen = sorted({value for entry in result["differing"] for value in entry["first_names"]})
        print(f"{name:<12}{result['differing_calls']:>26} of {result['repeats'] - 1:<3}  {', '.join(seen[:6])}")
    print(json.dumps({"run": FLAGS.run, "repeats": FLAGS.repeats,
                      "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0", "variants": results}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
