"""Trains the study's run folders --jobs at a time, skipping finished ones, and scores them on val and test.

A run folder holding metrics.json is finished and never trained again, a test score holding
results.json is not scored again: a killed study resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading
import time

from benchmarks.bias.arms import ARM_KINDS, Arm, error_set_path
from benchmarks.bias.data import Study
from benchmarks.training_run import train_run
from mvcom_tf.data import synthetic


class Runner:
    """Trains run folders, `jobs` at a time, skipping finished ones; keeps their wall times in timings.json."""

    def __init__(self, out_dir: str, study: Study, data_splits: dict[str, synthetic.SplitConfig],
                 pretrain_flags: tuple[str, ...] = (), jobs: int = 2) -> None:
        self.out_dir, self.study, self.splits, self.pretrain_flags = out_dir, study, data_splits, pretrain_flags
        self.jobs = jobs
        self.timings_path = os.path.join(out_dir, "timings.json")
        self.timings = read_json(self.timings_path, {})
        # Wall time of earlier (possibly killed) invocations, brought up to date after every run.
        self.earlier_wall, self.started = self.timings.get("wall_seconds", 0.0), time.perf_counter()
        self.trained = 0
        self.lock = threading.Lock()  # the training threads share timings.json

    def wall_seconds(self) -> float:
        """The study's wall time so far, over every invocation."""
        return self.earlier_wall + time.perf_counter() - self.started

    def data(self, split: str) -> str:
        return os.path.join(self.out_dir, "data", split)

    def folder(self, seed: str, name: str) -> str:
        return os.path.join(self.out_dir, f"seed{seed}", name)

    def make_data(self) -> None:
        for split, config in self.splits.items():
            if not os.path.exists(os.path.join(self.data(split), "dataset.json")):
                print(f"rendering {split}", file=sys.stderr, flush=True)
                synthetic.write_split(self.data(split), split, config)

    def train(self, jobs: list[tuple[str, str, list[str]]]) -> None:
        """Trains (seed, name, flags) jobs whose folder has no metrics.json yet."""
        todo = [job for job in jobs if not os.path.exists(os.path.join(self.folder(*job[:2]), "metrics.json"))]
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            for future in concurrent.futures.as_completed([pool.submit(self._train_one, *job) for job in todo]):
                future.result()

    def _train_one(self, seed: str, name: str, run_flags: list[str]) -> None:
        print(f"training seed {seed} {name}", file=sys.stderr, flush=True)
        seconds = train_run([*self.study.train_flags, f"--train_data={self.data('train')}",
                             f"--meta_data={self.data('meta')}", f"--seed={seed}", *run_flags], self.folder(seed, name))
        with self.lock:
            self.timings[f"seed{seed}/{name}"] = seconds
            self.timings["wall_seconds"] = self.wall_seconds()
            self.trained += 1
            write_json(self.timings_path, self.timings)

    def pretrain(self, seeds: list[str]) -> None:
        self.train([(seed, "pretrain", ["--stage=pretrain", "--eval_data=", *self.pretrain_flags]) for seed in seeds])

    def error_sets(self, seeds: list[str]) -> None:
        """JTT's error set of each seed's pre-training (its misclassified training images), once."""
        from mvcom_tf.error_set import find_errors, write_error_set

        for seed in seeds:
            pretrain = self.folder(seed, "pretrain")
            if not os.path.exists(error_set_path(pretrain)):
                errors, seen = find_errors(pretrain, self.data("train"))
                write_error_set(error_set_path(pretrain), errors, seen, pretrain, self.data("train"))

    def fine_tune(self, seeds: list[str], arms: list[Arm]) -> None:
        """Fine-tunes every arm for every seed from that seed's pre-training, scored on val only."""
        if any(ARM_KINDS[arm.kind].error_set for arm in arms):
            self.error_sets(seeds)
        self.train([(seed, arm.name, ["--stage=meta", f"--eval_data={self.data('val')}",
                                      f"--init_checkpoint={self.folder(seed, 'pretrain')}/checkpoints/pretrain",
                                      *arm.flags(self.folder(seed, "pretrain"))]) for seed in seeds for arm in arms])

    def val_result(self, seed: str, arm: Arm) -> dict:
        metrics = read_json(os.path.join(self.folder(seed, arm.name), "metrics.json"), None)
        return metrics["benchmarks"]["synthetic:val"]

    def minutes(self, seeds: list[str], arm: Arm) -> float | None:
        """The mean wall time of the arm's fine-tunings over `seeds` (two run at once), in minutes."""
        times = [self.timings.get(f"seed{seed}/{arm.name}") for seed in seeds]
        times = [t for t in times if t is not None]
        return round(sum(times) / len(times) / 60, 2) if times else None

    def test_result(self, seed: str, arm: Arm) -> dict:
        """The run's test score (evaluated once, in this process, then read back)."""
        output = os.path.join(self.folder(seed, arm.name), "test")
        path = os.path.join(output, "results.json")
        if not os.path.exists(path):
            from mvcom_tf.evaluation.run import evaluate

            evaluate(self.folder(seed, arm.name), [f"synthetic:{self.data('test')}"], output)
        return read_json(path, None)["synthetic:test"]


def read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(temporary, path)
