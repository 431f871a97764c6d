"""The bias study: where can per-sample margins help, and does MvCoM reach that headroom?

    python -m benchmarks.bias [--data=headroom --out_dir=runs/bias_headroom --seeds=0,1,2,3,4]
    python -m benchmarks.bias --quick          # the same study, tiny (a few minutes; the tests run it)
    python -m benchmarks.bias --tail_fraction=0.01 --pretrain_epochs=30 --select_only --arms=oracle,resample
                                               # one point of the headroom search: its val table only
                                               # (--oracle_deltas=0.5,1 tries other margins there)

1. Data under <out_dir>/data, by --data: `headroom` (the default: every tail class of pose,
   occlusion and blur at 0.25% of the training images (--tail_fraction), variations that keep the
   identity evidence; synthetic.HEADROOM_*) or `demo` (the demo's data, whose tails lose information).
   Long-tailed `train`, balanced `meta`, and two pair splits with identities disjoint from them
   and each other: `val` (every choice is made on it) and `test` (scored once per final run).
2. One CosFace pre-training per seed (flags/bias_study.cfg's network at s = 16, out of the saturated
   softmax in which no margin changes a gradient; 10 of its 30 epochs, --pretrain_epochs, with its lr
   steps scaled: the headroom search's point at which resampling gains on test). Every
   fine-tuning of a seed starts from it with that seed's batches in the same order, so
   differences between arms are paired.
3. Selection on `val`, with the first --select_seeds seeds, by the val score (the mean over the
   four factors of the worst group's accuracy): first the headroom (CosFace, the oracle at each
   delta, resample), then for each meta objective MvCoM's tau, then its meta scope.
4. Final arms for every seed: cosface (constant margin), prior (the class-aware prior alone),
   oracle (m + delta for each factor in which the sample is not in the head class, from its
   ground-truth labels), resample (constant margin, batches drawn so that every class of a
   factor is about equally likely: --train_sampling=balanced), mvcom_variation (Eq. 13) and
   mvcom_verification (our objective), both with hard meta sampling.
5. Report: per arm against cosface, the mean paired difference over seeds with its 95% t
   interval, for accuracy and per factor worst group, std across groups and skewed error
   ratio; a PNG of them; the residuals per class (seed Sec. E) and their correlation with tail
   membership; the meta-signal probe (benchmarks/meta_signal.py) from the first seed's
   pre-training for each MvCoM arm. Written to <out_dir>/report.md, bias.json and
   bias_differences.png; a full run also to benchmarks/results/ (bias.json, bias.png,
   bias_report.md for the headroom data; bias_demo.* for the demo's). The last line printed
   is the JSON.

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
    flags.DEFINE_enum("data", "headroom", list(DATA), "The data variant: headroom (rare tails that keep the "
                      "identity) or demo (the demo's data).")
    flags.DEFINE_string("out_dir", "", "Folder of the data, the run folders and the report; empty: runs/bias_<data>.")
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds (initialisation, data order, augmentation).")
    flags.DEFINE_integer("select_seeds", 1, "How many of the first seeds choose the settings on val.", lower_bound=1)
    flags.DEFINE_integer("jobs", 2, "Trainings run at once (2 keeps 2 cores busy through start-up and evaluation).",
                         lower_bound=1)
    flags.DEFINE_list("arms", list(ARMS), f"Arms compared with cosface (always run: the baseline), among "
                      f"{', '.join(ARMS)}.")
    flags.register_validator("arms", lambda arms: set(arms) <= set(ARMS), f"--arms must be among {', '.join(ARMS)}")
    flags.DEFINE_bool("quick", False, "A tiny study (small data and network, one value per setting) for tests.")
    flags.DEFINE_float("tail_fraction", None, "Headroom data: the share of the training images in each tail class "
                       f"of pose, occlusion and blur (a knob of the headroom search); default {FULL.tail_fraction:g} "
                       f"(--quick: {QUICK.tail_fraction:g}).", lower_bound=0.0, upper_bound=1 / 6)
    flags.DEFINE_integer("pretrain_epochs", None, "Epochs of the CosFace pre-training, its lr steps scaled from "
                         f"flags/bias_study.cfg's {CONFIG_EPOCHS} (a knob of the headroom search); default "
                         f"{FULL.pretrain_epochs} (--quick: its own 3).", lower_bound=1)
    flags.DEFINE_list("oracle_deltas", [f"{delta:g}" for delta in FULL.oracle_deltas], "The oracle's margin deltas "
                      "tried on val (the headroom step of the selection; --quick tries 0.1).")
    flags.register_validator("oracle_deltas", _positive_numbers, "--oracle_deltas must be numbers above 0")
    flags.DEFINE_bool("select_only", False, "Stop after the selection on val (the first --select_seeds seeds): the "
                      "headroom search's step, which prints the val table and writes <out_dir>/selection.json.")


DATA = ("headroom", "demo")
CONFIG_EPOCHS, CONFIG_LR_STEPS = 30, (14, 20, 23)  # flags/bias_study.cfg
ARMS = ("prior", "oracle", "resample", "mvcom_variation", "mvcom_verification")


@dataclasses.dataclass(frozen=True)
class Study:
    """What a study trains: the training flags every run shares and the grids searched on val."""

    train_flags: tuple[str, ...]
    taus: tuple[float, ...]
    scopes: tuple[str, ...]
    length: int  # fine-tuning epochs
    oracle_deltas: tuple[float, ...]
    tail_fraction: float  # the headroom data's share of the training images in each tail class
    pretrain_epochs: int | None  # None: the train flags' own schedule
    objectives: tuple[str, ...] = ("variation", "verification")


FULL = Study(
    train_flags=("--flagfile=flags/bias_study.cfg",),
    # The probe's first updates are about 1e-6 per sample at tau = 1: tau 1e4 and 1e5 give residuals of
    # about 0.01 to the clip at 0.2 (1e3, the demo study's choice, leaves them near 0).
    taus=(1e4, 1e5),
    # Scope all costs about 7x a plain step (benchmarks/meta_step.py): its ten final runs alone would take
    # longer than the study's 150-minute budget here, so the study runs the output-block scope only.
    scopes=("output_block",),
    length=7,  # the paper fine-tunes for 0.6 of its pre-training (18 of 30 epochs); 7 fits the budget
    # Up to 1.0 (the logit shifted by s = 16): the headroom search found no delta that helps (docs/bias_study.md).
    oracle_deltas=(0.1, 0.2, 0.3, 0.5, 1.0),
    # The headroom search's fourth point (docs/bias_study.md): rare tails and a pre-training that has not yet
    # fitted them, where balanced resampling gains on test (at 1% and 30 epochs no reference gains).
    tail_fraction=synthetic.HEADROOM_TAIL_FRACTION,
    pretrain_epochs=10,
)
# The --quick study's network and schedule (benchmarks.meta_signal --quick pre-trains with them too).
QUICK_TRAIN_FLAGS = ("--flagfile=flags/bias_study.cfg", "--width_multiplier=0.125", "--embedding_size=32",
                     "--batch_size=16", "--epochs=3", "--lr_steps=2", "--log_every=10", "--variation_warmup_steps=2")
# Its tails at 1%: a tiny training split holds a few images of each tail class (at 0.25% mostly none).
QUICK = Study(train_flags=QUICK_TRAIN_FLAGS, taus=(1000.0,), scopes=("output_block",), length=1, oracle_deltas=(0.1,),
              tail_fraction=0.01, pretrain_epochs=None)

_EVAL_PAIRS = synthetic.SplitConfig(num_identities=1250, pair_anchors=2)  # >= 5,000 pairs in every group


def splits(data: str, quick: bool, tail_fraction: float | None = None) -> dict[str, synthetic.SplitConfig]:
    """The study's splits of a data variant: demo (the demo's data) or headroom (rare, identity-keeping tails)."""
    if tail_fraction is None:
        tail_fraction = (QUICK if quick else FULL).tail_fraction
    if quick:
        tiny = {"train": synthetic.SplitConfig(num_identities=32, max_images=10, min_images=4),
                "meta": synthetic.SplitConfig(num_identities=16, meta_images=4),
                "val": synthetic.SplitConfig(num_identities=8), "test": synthetic.SplitConfig(num_identities=8)}
    else:
        tiny = {**synthetic.demo_configs(), "val": _EVAL_PAIRS, "test": _EVAL_PAIRS}
    if data == "demo":
        return tiny
    return {split: synthetic.headroom_config(config, split, tail_fraction) for split, config in tiny.items()}


def pretrain_schedule(epochs: int | None) -> list[str]:
    """The pre-training's flags for a length other than flags/bias_study.cfg's: its lr steps at the same fractions."""
    if epochs is None or epochs == CONFIG_EPOCHS:
        return []
    steps = sorted({max(1, min(epochs - 1, round(step * epochs / CONFIG_EPOCHS))) for step in CONFIG_LR_STEPS})
    return [f"--epochs={epochs}", "--lr_steps=" + ",".join(str(step) for step in steps if step < epochs)]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tuning configuration: an arm of the study with its settings."""

    arm: str
    length: int
    tau: float = 0.0
    scope: str = "output_block"
    delta: float = 0.0

    @property
    def objective(self) -> str:
        return self.arm.removeprefix("mvcom_")

    @property
    def name(self) -> str:
        if self.arm.startswith("mvcom"):
            return f"{self.arm}-tau{self.tau:g}-{self.scope}-e{self.length}"
        if self.arm == "oracle":
            return f"oracle-delta{self.delta:g}-e{self.length}"
        return f"{self.arm}-e{self.length}"

    def flags(self) -> list[str]:
        constant = ["--margin_prior=constant", "--meta_lr_tau=0"]
        if self.arm.startswith("mvcom"):
            arm_flags = ["--margin_prior=volume", "--meta_sampling=hard", f"--meta_objective={self.objective}",
                         f"--meta_lr_tau={self.tau:g}", f"--meta_scope={self.scope}"]
        else:
            arm_flags = {
                "cosface": constant,
                "prior": ["--margin_prior=volume", "--meta_lr_tau=0"],
                "oracle": constant + ["--oracle_margin_deltas=" + ",".join([f"{self.delta:g}"] * len(schema.FACTORS))],
                "resample": constant + ["--train_sampling=balanced"],
            }[self.arm]
        return arm_flags + [f"--meta_epochs={self.length}"]


