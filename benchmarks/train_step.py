"""Training images/s of the plain margin-loss step and of the MvCoM meta step, beside PyTorch's in the same run.

    python -m benchmarks.train_step [--backbones=iresnet50,iresnet100 --meta_backbones=iresnet50
                                     --precisions=float32,bfloat16 --compilers=eager,xla
                                     --batchnorms=keras,fused --pytorch --image_size=112 --batch=8]

Every variant runs in its own process (same model, same batch; the meta batch as large as the
training batch, meta scope `all`). `eager` is a tf.function without XLA (--jit_compile off),
`xla` with it; bfloat16 is Keras' mixed_bfloat16 policy (--mixed_precision=bfloat16); `fused`
BatchNorm is --fused_bn (plain steps only: the meta stage refuses it). With --pytorch (needs
`pip install -r benchmarks/requirements-pytorch.txt`) each plain backbone's step also runs in
PyTorch (benchmarks/torch_step.py: insightface's IResNet, CosFace, SGD; autocast for bfloat16),
in the default and the channels-last memory format, and the table gives our fastest variant of a
precision against PyTorch's fastest. Prints the CPU's model and kernel flags, a table, then one
JSON line keyed `<backbone>_<precision>_<compiler>[_fused_bn]`, `meta_<...>` and
`pytorch_<backbone>_<precision>[_channels_last]`, values in images/s, with `cpu`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from absl import app, flags

from benchmarks.timed_steps import REPO, cpu_summary, run_isolated

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_list("backbones", ["iresnet50", "iresnet100"], "Backbones of the plain step.")
    flags.DEFINE_list("meta_backbones", ["iresnet50"], "Backbones of the meta step.")
    flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Precisions.")
    flags.DEFINE_list("compilers", ["eager", "xla"], "eager: tf.function; xla: tf.function(jit_compile=True).")
    flags.DEFINE_list("batchnorms", ["keras"], "Plain steps' BatchNorm: keras (Keras' layer), fused (--fused_bn).")
    flags.DEFINE_bool("pytorch", False, "Also time each plain backbone's step in PyTorch, in this run.")
    flags.DEFINE_integer("image_size", 112, "Image size.")
    flags.DEFINE_integer("batch", 8, "Batch size.")
    flags.DEFINE_integer("repeats", 5, "Timed plain steps per variant (after 2 warm-up steps).")
    flags.DEFINE_integer("meta_repeats", 3, "Timed meta steps per variant (after 2 warm-up steps).")
    flags.register_validator("batchnorms", lambda v: set(v) <= {"keras", "fused"},
                             "--batchnorms must be among keras, fused")


def torch_isolated(**kwargs) -> dict:
    """benchmarks.torch_step's time_torch_step in a fresh process."""
    code = f"import json; from benchmarks.torch_step import time_torch_step; " \
           f"print(json.dumps(time_torch_step(**{kwargs!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": REPO})
    if result.returncode != 0:
        raise RuntimeError(f"PyTorch step {kwargs} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.pytorch and importlib.util.find_spec("torch") is None:
        raise app.UsageError("--pytorch needs PyTorch in this environment: "
                             "pip install -r benchmarks/requirements-pytorch.txt (or run with --nopytorch)")
    cpu = cpu_summary()
    print(f"CPU: {cpu['model']}, {cpu['cores']} cores; kernel flags: {', '.join(cpu['flags']) or 'none of them'}")
    summary, best = {"cpu": cpu}, {}
    print("| step | backbone | precision | compiler | BatchNorm | s/step | images/s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")

    def report(key: str, cells: list[str], row: dict, best_key: tuple | None) -> None:
        print("| " + " | ".join(cells) + f" | {row['seconds']:.3f} | {row['images_per_s']:.2f} | "
              f"{row['peak_mb']:.0f} |", flush=True)
        summary[key] = round(row["images_per_s"], 3)
        if best_key and row["images_per_s"] > best.get(best_key, (0, ""))[0]:
            best[best_key] = (row["images_per_s"], key)

    variants = [("plain", b) for b in FLAGS.backbones] + [("meta_all", b) for b in FLAGS.meta_backbones]
    for kind, backbone in variants:
        for precision in FLAGS.precisions:
            for compiler in FLAGS.compilers:
                for batchnorm in FLAGS.batchnorms if kind == "plain" else ["keras"]:
                    row = run_isolated(kind=kind, backbone=backbone, image_size=FLAGS.image_size, batch=FLAGS.batch,
                                       meta_batch=FLAGS.batch, precision=precision, jit_compile=compiler == "xla",
                                       repeats=FLAGS.repeats if kind == "plain" else FLAGS.meta_repeats,
                                       fused_bn=batchnorm == "fused")
                    prefix = "" if kind == "plain" else "meta_"
                    suffix = "_fused_bn" if batchnorm == "fused" else ""
                    report(f"{prefix}{backbone}_{precision}_{compiler}{suffix}",
                           ["plain" if kind == "plain" else "meta (all)", backbone, precision, compiler, batchnorm],
                           row, ("ours", backbone, precision) if kind == "plain" else None)
            if kind == "plain" and FLAGS.pytorch:
                for channels_last in (False, True):
                    row = torch_isolated(backbone=backbone, image_size=FLAGS.image_size, batch=FLAGS.batch,
                                         precision=precision, channels_last=channels_last, repeats=FLAGS.repeats)
                    layout = "channels_last" if channels_last else "default"
                    report(f"pytorch_{backbone}_{precision}" + ("_channels_last" if channels_last else ""),
                           [f"plain, PyTorch {row['torch']}", backbone, precision, f"eager ({layout})",
                            "PyTorch's"], row, ("pytorch", backbone, precision))
    if FLAGS.pytorch:
        print("\n| backbone | precision | ours (fastest) | PyTorch (fastest) | ours / PyTorch |")
        print("|---|---|---|---|---|")
        for backbone in FLAGS.backbones:
            for precision in FLAGS.precisions:
                (ours, our_key), (theirs, their_key) = best[("ours", backbone, precision)], \
                    best[("pytorch", backbone, precision)]
                print(f"| {backbone} | {precision} | {ours:.2f} ({our_key}) | {theirs:.2f} ({their_key}) | "
                      f"{ours / theirs:.2f} |")
                summary[f"ratio_{backbone}_{precision}"] = round(ours / theirs, 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
