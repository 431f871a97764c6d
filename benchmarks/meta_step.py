"""Seconds per iteration of the plain CosFace step and of the MvCoM meta step, side by side.

    python -m benchmarks.meta_step [--backbone=iresnet18 --image_size=112 --batch=16 --repeats=5]

Each variant runs in its own process (same model, same batch; the meta batch as large as the
training batch, and half as large for the rows marked so; the margins' residuals unless the row
says weights or both, --meta_target). Prints a table, then one JSON line.
"""

from __future__ import annotations

import json

from absl import app, flags

from benchmarks.timed_steps import run_isolated

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("backbone", "iresnet18", "Backbone.")
    flags.DEFINE_integer("image_size", 112, "Image size.")
    flags.DEFINE_integer("batch", 16, "Training batch |T|.")
    flags.DEFINE_integer("repeats", 5, "Timed steps per variant (after 2 warm-up steps).")


def main(argv):
    del argv
    common = {"backbone": FLAGS.backbone, "image_size": FLAGS.image_size, "batch": FLAGS.batch,
              "repeats": FLAGS.repeats}
    rows = {
        "plain": run_isolated(kind="plain", meta_batch=FLAGS.batch, **common),
        "meta_all": run_isolated(kind="meta_all", meta_batch=FLAGS.batch, **common),
        "meta_output_block": run_isolated(kind="meta_output_block", meta_batch=FLAGS.batch, **common),
        "meta_all_half_v": run_isolated(kind="meta_all", meta_batch=FLAGS.batch // 2, **common),
        "meta_output_block_half_v": run_isolated(kind="meta_output_block", meta_batch=FLAGS.batch // 2, **common),
        # --meta_target=weights: one second-order pass for the summed objective instead of one per factor.
        "meta_output_block_weights": run_isolated(kind="meta_output_block", meta_batch=FLAGS.batch, target="weights",
                                                  **common),
        "meta_output_block_both": run_isolated(kind="meta_output_block", meta_batch=FLAGS.batch, target="both",
                                               **common),
    }
    plain = rows["plain"]["seconds"]
    print(f"{FLAGS.backbone} {FLAGS.image_size}x{FLAGS.image_size}, |T| = {FLAGS.batch}, float32, "
          f"median of {FLAGS.repeats} steps")
    print("| step | |V| | s/iteration | x plain | peak MB |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        meta_batch = FLAGS.batch // 2 if name.endswith("half_v") else (FLAGS.batch if name != "plain" else 0)
        print(f"| {name} | {meta_batch or '-'} | {row['seconds']:.3f} | {row['seconds'] / plain:.2f} | "
              f"{row['peak_mb']:.0f} |")
    seconds = {name: row["seconds"] for name, row in rows.items()}
    summary = {
        "backbone": FLAGS.backbone, "image_size": FLAGS.image_size, "batch": FLAGS.batch, "plain_s": plain,
        **{f"{name}_s": value for name, value in seconds.items() if name != "plain"},
        **{f"ratio_{name.removeprefix('meta_')}": value / plain for name, value in seconds.items() if name != "plain"},
        "peak_mb_plain": rows["plain"]["peak_mb"], "peak_mb_all": rows["meta_all"]["peak_mb"],
        "peak_mb_output_block": rows["meta_output_block"]["peak_mb"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
