"""Shared by the studies: one `mvcom_tf.train` run in a fresh process, its output kept in <folder>/train.log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUNNING: set[subprocess.Popen] = set()  # the trainings this process has under way


def stop_trainings_with_this_process() -> None:
    """Makes SIGTERM and SIGHUP stop this process's trainings before it ends (Ctrl-C reaches them already, as
    its process group): a study killed by pid would otherwise leave them training, writing to run folders.
    Call it from the main thread; each training saves its checkpoint on SIGTERM, so a resumed study goes on."""
    def stop(signum, frame):
        for process in list(_RUNNING):
            process.terminate()
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)


def train_run(train_flags: list[str], folder: str) -> float:
    """Trains `python -m mvcom_tf.train <train_flags> --model_dir=<folder>` from the repository; returns its wall
    seconds, or ends the study naming the command and the log when the run fails. The log is appended to."""
    os.makedirs(folder, exist_ok=True)
    args = [sys.executable, "-m", "mvcom_tf.train", *train_flags, f"--model_dir={folder}"]
    start = time.perf_counter()
    with open(os.path.join(folder, "train.log"), "a") as log:  # a re-run (resumed, or re-evaluated) adds to it
        process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": REPO})
        _RUNNING.add(process)
        try:
            returncode = process.wait()
        finally:
            _RUNNING.discard(process)
    if returncode:
        raise SystemExit(f"failed ({returncode}): {' '.join(args)}; see {folder}/train.log")
    return time.perf_counter() - start
