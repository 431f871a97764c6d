"""The study's report: paired differences on test with 95% t intervals, the mechanism figures, markdown and a plot."""

from __future__ import annotations

import os

import numpy as np

from benchmarks.bias.arms import STACK_PREFIX, Arm
from benchmarks.bias.runner import Runner, read_json
from mvcom_tf.data import schema, synthetic
from mvcom_tf.evaluation.metrics import paired_interval

MEASURES = ("worst_accuracy", "skewed_error_ratio", "group_std")
SHORT = {"worst_accuracy": "worst", "skewed_error_ratio": "ser", "group_std": "std"}


def paired_report(results: dict[str, list[dict]], against: str = "cosface") -> dict:
    """Per arm against `against` (the same seeds): mean paired difference over seeds and its 95% t interval, for
    accuracy and per factor the worst group's accuracy, the skewed error ratio and the std across groups."""
    baseline = results[against]
    report = {}
    for arm, rows in results.items():
        if arm == against:
            continue
        mean, low, high = paired_interval([r["accuracy"] - b["accuracy"] for r, b in zip(rows, baseline)])
        entry = {"accuracy_diff": number(mean), "accuracy_ci": [number(low), number(high)]}
        for factor in schema.FACTORS:
            entry[factor] = {}
            for measure in MEASURES:
                mean, low, high = paired_interval([r["factors"][factor][measure] - b["factors"][factor][measure]
                                                   for r, b in zip(rows, baseline)])
                entry[factor][f"{SHORT[measure]}_diff"] = number(mean)
                entry[factor][f"{SHORT[measure]}_ci"] = [number(low), number(high)]
        report[arm] = entry
    return report


def stacked_minus_resample(results: dict[str, list[dict]]) -> dict:
    """Each stacked arm against balanced resampling alone (the target's "beats resampling alone"), where both ran."""
    stacked = {arm: rows for arm, rows in results.items() if arm.startswith(STACK_PREFIX)}
    if "resample" not in results or not stacked:
        return {}
    return paired_report({"resample": results["resample"], **stacked}, against="resample")


def baseline_means(rows: list[dict]) -> dict:
    """CosFace's test figures, mean over seeds."""
    return {"accuracy": number(np.mean([r["accuracy"] for r in rows])),
            **{factor: {SHORT[m]: number(np.mean([r["factors"][factor][m] for r in rows])) for m in MEASURES}
               for factor in schema.FACTORS}}


