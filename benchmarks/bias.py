"""The bias benchmark: with the same data, budget and backbone, does MvCoM shrink the gap between groups?

    python benchmarks/bias.py [--seeds=0,1,2 --out_dir=runs/bias]

For every seed: one CosFace pre-training (the demo's: synthetic faces at 32 px, narrow
IResNet-18, 12 epochs), then four fine-tunings from it with the same schedule (the demo's meta
stage: 2 epochs, lr 0.01, the same training batches):
  cosface       constant margin 0.35 (the meta stage with tau = 0: plain CosFace steps)
  prior         the class-aware margin prior only (tau = 0)
  mvcom_random  MvCoM with random meta batches
  mvcom_hard    MvCoM with hard meta batches (the default)
Each fine-tuned SavedModel is scored with `python -m mvcom_tf.evaluate
--benchmark=synthetic:data/synthetic/test` into `<run>/eval/results.json`, and the table
(mean +/- std over seeds) is printed and written to `<out_dir>/table.md`. Runs whose folder
already holds metrics.json are not trained again, so an interrupted benchmark resumes.
Last line: JSON with the table's numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

from mvcom_tf.data import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "cosface": ["--margin_prior=constant", "--meta_lr_tau=0"],
    "prior": ["--margin_prior=volume", "--meta_lr_tau=0"],
    "mvcom_random": ["--margin_prior=volume", "--meta_sampling=random"],
    "mvcom_hard": ["--margin_prior=volume", "--meta_sampling=hard"],
}
TEST_DATA = "data/synthetic/test"

flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (initialisation, data order, augmentation).")
flags.DEFINE_string("out_dir", "runs/bias", "Folder of the run folders, timings.json and table.md.")
flags.DEFINE_list("variants", list(VARIANTS), "Variants to run.")
FLAGS = flags.FLAGS


def _run(args: list[str], log_path: str) -> float:
    """Runs `python <args>` from the repository root, output to a log file; returns its wall time."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": REPO})
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): python {' '.join(args)}; see {log_path}")
    return time.perf_counter() - start


def _train(run_dir: str, flags_: list[str], timings: dict, key: str) -> None:
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        return
    os.makedirs(run_dir, exist_ok=True)
    print(f"training {run_dir}", file=sys.stderr, flush=True)
    timings[key] = _run(["-m", "mvcom_tf.train", "--flagfile=flags/demo.cfg", f"--model_dir={run_dir}", *flags_],
                        os.path.join(run_dir, "train.log"))


def summarize(results: list[dict]) -> dict:
    """Mean and std over seeds of overall accuracy and, per factor, worst group, std across groups, SER."""
    rows = {"accuracy": [r["accuracy"] for r in results]}
    for factor in schema.FACTORS:
        for measure in ("worst_accuracy", "group_std", "skewed_error_ratio"):
            rows[f"{factor}/{measure}"] = [r["factors"][factor][measure] for r in results]
    return {name: (float(np.mean(values)), float(np.std(values))) for name, values in rows.items()}


def main(argv) -> None:
    del argv
    out_dir = FLAGS.out_dir
    os.makedirs(out_dir, exist_ok=True)
    timings_path = os.path.join(out_dir, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    for seed in FLAGS.seeds:
        pretrain = os.path.join(out_dir, f"seed{seed}", "pretrain")
        _train(pretrain, ["--stage=pretrain", f"--seed={seed}"], timings, f"seed{seed}/pretrain")
        for variant in FLAGS.variants:
            run_dir = os.path.join(out_dir, f"seed{seed}", variant)
            _train(run_dir, ["--stage=meta", f"--seed={seed}", f"--init_checkpoint={pretrain}/checkpoints/pretrain",
                             *VARIANTS[variant]], timings, f"seed{seed}/{variant}")
            with open(timings_path, "w") as f:
                json.dump(timings, f, indent=1)
    results = {variant: [] for variant in FLAGS.variants}
    for seed in FLAGS.seeds:
        for variant in FLAGS.variants:
            run_dir = os.path.join(out_dir, f"seed{seed}", variant)
            results_path = os.path.join(run_dir, "eval", "results.json")
            if not os.path.exists(results_path):
                _run(["-m", "mvcom_tf.evaluate", f"--model={run_dir}", f"--benchmark=synthetic:{TEST_DATA}",
                      f"--output_dir={run_dir}/eval"], os.path.join(run_dir, "evaluate.log"))
            with open(results_path) as f:
                results[variant].append(json.load(f)[f"synthetic:{os.path.basename(TEST_DATA)}"])

    summary = {variant: summarize(rows) for variant, rows in results.items()}
    header = ["variant", "accuracy"] + [f"{factor} worst / std / SER" for factor in schema.FACTORS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, numbers in summary.items():
        cells = [variant, f"{numbers['accuracy'][0]:.4f} +- {numbers['accuracy'][1]:.4f}"]
        for factor in schema.FACTORS:
            worst, spread, ser = (numbers[f"{factor}/{m}"] for m in ("worst_accuracy", "group_std",
                                                                       "skewed_error_ratio"))
            cells.append(f"{worst[0]:.3f}+-{worst[1]:.3f} / {spread[0]:.3f}+-{spread[1]:.3f} / "
                         f"{ser[0]:.2f}+-{ser[1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    total_minutes = sum(timings.values()) / 60
    lines.append(f"\n{len(FLAGS.seeds)} seeds; training wall time {total_minutes:.0f} min in all "
                 f"({timings_path}); every number from <out_dir>/seed<k>/<variant>/eval/results.json.")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(json.dumps({variant: {name: round(mean, 4) for name, (mean, _) in numbers.items()}
                      for variant, numbers in summary.items()}))


if __name__ == "__main__":
    app.run(main)
