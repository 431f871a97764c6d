"""Shared by the studies: one `mvcom_tf.train` run in a fresh process, its output kept in <folder>/train.log."""

from __future__ import annotations

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_run(train_flags: list[str], folder: str) -> float:
    """Trains `python -m mvcom_tf.train <train_flags> --model_dir=<folder>` from the repository; returns its wall
    seconds, or ends the study naming the command and the log when the run fails. The log is appended to."""
    os.makedirs(folder, exist_ok=True)
    args = [sys.executable, "-m", "mvcom_tf.train", *train_flags, f"--model_dir={folder}"]
    start = time.perf_counter()
    with open(os.path.join(folder, "train.log"), "a") as log:  # a re-run (resumed, or re-evaluated) adds to it
        result = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": REPO})
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(args)}; see {folder}/train.log")
    return time.perf_counter() - start
