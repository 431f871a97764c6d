"""Does MvCoM's meta-gradient point toward the tail? The first meta update of the residuals, measured directly.

    python -m benchmarks.meta_signal --pretrained=runs/bias/seed0/pretrain [--objectives=variation,verification]
    python -m benchmarks.meta_signal --quick      # tiny data and network, pre-trained here (a few minutes)

From a pre-trained run folder (its flags.txt and checkpoints/pretrain), with the weights held
fixed and the run's --deterministic and --seed, each objective in a fresh process (one checkpoint,
the same figures every time): the variation heads are first trained alone on the meta set
(--variation_warmup_steps; Eq. 13 is only as informative as they are), then for each of --batches
training batches T, with a meta batch V drawn by the run's rule, the residual update of Eq. 13
from r = 0 with tau = 1 and no clipping: u^k_j = -dL_meta^k(V; Omega~)/dr^k_j (tau and the
pseudo-update's eta scale u and cancel in a correlation). Per factor k, and for the summed update
against "tail in any factor": the mean of u over the samples in a tail class (any class but the
factor's most frequent in the training split) and over those in the most frequent class, each with
its standard error over batches, and the correlation of u with tail membership within a batch, averaged over batches
with its 95% t interval. Seed Sec. E claims learned margins are larger for tail classes: that is
a positive correlation here.

Beside it, the room any margin has: with CosFace on fixed features a sample's margin changes only its
target logit, so its whole gradient is (1 - p_y) times a direction the margin does not change
(dL/dcos_y = -s (1 - p_y), dL/dcos_j = s p_j, and p_j / (1 - p_y) does not depend on the margin): a
per-sample margin is a per-sample weight in [0, 1]. The mean of 1 - p_y at the prior margin over tail and
head samples (tail_weight, head_weight) says how far a margin can raise a sample's share: to 1 at most.

Last line printed: one JSON object {"objectives": {objective: {factor or "any": {"corr",
"corr_ci", "tail_mean", "head_mean", ...}}}, ...}; a full run also writes it to
benchmarks/results/meta_signal.json.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "meta_signal.json")
OBJECTIVES = ("variation", "verification")
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("pretrained", "", "Pre-trained run folder (flags.txt, checkpoints/pretrain); required "
                        "unless --quick.")
    flags.DEFINE_string("train_data", "", "Training split; empty: the run's --train_data.")
    flags.DEFINE_string("meta_data", "", "Meta split; empty: the run's --meta_data.")
    flags.DEFINE_list("objectives", list(OBJECTIVES), "Meta objectives to probe (--meta_objective values).")
    flags.DEFINE_enum("meta_scope", "output_block", ["output_block", "all", "head"],
                      "What the pseudo update changes (--meta_scope; head is output_block's old name).")
    flags.DEFINE_enum("meta_sampling", "hard", ["hard", "random"], "Meta batch rule (--meta_sampling).")
    flags.DEFINE_integer("batches", 200, "Training batches probed per objective.", lower_bound=2)
    flags.DEFINE_integer("variation_warmup_steps", 300, "Steps training the variation heads alone before probing.",
                         lower_bound=0)
    flags.DEFINE_string("out_dir", "runs/meta_signal", "--quick: where its data and pre-training go.")
    flags.DEFINE_bool("quick", False, "Tiny headroom data and network, pre-trained here; 20 batches.")


def probe(pretrained: str, objective: str, batches: int, warmup_steps: int, overrides: list[str]) -> dict:
    """Per-sample first residual updates u [N, factors] with the samples' labels, from `pretrained`; sets the
    run's pin, so it needs a process where TensorFlow has run no op yet (probe_in_fresh_process gives one)."""
    import tensorflow as tf

    from mvcom_tf.config_flags import config_of_run
    from mvcom_tf.data import schema
    from mvcom_tf.data.pipeline import DecodeFailures
    from mvcom_tf.stages.build import build_stage
    from mvcom_tf.training import runtime
    from mvcom_tf.training.checkpoints import initialise, stage_folder
    from mvcom_tf.training.distribute import InputOptions, distributed_batches

    config = config_of_run(pretrained, "--stage=meta", f"--meta_objective={objective}", "--meta_lr_tau=1",
                           "--residual_max=1e30", "--strategy=default", "--cpu_replicas=0", "--eval_data=",
                           *overrides)
    # The run's --deterministic pin and seed, as its training had them: without the pin Eq. 13's figures moved in
    # their second digit from one probe of the same checkpoint to the next.
    runtime.configure(config.runtime)
    strategy = tf.distribute.get_strategy()
    stage = build_stage(config, "meta", strategy)
    initialise(stage, stage_folder(pretrained, "pretrain"))
    meta_step = stage.meta_step
    options = InputOptions(config.model.image_size, config.data.shuffle_buffer)
    steps = range(0, warmup_steps + batches)
    train, pool = (distributed_batches(strategy, spec, options, steps, stage.steps_per_epoch, DecodeFailures())
                   for spec in stage.inputs())

    @tf.function
    def heads_step(batch, meta_pool):
        return meta_step.variation_warmup(batch, meta_pool)

    @tf.function
    def first_update(batch, meta_pool):
        step = meta_step.margin_step
        prior = step.margins(batch)
        meta_batch = meta_step.select(batch, meta_pool)
        residuals, recorded = meta_step.residuals(batch, meta_batch, prior, meta_step.trunk_features(meta_batch))
        _, per_sample, _ = step.batch_loss(recorded.embeddings, batch, prior)
        return residuals, 1.0 - tf.exp(-per_sample)  # 1 - p_y at the prior margin

    for _ in range(warmup_steps):
        heads_step(next(train), next(pool))
    updates, weights, labels, batch_index = [], [], [], []
    for index in range(batches):
        batch = next(train)
        update, weight = first_update(batch, next(pool))
        updates.append(update.numpy())
        weights.append(weight.numpy())
        labels.append(np.stack([batch[factor].numpy() for factor in schema.FACTORS], axis=1))
        batch_index.append(np.full(len(updates[-1]), index))
    return {"updates": np.concatenate(updates), "weights": np.concatenate(weights), "labels": np.concatenate(labels),
            "batch": np.concatenate(batch_index), "head_classes": meta_step.head_classes}


