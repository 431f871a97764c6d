"""Training images/s of the plain margin-loss step and of the MvCoM meta step: tf.function vs XLA, float32 vs bfloat16.

    python -m benchmarks.train_step [--backbones=iresnet50,iresnet100 --meta_backbones=iresnet50
                                     --image_size=112 --batch=8 --repeats=5 --meta_repeats=3]

Every variant runs in its own process (same model, same batch; the meta batch as large as the
training batch, meta scope `all`). `eager` is a tf.function without XLA (--jit_compile off),
`xla` with it; bfloat16 is Keras' mixed_bfloat16 policy (--mixed_precision=bfloat16). Prints a
table, then one JSON line keyed `<backbone>_<float32|bfloat16>_<eager|xla>` and
`meta_<backbone>_<...>_<...>`, values in images/s.
"""

from __future__ import annotations

import json

from absl import app, flags

from benchmarks.timed_steps import run_isolated

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_list("backbones", ["iresnet50", "iresnet100"], "Backbones of the plain step.")
    flags.DEFINE_list("meta_backbones", ["iresnet50"], "Backbones of the meta step.")
    flags.DEFINE_list("precisions", ["float32", "bfloat16"], "Precisions.")
    flags.DEFINE_list("compilers", ["eager", "xla"], "eager: tf.function; xla: tf.function(jit_compile=True).")
    flags.DEFINE_integer("image_size", 112, "Image size.")
    flags.DEFINE_integer("batch", 8, "Batch size.")
    flags.DEFINE_integer("repeats", 5, "Timed plain steps per variant (after 2 warm-up steps).")
    flags.DEFINE_integer("meta_repeats", 3, "Timed meta steps per variant (after 2 warm-up steps).")


def main(argv):
    del argv
    summary = {}
    print("| step | backbone | precision | compiler | s/step | images/s | peak MB |")
    print("|---|---|---|---|---|---|---|")
    variants = [("plain", b) for b in FLAGS.backbones] + [("meta_all", b) for b in FLAGS.meta_backbones]
    for kind, backbone in variants:
        for precision in FLAGS.precisions:
            for compiler in FLAGS.compilers:
                row = run_isolated(kind=kind, backbone=backbone, image_size=FLAGS.image_size, batch=FLAGS.batch,
                                   meta_batch=FLAGS.batch, precision=precision, jit_compile=compiler == "xla",
                                   repeats=FLAGS.repeats if kind == "plain" else FLAGS.meta_repeats)
                print(f"| {'plain' if kind == 'plain' else 'meta (all)'} | {backbone} | {precision} | {compiler} | "
                      f"{row['seconds']:.3f} | {row['images_per_s']:.2f} | {row['peak_mb']:.0f} |", flush=True)
                prefix = "" if kind == "plain" else "meta_"
                summary[f"{prefix}{backbone}_{precision}_{compiler}"] = round(row["images_per_s"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
