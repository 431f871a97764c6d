"""What --deterministic's one-op-at-a-time execution costs: step time with TensorFlow's default inter-op
parallelism and with 1, side by side.

    python -m benchmarks.deterministic [--backbone=iresnet18 --image_size=32 --batch=64 --repeats=10 --rounds=2]

Each variant runs in its own process (benchmarks/timed_steps.py: the same model, batch and meta batch); the
variants alternate over --rounds, so that a change in the machine's load reaches both. Prints a table,
then one JSON line.
"""

from __future__ import annotations

import json
import statistics

from absl import app, flags

from benchmarks.timed_steps import run_isolated

FLAGS = flags.FLAGS
KINDS = ("plain", "meta_all")


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("backbone", "iresnet18", "Backbone.")
    flags.DEFINE_integer("image_size", 32, "Image size.")
    flags.DEFINE_integer("batch", 64, "Training batch |T| (the meta batch |V| too).")
    flags.DEFINE_integer("repeats", 10, "Timed steps per process (after 2 warm-up steps).")
    flags.DEFINE_integer("rounds", 2, "Processes per variant, alternating.", lower_bound=1)


def main(argv):
    del argv
    seconds = {(kind, threads): [] for kind in KINDS for threads in (0, 1)}
    for _ in range(FLAGS.rounds):
        for kind, threads in seconds:
            row = run_isolated(kind=kind, backbone=FLAGS.backbone, image_size=FLAGS.image_size, batch=FLAGS.batch,
                               meta_batch=FLAGS.batch, repeats=FLAGS.repeats, inter_op_threads=threads)
            seconds[kind, threads].append(row["seconds"])
    print(f"{FLAGS.backbone} {FLAGS.image_size}x{FLAGS.image_size}, |T| = |V| = {FLAGS.batch}, median s/step "
          f"per process, {FLAGS.rounds} process(es) per variant")
    print(f"{'step':<10}{'default inter-op':>18}{'inter-op 1':>12}{'ratio':>8}")
    figures = {}
    for kind in KINDS:
        default, single = (statistics.median(seconds[kind, threads]) for threads in (0, 1))
        figures[kind] = {"default_s": round(default, 4), "inter_op_1_s": round(single, 4),
                         "ratio": round(single / default, 3)}
        print(f"{kind:<10}{default:>18.3f}{single:>12.3f}{single / default:>8.2f}")
    print(json.dumps({"backbone": FLAGS.backbone, "image_size": FLAGS.image_size, "batch": FLAGS.batch,
                      "rounds": FLAGS.rounds, "steps": figures}))


if __name__ == "__main__":
    define_flags()
    app.run(main)