class Runner:
    """Trains run folders, --jobs at a time, skipping finished ones; keeps their wall times in timings.json."""

    def __init__(self, out_dir: str, study: Study, data_splits: dict[str, synthetic.SplitConfig],
                 pretrain_flags: tuple[str, ...] = ()) -> None:
        self.out_dir, self.study, self.splits, self.pretrain_flags = out_dir, study, data_splits, pretrain_flags
        self.timings_path = os.path.join(out_dir, "timings.json")
        self.timings = _read_json(self.timings_path, {})
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
            self.timings["wall_seconds"] = self.wall_seconds()
            self.trained += 1
            _write_json(self.timings_path, self.timings)

    def pretrain(self, seeds: list[str]) -> None:
        self.train([(seed, "pretrain", ["--stage=pretrain", "--eval_data=", *self.pretrain_flags]) for seed in seeds])

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


def select(runner: Runner, seeds: list[str], wanted: tuple[str, ...] = ARMS) -> tuple[dict[str, Arm], list[dict]]:
    """Chooses on val: the oracle's delta (the headroom, beside cosface and resample), then for each meta objective
    MvCoM's tau and meta scope; returns the final arms (cosface and the `wanted` ones) and the val table (runs
    scored by the mean over the selection seeds)."""
    study, table = runner.study, []

    def best(arms: list[Arm], step: str) -> Arm:
        runner.fine_tune(seeds, arms)
        means = []
        for arm in arms:
            results = [runner.val_result(seed, arm) for seed in seeds]
            means.append(float(np.mean([val_score(result) for result in results])))
            table.append({"step": step, "run": arm.name, "val_score": means[-1],
                          "val_accuracy": float(np.mean([result["accuracy"] for result in results])),
                          "worst": {factor: float(np.mean([result["factors"][factor]["worst_accuracy"]
                                                           for result in results])) for factor in schema.FACTORS}})
        return arms[int(np.argmax(means))]

    length = study.length
    arms = {"cosface": best([Arm("cosface", length)], "headroom")}
    if "prior" in wanted:
        arms["prior"] = Arm("prior", length)
    if "oracle" in wanted:
        arms["oracle"] = best([Arm("oracle", length, delta=delta) for delta in study.oracle_deltas], "headroom")
    if "resample" in wanted:
        arms["resample"] = best([Arm("resample", length)], "headroom")
    for objective in study.objectives:
        if f"mvcom_{objective}" not in wanted:
            continue
        mvcom = Arm(f"mvcom_{objective}", length, scope=study.scopes[0])
        mvcom = best([dataclasses.replace(mvcom, tau=tau) for tau in study.taus], f"{objective}: tau")
        arms[mvcom.arm] = best([dataclasses.replace(mvcom, scope=scope) for scope in study.scopes],
                               f"{objective}: scope")
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


