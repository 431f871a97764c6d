"""The bias study: does MvCoM reduce bias on the synthetic faces, against the headroom an oracle margin shows?

    python -m benchmarks.bias [--out_dir=runs/bias --seeds=0,1,2,3,4 --jobs=2]
    python -m benchmarks.bias --quick          # the same study, tiny (a few minutes; the tests run it)

1. Data under <out_dir>/data: the demo's long-tailed `train` and balanced `meta` splits, and
   two pair splits with identities disjoint from them and from each other, `val` (every
   choice is made on it) and `test` (scored once per final run, never used to choose).
2. One CosFace pre-training per seed (flags/bias_study.cfg: the demo's network and data,
   trained until it fits the training split; with the demo's schedule the softmax stays
   saturated and no margin changes a gradient, see that file). Every fine-tuning of a seed starts from
   it with that seed's batches in the same order, so differences between arms are paired.
3. Selection on `val`, with the first --select_seeds seeds, by the val score (the mean over
   the four factors of the worst group's accuracy): first CosFace and the oracle at every
   length and delta (the headroom), then MvCoM's tau, residual_max and meta scope, then the
   fine-tuning length (MvCoM's lead over CosFace at the same length); the oracle keeps its
   best delta at that length.
4. Final arms for every seed at the kept settings: cosface (constant margin), prior (the
   class-aware prior alone), oracle (m + delta for each factor in which the sample is not in
   the head class, from its ground-truth labels), mvcom_hard, mvcom_random.
5. Report: per arm against cosface, the mean paired difference over seeds with its 95% t
   interval, for accuracy and per factor worst group, std across groups and skewed error
   ratio; a PNG of them; the residuals per class (seed Sec. E) and their correlation with
   tail membership. Written to <out_dir>/report.md, bias.json and bias_differences.png; a
   full run also to benchmarks/results/. The last line printed is the JSON.

A run folder holding metrics.json is finished and never trained again, a test score holding
results.json is not scored again: a killed study resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from mvcom_tf.data import schema, synthetic
from mvcom_tf.evaluation.metrics import paired_interval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
MEASURES = ("worst_accuracy", "skewed_error_ratio", "group_std")
SHORT = {"worst_accuracy": "worst", "skewed_error_ratio": "ser", "group_std": "std"}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("out_dir", "runs/bias", "Folder of the data, the run folders and the report.")
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds (initialisation, data order, augmentation).")
    flags.DEFINE_integer("select_seeds", 1, "How many of the first seeds choose the settings on val (each costs "
                         "about 30 minutes here).", lower_bound=1)
    flags.DEFINE_integer("jobs", 3, "Trainings run at once (3 keeps 2 cores busy through start-up and evaluation).",
                         lower_bound=1)
    flags.DEFINE_bool("quick", False, "A tiny study (small data and network, one value per setting) for tests.")


@dataclasses.dataclass(frozen=True)
class Study:
    """What a study trains: its data, the training flags every run shares, and the grids searched on val."""

    splits: dict[str, synthetic.SplitConfig]
    train_flags: tuple[str, ...]
    taus: tuple[float, ...]
    residual_maxes: tuple[float, ...]
    scopes: tuple[str, ...]
    lengths: tuple[int, ...]
    oracle_deltas: tuple[float, ...]


_EVAL_PAIRS = synthetic.SplitConfig(num_identities=1250, pair_anchors=2)  # >= 5,000 pairs in every group
FULL = Study(
    splits={**synthetic.demo_configs(), "val": _EVAL_PAIRS, "test": _EVAL_PAIRS},
    train_flags=("--flagfile=flags/bias_study.cfg",),
    taus=(1e3, 3e3, 1e4, 3e4, 1e5),
    residual_maxes=(0.1, 0.2, 0.4),
    scopes=("head", "all"),
    lengths=(2, 7),  # fine-tuning epochs; the paper fine-tunes for 0.6 of its pre-training (18 of 30)
    oracle_deltas=(0.05, 0.1, 0.2, 0.3),
)
QUICK = Study(
    splits={"train": synthetic.SplitConfig(num_identities=32, max_images=10, min_images=4),
            "meta": synthetic.SplitConfig(num_identities=16, meta_images=4),
            "val": synthetic.SplitConfig(num_identities=8), "test": synthetic.SplitConfig(num_identities=8)},
    train_flags=("--flagfile=flags/bias_study.cfg", "--width_multiplier=0.125", "--embedding_size=32",
                 "--batch_size=16", "--epochs=6", "--lr_steps=5", "--log_every=10", "--variation_warmup_steps=2"),
    taus=(1000.0,), residual_maxes=(0.2,), scopes=("head",), lengths=(2,), oracle_deltas=(0.1,),
)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tuning configuration: an arm of the study with its settings."""

    arm: str
    length: int
    tau: float = 0.0
    residual_max: float = 0.2
    scope: str = "all"
    delta: float = 0.0

    @property
    def name(self) -> str:
        if self.arm.startswith("mvcom"):
            return f"{self.arm}-tau{self.tau:g}-rmax{self.residual_max:g}-{self.scope}-e{self.length}"
        if self.arm == "oracle":
            return f"oracle-delta{self.delta:g}-e{self.length}"
        return f"{self.arm}-e{self.length}"

    def flags(self) -> list[str]:
        arm_flags = {
            "cosface": ["--margin_prior=constant", "--meta_lr_tau=0"],
            "prior": ["--margin_prior=volume", "--meta_lr_tau=0"],
            "oracle": ["--margin_prior=constant", "--meta_lr_tau=0", "--oracle_margin_deltas=" + ",".join(
                [f"{self.delta:g}"] * len(schema.FACTORS))],
            "mvcom_hard": ["--margin_prior=volume", "--meta_sampling=hard"],
            "mvcom_random": ["--margin_prior=volume", "--meta_sampling=random"],
        }[self.arm]
        if self.arm.startswith("mvcom"):
            arm_flags += [f"--meta_lr_tau={self.tau:g}", f"--residual_max={self.residual_max:g}",
                          f"--meta_scope={self.scope}"]
        return arm_flags + [f"--meta_epochs={self.length}"]