def probe_in_fresh_process(pretrained: str, objective: str, batches: int, warmup_steps: int,
                            overrides: list[str]) -> dict:
    """summarise(probe(...)) in a new Python process: the pin can only be set before TensorFlow runs its first op
    (the caller may have rendered data or evaluated), and no probe then depends on what ran before it."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_probe_and_summarise, (pretrained, objective, batches, warmup_steps, overrides))


def _probe_and_summarise(*args) -> dict:
    return summarise(probe(*args))


def tail_statistics(updates: np.ndarray, tail: np.ndarray, known: np.ndarray, batch: np.ndarray,
                    weights: np.ndarray | None = None) -> dict:
    """Mean update of tail and head samples (SE over batches) and their within-batch correlation with tail
    membership, averaged over the batches where both kinds occur, with its 95% t interval; with `weights`
    (1 - p_y), their mean over tail and over head samples."""
    from mvcom_tf.evaluation.metrics import paired_interval

    correlations, tail_means, head_means = [], [], []
    for index in np.unique(batch):
        rows = (batch == index) & known
        u, t = updates[rows], tail[rows]
        if t.any():
            tail_means.append(u[t].mean())
        if (~t).any():
            head_means.append(u[~t].mean())
        if t.any() and (~t).any() and u.std() > 0:
            correlations.append(np.corrcoef(u, t.astype(np.float64))[0, 1])
    corr, low, high = paired_interval(correlations)
    low, high = max(low, -1.0), min(high, 1.0)  # a t interval over a few batches can pass a correlation's bounds

    def mean_se(values):
        values = np.asarray(values, np.float64)
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        return _number(values.mean() if len(values) else float("nan")), _number(se)

    tail_mean, tail_se = mean_se(tail_means)
    head_mean, head_se = mean_se(head_means)
    figures = {"corr": _number(corr), "corr_ci": [_number(low), _number(high)], "tail_mean": tail_mean,
               "tail_se": tail_se, "head_mean": head_mean, "head_se": head_se, "batches": len(correlations),
               "tail_samples": int((tail & known).sum()), "head_samples": int((~tail & known).sum())}
    if weights is not None:
        for key, rows in (("tail_weight", tail & known), ("head_weight", ~tail & known)):
            figures[key] = _number(weights[rows].mean() if rows.any() else float("nan"))
    return figures


def summarise(probed: dict) -> dict:
    """tail_statistics per factor, and for the summed update against tail membership in any factor."""
    from mvcom_tf.data import schema

    updates, labels, batch = probed["updates"], probed["labels"], probed["batch"]
    known = labels >= 0
    tail = known & (labels != np.array([probed["head_classes"][factor] for factor in schema.FACTORS]))
    weights = probed.get("weights")
    figures = {factor: tail_statistics(updates[:, k], tail[:, k], known[:, k], batch, weights)
               for k, factor in enumerate(schema.FACTORS)}
    figures["any"] = tail_statistics(updates.sum(axis=1), tail.any(axis=1), np.ones(len(batch), bool), batch,
                                     weights)
    return figures


def table(result: dict) -> str:
    """The figures as a readable table, one row per objective and factor."""
    lines = [f"{'objective':<13} {'factor':<10} {'corr':>8} {'95% CI':>20} {'tail mean (SE)':>24} "
             f"{'head mean (SE)':>24} {'batches':>8} {'1-p_y tail':>11} {'1-p_y head':>11}"]
    for objective, factors in result["objectives"].items():
        for factor, f in factors.items():
            interval = "[" + ", ".join(_format(v, "+.3f") for v in f["corr_ci"]) + "]"
            lines.append(f"{objective:<13} {factor:<10} {_format(f['corr'], '+.3f'):>8} {interval:>20} "
                         f"{_format(f['tail_mean'], '+.3e') + ' (' + _format(f['tail_se'], '.1e') + ')':>24} "
                         f"{_format(f['head_mean'], '+.3e') + ' (' + _format(f['head_se'], '.1e') + ')':>24} "
                         f"{f['batches']:>8} {_format(f.get('tail_weight'), '.3f'):>11} "
                         f"{_format(f.get('head_weight'), '.3f'):>11}")
    return "\n".join(lines)


def quick_pretrained(out_dir: str) -> str:
    """--quick: tiny headroom data and a tiny pre-training in out_dir; returns the run folder."""
    from benchmarks.bias.data import QUICK_TRAIN_FLAGS, splits
    from mvcom_tf.data import synthetic
    from mvcom_tf.data.tfrecord import DatasetError, read_info

    data = os.path.join(out_dir, "data")
    for split, config in splits("headroom", quick=True).items():
        if split in ("train", "meta"):
            try:
                read_info(os.path.join(data, split))
            except DatasetError:
                synthetic.write_split(os.path.join(data, split), split, config)
    run = os.path.join(out_dir, "pretrain")
    if not os.path.exists(os.path.join(run, "metrics.json")):
        subprocess.run([sys.executable, "-m", "mvcom_tf.train", *QUICK_TRAIN_FLAGS, f"--train_data={data}/train",
                        f"--meta_data={data}/meta", f"--model_dir={run}", "--stage=pretrain", "--eval_data="],
                       cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": REPO})
    return run


def main(argv) -> None:
    del argv
    if not FLAGS.pretrained and not FLAGS.quick:
        raise app.UsageError("--pretrained: name a pre-trained run folder (or use --quick)")
    unknown = set(FLAGS.objectives) - set(OBJECTIVES)
    if unknown:
        raise app.UsageError(f"--objectives: unknown {sorted(unknown)}; expected some of {', '.join(OBJECTIVES)}")
    started = time.perf_counter()
    pretrained = FLAGS.pretrained or quick_pretrained(FLAGS.out_dir)
    batches = 20 if FLAGS.quick and not FLAGS["batches"].present else FLAGS.batches
    warmup_steps = (20 if FLAGS.quick and not FLAGS["variation_warmup_steps"].present
                    else FLAGS.variation_warmup_steps)
    overrides = [f"--meta_scope={FLAGS.meta_scope}", f"--meta_sampling={FLAGS.meta_sampling}"]
    overrides += [f"--{name}={FLAGS[name].value}" for name in ("train_data", "meta_data") if FLAGS[name].value]
    result = {"objectives": {}}
    for objective in FLAGS.objectives:
        print(f"probing {objective}: {warmup_steps} variation warm-up steps, {batches} batches", file=sys.stderr,
              flush=True)
        result["objectives"][objective] = probe_in_fresh_process(pretrained, objective, batches, warmup_steps,
                                                                 overrides)
    from mvcom_tf.config_flags import config_of_run

    config = config_of_run(pretrained, *overrides)
    result.update({
        "pretrained": pretrained, "train_data": config.data.train_data, "meta_data": config.data.meta_data,
        "meta_scope": FLAGS.meta_scope, "meta_sampling": FLAGS.meta_sampling, "batches": batches,
        "variation_warmup_steps": warmup_steps, "batch_size": config.optimizer.batch_size,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "command": "python -m benchmarks.meta_signal " + " ".join(arg for arg in sys.argv[1:]),
        "date": datetime.date.today().isoformat()})
    if not FLAGS.quick:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result))
    print(json.dumps(result))


def _number(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(f"{float(value):.6g}")


def _format(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
    define_flags()
    app.run(main)