def mechanism(runner: Runner, seeds: list[str], arm: Arm) -> dict:
    """What the meta stage learned, from the runs' metrics.json: per class of each factor the mean residual
    (margins) or mean loss weight (weights), mean over seeds with the standard error across seeds, and their
    correlation with tail membership."""
    trainings = [read_json(os.path.join(runner.folder(seed, arm.name), "metrics.json"), None)
                 ["stages"]["meta"]["training"] for seed in seeds]

    def over_seeds(key: str) -> dict | None:
        values = [t[key] for t in trainings if key in t and np.isfinite(t[key])]
        if not values:
            return None
        spread = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        return {"mean": float(np.mean(values)), "se": number(spread)}

    figures = {}
    for name, tail in (("residual", "tail"), ("weight", "weight_tail")):
        key = "margin" if name == "residual" else name
        classes = {factor: {cls_name: over_seeds(f"{key}/{factor}/{cls}")
                            for cls, cls_name in enumerate(schema.CLASS_NAMES[factor])} for factor in schema.FACTORS}
        # A weights-only arm's residuals are all 0, a margins-only arm has no weights: neither is reported.
        if any(v and v["mean"] != 0 for factor in classes.values() for v in factor.values()):
            figures[f"{name}_per_class"] = classes
            figures[f"{tail}_correlation_per_factor"] = {factor: over_seeds(f"{tail}/{factor}/correlation")
                                                         for factor in schema.FACTORS}
            figures[f"{tail}_correlation_summed"] = over_seeds(f"{tail}/correlation")
    return figures


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
    figure, axes = plt.subplots(3, 3, figsize=(14, 4 + 0.45 * len(arms) * 3))
    for axis, (factor, measure, title) in zip(axes.flat, panels):
        entry = [report[arm] if measure is None else report[arm][factor] for arm in arms]
        key = "accuracy" if measure is None else measure
        means = np.array([np.nan if e[f"{key}_diff"] is None else e[f"{key}_diff"] for e in entry], float)
        bounds = np.array([[np.nan if v is None else v for v in e[f"{key}_ci"]] for e in entry], float)
        errors = np.abs(bounds.T - means)
        axis.errorbar(means, np.arange(len(arms)), xerr=errors, fmt="o", capsize=4)
        axis.axvline(0.0, color="grey", linewidth=1)
        axis.set_yticks(np.arange(len(arms)), arms, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.invert_yaxis()
    figure.suptitle("Paired difference against CosFace over seeds (mean, 95% t interval); test split")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def markdown_selection(selection: list[dict]) -> str:
    """The val table of the selection: per run, its val accuracy, its val score and each factor's worst group."""
    lines = ["## Selection on val (mean over selection seeds)", "",
             "| step | run | val accuracy | val score (mean worst group) | " + " | ".join(
                 f"{factor} worst" for factor in schema.FACTORS) + " |", "|---|---|---|---|" + "---|" * len(schema.FACTORS)]
    lines += [f"| {r['step']} | {r['run']} | {r['val_accuracy']:.4f} | {r['val_score']:.4f} | " + " | ".join(
        f"{r['worst'][factor]:.4f}" for factor in schema.FACTORS) + " |" for r in selection]
    return "\n".join(lines)


def cell(diff, interval, digits: int) -> str:
    """A paired difference with its interval, or n/a."""
    if diff is None:
        return "n/a"
    low, high = (f"{v:+.{digits}f}" if v is not None else "n/a" for v in interval)
    return f"{diff:+.{digits}f} [{low}, {high}]"


def accuracy_and_worst_cells(entry: dict) -> list[str]:
    """A paired entry's accuracy cell, then each factor's worst-group cell."""
    return [cell(entry["accuracy_diff"], entry["accuracy_ci"], 4),
            *(cell(entry[factor]["worst_diff"], entry[factor]["worst_ci"], 4) for factor in schema.FACTORS)]


def markdown(study_json: dict, selection: list[dict]) -> str:
    """The report: the val table of the selection, the test differences with costs, the mechanism figures."""
    lines = [markdown_selection(selection)]
    lines += ["", f"Kept: {', '.join(f'{arm}: {name}' for arm, name in study_json['runs'].items())}", "",
              f"## Test: paired difference against cosface over {len(study_json['seeds'])} seeds, mean [95% CI]", ""]
    header = ["arm", "reads", "minutes", "accuracy"] + [f"{factor} worst" for factor in schema.FACTORS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, entry in study_json["arms"].items():
        minutes = entry.get("minutes")
        cells = [arm + (" (committed)" if entry.get("committed") else ""), entry.get("reads", ""),
                 "n/a" if minutes is None else f"{minutes:.1f}", *accuracy_and_worst_cells(entry)]
        lines.append("| " + " | ".join(cells) + " |")
    check = study_json.get("committed_baseline_check")
    if check:
        lines += ["", f"(committed): cosface accuracy {fmt(check['committed_cosface_accuracy'], 5)} in the committed "
                      f"study, {fmt(check['cosface_accuracy'], 5)} here: {check['note']}."]
    lines += ["", "Skewed error ratio and std across groups, same pairing:", "",
              "| arm | " + " | ".join(f"{factor} SER / std" for factor in schema.FACTORS) + " |",
              "|---|" + "---|" * len(schema.FACTORS)]
    for arm, entry in study_json["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(
            cell(entry[f]["ser_diff"], entry[f]["ser_ci"], 2) + " / " + cell(entry[f]["std_diff"], entry[f]["std_ci"], 4)
            for f in schema.FACTORS) + " |")
    versus = {arm: entry["minus_resample"] for arm, entry in study_json["arms"].items() if "minus_resample" in entry}
    if versus:
        lines += ["", "Stacked arms against resampling alone (same seeds), mean [95% CI]:", "",
                  "| arm | accuracy | " + " | ".join(f"{factor} worst" for factor in schema.FACTORS) + " |",
                  "|---|---|" + "---|" * len(schema.FACTORS)]
        lines += ["| " + " | ".join([f"{arm} - resample", *accuracy_and_worst_cells(entry)]) + " |"
                  for arm, entry in versus.items()]
    baseline = study_json["cosface"]
    lines += ["", f"Baseline (cosface) on test, mean over seeds: accuracy {fmt(baseline['accuracy'], 4)}; "
              + "; ".join(f"{factor} worst {fmt(baseline[factor]['worst'], 4)}, SER "
                          f"{fmt(baseline[factor]['ser'], 2)}" for factor in schema.FACTORS)]
    for arm, figures in study_json["mechanism"].items():
        for name, tail in (("residual", "tail"), ("weight", "weight_tail")):
            if f"{name}_per_class" not in figures:
                continue
            lines += ["", f"## Mechanism ({arm}): mean {name} per class over the meta stage, mean (SE) over seeds", ""]
            for factor in schema.FACTORS:
                classes = figures[f"{name}_per_class"][factor]
                values = ", ".join(f"{cls} {v['mean']:+.4f} ({fmt(v['se'], 4)})" for cls, v in classes.items() if v)
                corr = figures[f"{tail}_correlation_per_factor"][factor]
                lines.append(f"- {factor}: {values}; correlation with tail membership "
                             f"{fmt(corr and corr['mean'], 3)} ({fmt(corr and corr['se'], 3)})")
            summed = figures[f"{tail}_correlation_summed"]
            lines.append(f"- summed over factors vs tail in any factor: correlation "
                         f"{fmt(summed and summed['mean'], 3)} ({fmt(summed and summed['se'], 3)})")
    for arm, figures in study_json.get("meta_signal", {}).items():
        lines += ["", f"## Meta signal ({arm}, seed {study_json['seeds'][0]}'s pre-training): first residual update "
                      "against tail membership, mean over batches [95% CI]", ""]
        for factor, f in figures.items():
            low, high = (fmt(v, 3) for v in f["corr_ci"])
            lines.append(f"- {factor}: correlation {fmt(f['corr'], 3)} [{low}, {high}] over {f['batches']} "
                         f"batches; mean update of tail samples {scientific(f['tail_mean'])}, head "
                         f"{scientific(f['head_mean'])}")
    return "\n".join(lines)


def number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 5)


def fmt(value, digits: int) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def scientific(value) -> str:
    return "n/a" if value is None else f"{value:+.3g}"