KNOB_FLAGS = {"tail": "tail_fraction", "pretrain": "pretrain_epochs"}  # a knob's short name (in folder names): flag


def search_knobs() -> dict[str, float]:
    """The headroom search's knobs given that differ from the full study's (they name the folder and results)."""
    knobs = {}
    if FLAGS.data == "headroom" and FLAGS.tail_fraction not in (None, FULL.tail_fraction):
        knobs["tail"] = FLAGS.tail_fraction
    if FLAGS.pretrain_epochs not in (None, FULL.pretrain_epochs):
        knobs["pretrain"] = FLAGS.pretrain_epochs
    return knobs


def study_from_flags() -> Study:
    """The full or --quick study with the settings given on the command line."""
    study = QUICK if FLAGS.quick else FULL
    if FLAGS["oracle_deltas"].present:
        study = dataclasses.replace(study, oracle_deltas=tuple(float(delta) for delta in FLAGS.oracle_deltas))
    if FLAGS.tail_fraction is not None:
        study = dataclasses.replace(study, tail_fraction=FLAGS.tail_fraction)
    if FLAGS.pretrain_epochs is not None:
        study = dataclasses.replace(study, pretrain_epochs=FLAGS.pretrain_epochs)
    return study


def knob_suffix(knobs: dict[str, float]) -> str:
    """What the knobs add to the run folder's and the results' names: `_tail0.01_pretrain30`."""
    return "".join(f"_{key}{value:g}" for key, value in knobs.items())