class Runner:
    """Trains run folders, --jobs at a time, skipping finished ones; keeps their wall times in timings.json."""

    def __init__(self, out_dir: str, study: Study) -> None:
        self.out_dir, self.study = out_dir, study
        self.timings_path = os.path.join(out_dir, "timings.json")
        self.timings = _read_json(self.timings_path, {})
        self.trained = 0
        self.lock = threading.Lock()  # the training threads share timings.json

    def data(self, split: str) -> str:
        return os.path.join(self.out_dir, "data", split)

    def folder(self, seed: str, name: str) -> str:
        return os.path.join(self.out_dir, f"seed{seed}", name)

    def make_data(self) -> None:
        for split, config in self.study.splits.items():
            if not os.path.exists(os.path.join(self.data(split), "dataset.json")):
                print(f"rendering {split}", file=sys.stderr, flush=True)
                synthetic.write_split(self.data(split), split, config)

    def train(self, jobs: list[tuple[str, str, list[str]]]) -> None:
        """Trains (seed, name, flags) jobs whose folder has no metrics.json yet."""
        todo = [job for job in jobs if not os.path.exists(os.path.join(self.folder(*job[:2]), "metrics.json"))]
        with concurrent.futures.ThreadPoolExecutor(FLAGS.jobs) as pool:
            for future in concurrent.futures.as_completed([pool.submit(self._train_one, *job) for job in todo]):
                future.result()

    def _train_one(self, seed: str, name: str, run_flags: list[str]) -> None:
        folder = self.folder(seed, name)
        os.makedirs(folder, exist_ok=True)
        args = [sys.executable, "-m", "mvcom_tf.train", *self.study.train_flags,
                f"--train_data={self.data('train')}", f"--meta_data={self.data('meta')}",
                f"--model_dir={folder}", f"--seed={seed}", *run_flags]
        print(f"training seed {seed} {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with open(os.path.join(folder, "train.log"), "w") as log:
            result = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": REPO})
        if result.returncode:
            raise SystemExit(f"failed ({result.returncode}): {' '.join(args)}; see {folder}/train.log")
        with self.lock:
            self.timings[f"seed{seed}/{name}"] = time.perf_counter() - start
            self.trained += 1
            _write_json(self.timings_path, self.timings)

    def pretrain(self, seeds: list[str]) -> None:
        self.train([(seed, "pretrain", ["--stage=pretrain", "--eval_data="]) for seed in seeds])

    def fine_tune(self, seeds: list[str], arms: list[Arm]) -> None:
        """Fine-tunes every arm for every seed from that seed's pre-training, scored on val only."""
        self.train([(seed, arm.name, ["--stage=meta", f"--eval_data={self.data('val')}",
                                      f"--init_checkpoint={self.folder(seed, 'pretrain')}/checkpoints/pretrain",
                                      *arm.flags()]) for seed in seeds for arm in arms])

    def val_result(self, seed: str, arm: Arm) -> dict:
        metrics = _read_json(os.path.join(self.folder(seed, arm.name), "metrics.json"), None)
        return metrics["benchmarks"]["synthetic:val"]

    def test_result(self, seed: str, arm: Arm) -> dict:
        """The run's test score (evaluated once, in this process, then read back)."""
        output = os.path.join(self.folder(seed, arm.name), "test")
        path = os.path.join(output, "results.json")
        if not os.path.exists(path):
            from mvcom_tf.evaluation.run import evaluate

            evaluate(self.folder(seed, arm.name), [f"synthetic:{self.data('test')}"], output)
        return _read_json(path, None)["synthetic:test"]


def val_score(result: dict) -> float:
    """What selection maximises: the mean over the four factors of the worst group's accuracy on val."""
    return float(np.mean([result["factors"][factor]["worst_accuracy"] for factor in schema.FACTORS]))


def select(runner: Runner, seeds: list[str]) -> tuple[dict[str, Arm], list[dict]]:
    """Chooses MvCoM's settings, the fine-tuning length and the oracle's delta on val; returns the final arms
    and the val table (each step's runs, scored by the mean over the selection seeds)."""
    study, table = runner.study, []

    def scores(arms: list[Arm], step: str) -> list[float]:
        runner.fine_tune(seeds, arms)
        means = []
        for arm in arms:
            values = [val_score(runner.val_result(seed, arm)) for seed in seeds]
            accuracy = np.mean([runner.val_result(seed, arm)["accuracy"] for seed in seeds])
            means.append(float(np.mean(values)))
            table.append({"step": step, "run": arm.name, "val_accuracy": float(accuracy), "val_score": means[-1]})
        return means

    def best(arms: list[Arm], step: str, baseline: list[float] | None = None) -> Arm:
        values = np.asarray(scores(arms, step)) - (np.asarray(baseline) if baseline is not None else 0.0)
        return arms[int(np.argmax(values))]

    # Headroom first: the oracle against CosFace at every length (if no delta gains, margins cannot help here).
    cosface = scores([Arm("cosface", length) for length in study.lengths], "cosface")
    oracle = {length: scores([Arm("oracle", length, delta=d) for d in study.oracle_deltas], "oracle")
              for length in study.lengths}
    short = min(study.lengths)
    mvcom = Arm("mvcom_hard", short, residual_max=study.residual_maxes[len(study.residual_maxes) // 2],
                scope=study.scopes[0])
    mvcom = best([dataclasses.replace(mvcom, tau=tau) for tau in study.taus], "tau")
    mvcom = best([dataclasses.replace(mvcom, residual_max=r) for r in study.residual_maxes], "residual_max")
    mvcom = best([dataclasses.replace(mvcom, scope=scope) for scope in study.scopes], "scope")
    # A longer stage is kept only if it widens MvCoM's lead over CosFace trained as long.
    mvcom = best([dataclasses.replace(mvcom, length=length) for length in study.lengths], "length", cosface)
    delta = study.oracle_deltas[int(np.argmax(oracle[mvcom.length]))]
    settings = dataclasses.replace(mvcom, arm="")
    arms = {"cosface": Arm("cosface", mvcom.length), "prior": Arm("prior", mvcom.length),
            "oracle": Arm("oracle", mvcom.length, delta=delta),
            "mvcom_hard": dataclasses.replace(settings, arm="mvcom_hard"),
            "mvcom_random": dataclasses.replace(settings, arm="mvcom_random")}
    return arms, table


def paired_report(results: dict[str, list[dict]]) -> dict:
    """Per arm against cosface: mean paired difference over seeds and its 95% t interval, for accuracy and
    per factor the worst group's accuracy, the skewed error ratio and the std across groups."""
    baseline = results["cosface"]
    report = {}
    for arm, rows in results.items():
        if arm == "cosface":
            continue
        mean, low, high = paired_interval([r["accuracy"] - b["accuracy"] for r, b in zip(rows, baseline)])
        entry = {"accuracy_diff": _number(mean), "accuracy_ci": [_number(low), _number(high)]}
        for factor in schema.FACTORS:
            entry[factor] = {}
            for measure in MEASURES:
                mean, low, high = paired_interval([r["factors"][factor][measure] - b["factors"][factor][measure]
                                                   for r, b in zip(rows, baseline)])
                entry[factor][f"{SHORT[measure]}_diff"] = _number(mean)
                entry[factor][f"{SHORT[measure]}_ci"] = [_number(low), _number(high)]
        report[arm] = entry
    return report


def mechanism(runner: Runner, seeds: list[str], arm: Arm) -> dict:
    """The meta stage's mean residual per class of each factor (mean over seeds, standard error across
    seeds) and the correlation of residuals with tail membership, from the runs' metrics.json."""
    trainings = [_read_json(os.path.join(runner.folder(seed, arm.name), "metrics.json"), None)
                 ["stages"]["meta"]["training"] for seed in seeds]

    def over_seeds(key: str) -> dict | None:
        values = [t[key] for t in trainings if key in t and np.isfinite(t[key])]
        if not values:
            return None
        spread = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        return {"mean": float(np.mean(values)), "se": _number(spread)}

    classes = {factor: {name: over_seeds(f"margin/{factor}/{cls}")
                        for cls, name in enumerate(schema.CLASS_NAMES[factor])} for factor in schema.FACTORS}
    correlations = {factor: over_seeds(f"tail/{factor}/correlation") for factor in schema.FACTORS}
    return {"residual_per_class": classes, "tail_correlation_per_factor": correlations,
            "tail_correlation_summed": over_seeds("tail/correlation")}


def min_pairs_per_group(data_dir: str) -> int:
    """The fewest pairs in any group of any factor of a pair split."""
    columns = np.loadtxt(os.path.join(data_dir, synthetic.PAIRS_FILE), delimiter=",", skiprows=1, dtype=np.int64)
    counts = [int(np.sum(columns[:, 3 + k] == cls)) for k, factor in enumerate(schema.FACTORS)
              for cls in range(schema.NUM_CLASSES[factor])]
    return min(counts)


def plot(report: dict, path: str) -> None:
    """Paired differences against CosFace with their 95% intervals: accuracy, then per factor worst group and SER."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", None, "accuracy")] + [(factor, "worst", f"{factor}: worst group accuracy")
                                                   for factor in schema.FACTORS] \
        + [(factor, "ser", f"{factor}: skewed error ratio") for factor in schema.FACTORS]
    arms = list(report)
    figure, axes = plt.subplots(3, 3, figsize=(13, 10))
    for axis, (factor, measure, title) in zip(axes.flat, panels):
        entry = [report[arm] if measure is None else report[arm][factor] for arm in arms]
        key = "accuracy" if measure is None else measure
        means = np.array([np.nan if e[f"{key}_diff"] is None else e[f"{key}_diff"] for e in entry], float)
        bounds = np.array([[np.nan if v is None else v for v in e[f"{key}_ci"]] for e in entry], float)
        errors = np.abs(bounds.T - means)
        axis.errorbar(means, np.arange(len(arms)), xerr=errors, fmt="o", capsize=4)
        axis.axvline(0.0, color="grey", linewidth=1)
        axis.set_yticks(np.arange(len(arms)), arms)
        axis.set_title(title, fontsize=10)
        axis.invert_yaxis()
    figure.suptitle("Paired difference against CosFace over seeds (mean, 95% t interval); test split")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def markdown(study_json: dict, selection: list[dict]) -> str:
    """The report: the val table of the selection, the test differences, the mechanism figures."""
    lines = ["## Selection on val (mean over selection seeds)", "",
             "| step | run | val accuracy | val score (mean worst group) |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['run']} | {r['val_accuracy']:.4f} | {r['val_score']:.4f} |" for r in selection]
    lines += ["", f"Kept: {', '.join(f'{arm}: {name}' for arm, name in study_json['runs'].items())}", "",
              f"## Test: paired difference against cosface over {len(study_json['seeds'])} seeds, mean [95% CI]", ""]
    header = ["arm", "accuracy"] + [f"{factor} worst / SER / std" for factor in schema.FACTORS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(diff, interval, digits):
        if diff is None:
            return "n/a"
        low, high = (f"{v:+.{digits}f}" if v is not None else "n/a" for v in interval)
        return f"{diff:+.{digits}f} [{low}, {high}]"

    for arm, entry in study_json["arms"].items():
        cells = [arm, cell(entry["accuracy_diff"], entry["accuracy_ci"], 4)]
        for factor in schema.FACTORS:
            f = entry[factor]
            cells.append(" / ".join([cell(f["worst_diff"], f["worst_ci"], 4), cell(f["ser_diff"], f["ser_ci"], 2),
                                     cell(f["std_diff"], f["std_ci"], 4)]))
        lines.append("| " + " | ".join(cells) + " |")
    baseline = study_json["cosface"]
    lines += ["", f"Baseline (cosface) on test, mean over seeds: accuracy {_format(baseline['accuracy'], 4)}; "
              + "; ".join(f"{factor} worst {_format(baseline[factor]['worst'], 4)}, SER "
                          f"{_format(baseline[factor]['ser'], 2)}" for factor in schema.FACTORS)]
    for arm, figures in study_json["mechanism"].items():
        lines += ["", f"## Mechanism ({arm}): mean residual per class over the meta stage, mean (SE) over seeds", ""]
        for factor in schema.FACTORS:
            classes = figures["residual_per_class"][factor]
            values = ", ".join(f"{name} {v['mean']:+.4f} ({_format(v['se'], 4)})" for name, v in classes.items() if v)
            corr = figures["tail_correlation_per_factor"][factor]
            lines.append(f"- {factor}: {values}; correlation of r with tail membership "
                         f"{_format(corr and corr['mean'], 3)} ({_format(corr and corr['se'], 3)})")
        summed = figures["tail_correlation_summed"]
        lines.append(f"- summed residual vs tail in any factor: correlation {_format(summed and summed['mean'], 3)} "
                     f"({_format(summed and summed['se'], 3)})")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    study = QUICK if FLAGS.quick else FULL
    seeds = list(FLAGS.seeds) if not FLAGS.quick or FLAGS["seeds"].present else ["0", "1"]
    if len(seeds) < 2:
        raise app.UsageError("--seeds: paired intervals need at least 2 seeds")
    out_dir = FLAGS.out_dir
    os.makedirs(out_dir, exist_ok=True)
    started = time.perf_counter()
    runner = Runner(out_dir, study)
    runner.make_data()
    runner.pretrain(seeds)
    arms, selection = select(runner, seeds[:FLAGS.select_seeds])
    runner.fine_tune(seeds, list(arms.values()))
    results = {arm: [runner.test_result(seed, settings) for seed in seeds] for arm, settings in arms.items()}

    wall = runner.timings.get("wall_seconds", 0.0) + time.perf_counter() - started
    runner.timings["wall_seconds"] = wall
    _write_json(runner.timings_path, runner.timings)
    baseline = results["cosface"]
    study_json = {
        "seeds": [int(seed) for seed in seeds],
        "min_pairs_per_group": min(min_pairs_per_group(runner.data(split)) for split in ("val", "test")),
        "minutes": round(wall / 60, 1),
        "arms": paired_report(results),
        "runs": {arm: settings.name for arm, settings in arms.items()},
        "cosface": {"accuracy": _number(np.mean([r["accuracy"] for r in baseline])),
                    **{factor: {SHORT[m]: _number(np.mean([r["factors"][factor][m] for r in baseline]))
                                for m in MEASURES} for factor in schema.FACTORS}},
        "mechanism": {arm: mechanism(runner, seeds, arms[arm]) for arm in ("mvcom_hard", "mvcom_random")},
        "selection": selection,
        "command": "python -m benchmarks.bias" + (" --quick" if FLAGS.quick else ""),
        "date": datetime.date.today().isoformat(),
    }
    report = markdown(study_json, selection)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report + "\n")
    _write_json(os.path.join(out_dir, "bias.json"), study_json)
    plot(study_json["arms"], os.path.join(out_dir, "bias_differences.png"))
    if not FLAGS.quick:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        for name, committed in (("bias.json", "bias.json"), ("bias_differences.png", "bias.png"),
                                ("report.md", "bias_report.md")):
            shutil.copy(os.path.join(out_dir, name), os.path.join(RESULTS_DIR, committed))
    print(report)
    print(f"\n{runner.trained} runs trained in this invocation; {study_json['minutes']} min in all "
          f"(timings: {runner.timings_path})")
    print(json.dumps(study_json))


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 5)


def _format(value, digits: int) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(temporary, path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
