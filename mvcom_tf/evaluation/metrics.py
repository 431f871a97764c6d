"""Verification metrics on similarity scores: ROC, TAR at FAR, and per-group bias figures."""

from __future__ import annotations

import numpy as np

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true accept rates of `score >= t` for every distinct score t (descending), plus t = +inf.

    Returns (far, tar, thresholds), far and tar non-decreasing from (0, 0).
    """
    scores, same = np.asarray(scores, np.float64), np.asarray(same, bool)
    positives, negatives = max(int(same.sum()), 1), max(int((~same).sum()), 1)
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], same[order]
    true_accepts, false_accepts = np.cumsum(sorted_same), np.cumsum(~sorted_same)
    # Pairs with equal scores are accepted together: keep the last index of each run of ties.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    far = np.r_[0.0, false_accepts[last] / negatives]
    tar = np.r_[0.0, true_accepts[last] / positives]
    return far, tar, np.r_[np.inf, sorted_scores[last]]


def tar_at_far(scores: np.ndarray, same: np.ndarray, fars=FARS) -> dict[str, float]:
    """The highest true accept rate among thresholds whose false accept rate is at most each target FAR."""
    far, tar, _ = roc_curve(scores, same)
    return {f"{target:.0e}": float(tar[far <= target].max()) for target in fars}


def skewed_error_ratio(accuracies) -> float:
    """max error / min error across groups (RFW's SER); inf when some group makes no error."""
    errors = 1.0 - np.asarray(list(accuracies), np.float64)
    return float(errors.max() / errors.min()) if errors.min() > 0 else float("inf")


def group_summary(accuracies: dict[str, float]) -> dict[str, float | str]:
    """Worst group, spread and skewed error ratio of per-group accuracies."""
    values = np.asarray(list(accuracies.values()), np.float64)
    worst = min(accuracies, key=accuracies.get)
    return {"worst_group": worst, "worst_accuracy": float(accuracies[worst]), "mean_accuracy": float(values.mean()),
            "group_std": float(values.std()), "skewed_error_ratio": skewed_error_ratio(values)}


# Student's t quantiles t(0.975, df) for df = 1..30 (two-sided 95% intervals); beyond 30, the normal's 1.96.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)


def paired_interval(differences) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided 95% t interval (mean, low, high); NaN where undefined.

    The differences are one per seed (an arm minus the baseline trained from the same pre-training
    on the same batches); the interval is mean +- t(0.975, n - 1) * sd / sqrt(n), sd with n - 1.
    """
    values = np.asarray(list(differences), np.float64)
    if len(values) == 0 or not np.all(np.isfinite(values)):
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    df = len(values) - 1
    half = (_T_975[df - 1] if df <= len(_T_975) else 1.96) * float(values.std(ddof=1)) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def result_difference(result: dict, baseline: dict) -> dict:
    """`result` minus `baseline` (two evaluations of one benchmark): accuracy, and per factor (synthetic kind)
    the worst group's accuracy, with both values."""
    difference = {"accuracy": {"value": result["accuracy"], "baseline": baseline["accuracy"],
                               "difference": result["accuracy"] - baseline["accuracy"]}}
    for factor, figures in result.get("factors", {}).items():
        value, base = figures["worst_accuracy"], baseline["factors"][factor]["worst_accuracy"]
        difference[f"{factor}_worst"] = {"value": value, "baseline": base, "difference": value - base}
    return difference


def paired_bootstrap(outcomes: np.ndarray, baseline: np.ndarray, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of outcomes - baseline (two models' per-pair results on the same pairs) and its 95% percentile interval
    from `resamples` draws of the pairs with replacement (fixed seed)."""
    outcomes, baseline = np.asarray(outcomes, np.float64), np.asarray(baseline, np.float64)
    if outcomes.ndim != 1 or outcomes.shape != baseline.shape or len(outcomes) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-d arrays, got {outcomes.shape} and "
                         f"{baseline.shape}")
    differences = outcomes - baseline
    rng = np.random.default_rng(seed)
    means = np.array([differences[rng.integers(0, len(differences), len(differences))].mean()
                      for _ in range(resamples)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)