def markdown_selection(selection: list[dict]) -> str:
    """The val table of the selection: per run, its val accuracy, its val score and each factor's worst group."""
    lines = ["## Selection on val (mean over selection seeds)", "",
             "| step | run | val accuracy | val score (mean worst group) | " + " | ".join(
                 f"{factor} worst" for factor in schema.FACTORS) + " |", "|---|---|---|---|" + "---|" * len(schema.FACTORS)]
    lines += [f"| {r['step']} | {r['run']} | {r['val_accuracy']:.4f} | {r['val_score']:.4f} | " + " | ".join(
        f"{r['worst'][factor]:.4f}" for factor in schema.FACTORS) + " |" for r in selection]
    return "\n".join(lines)


def markdown(study_json: dict, selection: list[dict]) -> str:
    """The report: the val table of the selection, the test differences, the mechanism figures."""
    lines = [markdown_selection(selection)]
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
    for arm, figures in study_json.get("meta_signal", {}).items():
        lines += ["", f"## Meta signal ({arm}, seed {study_json['seeds'][0]}'s pre-training): first residual update "
                      "against tail membership, mean over batches [95% CI]", ""]
        for factor, f in figures.items():
            low, high = (_format(v, 3) for v in f["corr_ci"])
            lines.append(f"- {factor}: correlation {_format(f['corr'], 3)} [{low}, {high}] over {f['batches']} "
                         f"batches; mean update of tail samples {_scientific(f['tail_mean'])}, head {_scientific(f['head_mean'])}")
    return "\n".join(lines)


def meta_signal(runner: Runner, seed: str, arm: Arm, batches: int, warmup_steps: int) -> dict:
    """The meta-signal probe (benchmarks.meta_signal) of an MvCoM arm's objective and scope from a seed's
    pre-training; kept in <out_dir>/meta_signal/, so a resumed study does not probe again."""
    path = os.path.join(runner.out_dir, "meta_signal", f"seed{seed}-{arm.objective}-{arm.scope}.json")
    figures = _read_json(path, None)
    if figures is None:
        from benchmarks.meta_signal import probe_in_fresh_process

        print(f"probing the meta signal of {arm.name} from seed {seed}", file=sys.stderr, flush=True)
        figures = probe_in_fresh_process(runner.folder(seed, "pretrain"), arm.objective, batches, warmup_steps,
                                         [f"--meta_scope={arm.scope}", "--meta_sampling=hard"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_json(path, figures)
    return figures


def main(argv) -> None:
    del argv
    study = study_from_flags()
    seeds = list(FLAGS.seeds) if not FLAGS.quick or FLAGS["seeds"].present else ["0", "1"]
    if len(seeds) < 2 and not FLAGS.select_only:
        raise app.UsageError("--seeds: paired intervals need at least 2 seeds")
    knobs = search_knobs()
    out_dir = FLAGS.out_dir or f"runs/bias_{FLAGS.data}{knob_suffix(knobs)}" + ("_quick" if FLAGS.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    runner = Runner(out_dir, study, splits(FLAGS.data, FLAGS.quick, study.tail_fraction),
                    tuple(pretrain_schedule(study.pretrain_epochs)))
    runner.make_data()
    runner.pretrain(seeds[:FLAGS.select_seeds])  # the headroom's answer first, before the other seeds train
    arms, selection = select(runner, seeds[:FLAGS.select_seeds], tuple(FLAGS.arms))
    if FLAGS.select_only:
        summary = {"data": FLAGS.data, "knobs": knobs, "seeds": [int(seed) for seed in seeds[:FLAGS.select_seeds]],
                   "made_by": {split: dataclasses.asdict(config) for split, config in runner.splits.items()},
                   "selection": selection, "command": " ".join(["python -m benchmarks.bias", *sys.argv[1:]])}
        _write_json(os.path.join(out_dir, "selection.json"), summary)
        print(markdown_selection(selection))
        print(json.dumps(summary))
        return
    runner.pretrain(seeds)
    runner.fine_tune(seeds, list(arms.values()))
    results = {arm: [runner.test_result(seed, settings) for seed in seeds] for arm, settings in arms.items()}
    mvcom_arms = [arm for arm in arms if arm.startswith("mvcom")]
    probes = {arm: meta_signal(runner, seeds[0], arms[arm], *((20, 20) if FLAGS.quick else (200, 300)))
              for arm in mvcom_arms}

    wall = runner.timings["wall_seconds"] = runner.wall_seconds()
    _write_json(runner.timings_path, runner.timings)
    baseline = results["cosface"]
    study_json = {
        "data": FLAGS.data,
        "knobs": knobs,
        "made_by": {split: dataclasses.asdict(config) for split, config in runner.splits.items()},
        "seeds": [int(seed) for seed in seeds],
        "min_pairs_per_group": min(min_pairs_per_group(runner.data(split)) for split in ("val", "test")),
        "minutes": round(wall / 60, 1),
        "arms": paired_report(results),
        "runs": {arm: settings.name for arm, settings in arms.items()},
        "cosface": {"accuracy": _number(np.mean([r["accuracy"] for r in baseline])),
                    **{factor: {SHORT[m]: _number(np.mean([r["factors"][factor][m] for r in baseline]))
                                for m in MEASURES} for factor in schema.FACTORS}},
        "mechanism": {arm: mechanism(runner, seeds, arms[arm]) for arm in mvcom_arms},
        "meta_signal": probes,
        "selection": selection,
        "command": f"python -m benchmarks.bias --data={FLAGS.data}" + (" --quick" if FLAGS.quick else "")
                   + "".join(f" --{KNOB_FLAGS[key]}={value:g}" for key, value in knobs.items())
                   + ("" if set(FLAGS.arms) == set(ARMS) else f" --arms={','.join(FLAGS.arms)}")
                   + (f" --oracle_deltas={','.join(FLAGS.oracle_deltas)}" if FLAGS["oracle_deltas"].present else ""),
        "date": datetime.date.today().isoformat(),
    }
    report = markdown(study_json, selection)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report + "\n")
    _write_json(os.path.join(out_dir, "bias.json"), study_json)
    plot(study_json["arms"], os.path.join(out_dir, "bias_differences.png"))
    if not FLAGS.quick:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stem = ("bias" if FLAGS.data == "headroom" else f"bias_{FLAGS.data}") + knob_suffix(knobs)
        for name, committed in (("bias.json", f"{stem}.json"), ("bias_differences.png", f"{stem}.png"),
                                ("report.md", f"{stem}_report.md")):
            shutil.copy(os.path.join(out_dir, name), os.path.join(RESULTS_DIR, committed))
    print(report)
    print(f"\n{runner.trained} runs trained in this invocation; {study_json['minutes']} min in all "
          f"(timings: {runner.timings_path})")
    print(json.dumps(study_json))


def _positive_numbers(values: list[str]) -> bool:
    try:
        return all(float(value) > 0 for value in values)
    except ValueError:
        return False


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 5)


def _format(value, digits: int) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _scientific(value) -> str:
    return "n/a" if value is None else f"{value:+.3g}"


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
