"""The bias study: val/test pair splits, the oracle's margins, the mechanism figures, paired intervals, the study."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_module
from mvcom_tf.data import schema, synthetic
from mvcom_tf.data.tfrecord import iterate_records
from mvcom_tf.evaluation.metrics import paired_interval
from mvcom_tf.evaluation.verification import read_pairs
from mvcom_tf.losses.margins import head_classes, tail_class_offsets
from mvcom_tf.meta.statistics import class_residual_summary, correlation, residual_sums, tail_sums
from mvcom_tf.margin_step import MarginStep


def test_two_anchor_val_split_pairs_every_probe_with_both_anchors(tmp_path):
    config = synthetic.SplitConfig(num_identities=12, pair_anchors=2, seed=4)
    synthetic.write_split(str(tmp_path / "val"), "val", config, num_shards=1)
    synthetic.write_split(str(tmp_path / "test"), "test", config, num_shards=1)
    records = list(iterate_records(str(tmp_path / "val")))
    assert len(records) == 12 * 16 == 12 * synthetic.images_per_identity(config)  # 2 anchors, 14 probes
    val_ids = {r.source.split(":")[3] for r in records}
    test_ids = {r.source.split(":")[3] for r in iterate_records(str(tmp_path / "test"))}
    assert len(val_ids) == 12 and not val_ids & test_ids
    pairs = read_pairs(str(tmp_path / "val" / "pairs.csv"))
    # Every class (the head class by the clean probe): 12 identities x 2 anchors x (positive + negative).
    for factor in ("pose", "occlusion", "blur"):
        counts = collections.Counter(pairs[factor][pairs[factor] >= 0])
        assert set(counts.values()) == {48}, (factor, counts)
    assert collections.Counter(pairs["ethnicity"]) == {group: 3 * 14 * 4 for group in range(4)}
    anchors_of_probe = collections.defaultdict(set)
    for a, b, same, *_, ethnicity in zip(*pairs.values()):
        ra, rb = records[a], records[b]
        assert a % 16 in (0, 1) and (ra.pose, ra.occlusion, ra.blur) == (3, 0, 0)
        assert (ra.identity == rb.identity) == bool(same) and ra.ethnicity == rb.ethnicity == ethnicity
        if same:
            anchors_of_probe[b].add(a)
    assert all(len(anchors) == 2 for anchors in anchors_of_probe.values()) and len(anchors_of_probe) == 12 * 14


def test_oracle_margins_add_delta_outside_each_head_class():
    histograms = {"pose": [1, 2, 3, 50, 3, 2, 1], "occlusion": [40, 1, 1, 1, 1], "blur": [30, 5, 2, 1],
                  "ethnicity": [5, 5, 30, 5]}
    assert head_classes(histograms) == {"pose": 3, "occlusion": 0, "blur": 0, "ethnicity": 2}
    offsets = tail_class_offsets(histograms, {"pose": 0.1, "occlusion": 0.2, "blur": 0.0, "ethnicity": 0.05})
    assert set(offsets) == {"pose", "occlusion", "ethnicity"}  # a zero delta adds nothing
    np.testing.assert_allclose(offsets["pose"], [0.1, 0.1, 0.1, 0.0, 0.1, 0.1, 0.1])
    step = MarginStep(None, None, None, tf.constant([0.35, 0.30]), 4,
                      factor_offsets={k: tf.constant(v) for k, v in offsets.items()})
    batch = {"identity": tf.constant([0, 1, 0, 1]), "pose": tf.constant([3, 0, -1, 6]),
             "occlusion": tf.constant([0, 2, 4, -1]), "blur": tf.constant([3, 3, 3, 3]),
             "ethnicity": tf.constant([2, 2, 0, -1])}
    # Sample by sample: identity margin + pose + occlusion (+ blur 0) + ethnicity; unknown (-1) adds 0.
    expected = [0.35, 0.30 + 0.1 + 0.2, 0.35 + 0.2 + 0.05, 0.30 + 0.1]
    np.testing.assert_allclose(step.margins(batch).numpy(), expected, rtol=1e-6)


def test_residual_summaries_match_numpy():
    rng = np.random.default_rng(0)
    size = 200
    batch = {factor: rng.integers(-1, schema.NUM_CLASSES[factor], size) for factor in schema.FACTORS}
    batch["identity"] = np.zeros(size, np.int32)
    residuals = rng.normal(0.0, 0.05, (size, 4)) + 0.03 * (batch["pose"] != 3)[:, None]
    sums = tf.nest.map_structure(np.asarray, residual_sums(tf.constant(residuals), batch))
    heads = {"pose": 3, "occlusion": 0, "blur": 0, "ethnicity": 2}
    tail_totals = tf.nest.map_structure(np.asarray, tail_sums(tf.constant(residuals), batch, heads))
    for index, factor in enumerate(schema.FACTORS):
        summary = class_residual_summary(factor, sums, heads[factor])
        labels, values = batch[factor], residuals[:, index]
        for cls in range(schema.NUM_CLASSES[factor]):
            members = values[labels == cls]
            np.testing.assert_allclose(summary[f"margin/{factor}/{cls}"], members.mean(), rtol=1e-9)
            np.testing.assert_allclose(summary[f"margin_se/{factor}/{cls}"],
                                       members.std(ddof=1) / np.sqrt(len(members)), rtol=1e-6)
            assert summary[f"margin_count/{factor}/{cls}"] == len(members)
        known = labels >= 0
        expected = np.corrcoef(values[known], (labels[known] != heads[factor]).astype(float))[0, 1]
        np.testing.assert_allclose(summary[f"tail/{factor}/correlation"], expected, rtol=1e-9)
    tail = np.zeros(size, bool)
    for factor in schema.FACTORS:
        tail |= (batch[factor] >= 0) & (batch[factor] != heads[factor])
    expected = np.corrcoef(residuals.sum(axis=1), tail.astype(float))[0, 1]
    got = correlation(*tail_totals)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert np.isnan(correlation(3, 1.0, 1.0, 3, 1.0))  # a constant indicator has no correlation


def test_headroom_search_knobs_set_each_tail_share_and_scale_the_pretraining_schedule(tmp_path):
    from benchmarks.bias.data import FULL, QUICK, pretrain_schedule, splits

    # The default is the data of the finished study (benchmarks/results/bias.json made_by).
    assert synthetic.headroom_train_probs() == {"pose_probs": (0.0025, 0.0025, 0.0025, 0.985, 0.0025, 0.0025, 0.0025),
                                                "occlusion_probs": (0.99, 0.0025, 0.0025, 0.0025, 0.0025),
                                                "blur_probs": (0.9925, 0.0025, 0.0025, 0.0025)}
    assert splits("headroom", quick=False)["train"].occlusion_probs[1] == FULL.tail_fraction == 0.0025
    assert splits("headroom", quick=True)["train"].occlusion_probs[1] == QUICK.tail_fraction == 0.01
    assert pretrain_schedule(FULL.pretrain_epochs) == ["--epochs=10", "--lr_steps=5,7,8"]
    config = synthetic.headroom_config(synthetic.SplitConfig(num_identities=40, min_images=20, max_images=60), "train",
                                       tail_fraction=0.05)
    assert config.pose_probs == (0.05, 0.05, 0.05, 0.7, 0.05, 0.05, 0.05) and config.blur_probs[0] == 0.85
    assert synthetic.headroom_config(config, "val", tail_fraction=0.05).pose_probs == config.pose_probs
    synthetic.write_split(str(tmp_path / "train"), "train", config, num_shards=1)
    records = list(iterate_records(str(tmp_path / "train")))
    shares = collections.Counter(r.occlusion for r in records)
    for cls in range(1, 5):  # binomial: 3.5 standard deviations either side
        assert abs(shares[cls] / len(records) - 0.05) < 3.5 * np.sqrt(0.05 * 0.95 / len(records)), (cls, shares)
    with pytest.raises(ValueError, match="tail_fraction 0.2 leaves no head class among 7 classes"):
        synthetic.headroom_train_probs(0.2)
    assert pretrain_schedule(30) == []  # flags/bias_study.cfg's own schedule
    assert pretrain_schedule(10) == ["--epochs=10", "--lr_steps=5,7,8"]  # 14, 20, 23 of 30
    assert pretrain_schedule(3) == ["--epochs=3", "--lr_steps=1,2"]
    assert pretrain_schedule(None) == []  # --quick: its train flags' own schedule


def test_paired_interval_by_hand():
    # mean 0.03, sd 0.0158114 (n - 1), se 0.00707107, t(0.975, 4) = 2.776: half-width 0.0196293.
    mean, low, high = paired_interval([0.01, 0.02, 0.03, 0.04, 0.05])
    np.testing.assert_allclose([mean, low, high], [0.03, 0.0103707, 0.0496293], atol=1e-7)
    assert np.isnan(paired_interval([0.1])[1]) and np.isnan(paired_interval([0.1, np.inf])[0])


def test_stacked_arms_are_also_paired_against_resampling_alone():
    from benchmarks.bias.report import stacked_minus_resample

    def rows(accuracies):
        return [{"accuracy": a, "factors": {f: {"worst_accuracy": a - 0.1, "skewed_error_ratio": 1.0, "group_std": 0.0}
                                             for f in schema.FACTORS}} for a in accuracies]

    results = {"cosface": rows([0.80, 0.80, 0.80]), "resample": rows([0.90, 0.91, 0.92]),
               "jtt": rows([0.85, 0.85, 0.85]), "resample+jtt": rows([0.91, 0.93, 0.92])}
    versus = stacked_minus_resample(results)
    # Differences 0.01, 0.02, 0: mean 0.01, sd 0.01, t(0.975, 2) = 4.3027 x 0.0057735 = 0.0248414.
    assert list(versus) == ["resample+jtt"]
    np.testing.assert_allclose([versus["resample+jtt"]["accuracy_diff"], *versus["resample+jtt"]["accuracy_ci"]],
                               [0.01, -0.01484, 0.03484], atol=1e-5)
    assert versus["resample+jtt"]["pose"]["worst_diff"] == pytest.approx(0.01)
    assert stacked_minus_resample({"cosface": results["cosface"], "resample+jtt": results["resample+jtt"]}) == {}


def test_quick_study_reports_paired_intervals_and_resumes(tmp_path):
    out_dir = tmp_path / "bias"
    # Four arms beside cosface, for time: learned margins (whose runs feed the mechanism and probe figures), learned
    # weights, GroupDRO (state in the checkpoint) and the stacked arm (the other arms differ by their flags:
    # test_study_arms_pass_their_settings_to_the_stage_builder).
    arms = ("mvcom_verification", "mvcom_weights_verification", "groupdro", "resample+best")
    first = run_module(["-m", "benchmarks.bias", "--quick", f"--out_dir={out_dir}", f"--arms={','.join(arms)}"],
                       timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["seeds"] == [0, 1] and report["minutes"] > 0 and report["data"] == "headroom"
    assert report["made_by"]["train"]["occluder_opacity"] == synthetic.HEADROOM_STYLE["occluder_opacity"]
    # resample+best: the label-free arm (of the two MvCoM arms) with the better val score, on balanced resampling.
    stacked = [arm for arm in report["arms"] if arm.startswith("resample+")]
    assert len(stacked) == 1 and stacked[0].removeprefix("resample+") in arms
    best = max((row for row in report["selection"] if row["step"] in ("mvcom_verification", "mvcom_weights_verification")),
               key=lambda row: row["val_score"])
    assert best["step"] == stacked[0].removeprefix("resample+")
    assert set(report["arms"]) == {*arms[:3], *stacked} and set(report["runs"]) == {"cosface", *arms[:3], *stacked}
    for arm, entry in report["arms"].items():
        assert set(entry) == {"accuracy_diff", "accuracy_ci", "minutes", "reads", *schema.FACTORS}, arm
        assert entry["minutes"] > 0 and entry["reads"] == ("none" if arm.startswith("mvcom") else "tail labels")
        for factor in schema.FACTORS:
            assert set(entry[factor]) == {f"{m}_{k}" for m in ("worst", "ser", "std") for k in ("diff", "ci")}
    assert set(report["mechanism"]["mvcom_weights_verification"]) == {
        "weight_per_class", "weight_tail_correlation_per_factor", "weight_tail_correlation_summed"}
    entry = report["arms"]["mvcom_verification"]
    # The interval recomputed from the test scores on disk: two seeds, t(0.975, 1) = 12.706.
    runs = report["runs"]
    scores = {arm: [json.load(open(out_dir / f"seed{s}" / runs[arm] / "test" / "results.json"))["synthetic:test"]
                    for s in (0, 1)] for arm in ("cosface", "mvcom_verification")}
    diffs = np.array([o["factors"]["occlusion"]["worst_accuracy"] - c["factors"]["occlusion"]["worst_accuracy"]
                      for o, c in zip(scores["mvcom_verification"], scores["cosface"])])
    half = 12.706 * diffs.std(ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(entry["occlusion"]["worst_diff"], diffs.mean(), atol=1e-5)
    np.testing.assert_allclose(entry["occlusion"]["worst_ci"], [diffs.mean() - half, diffs.mean() + half], atol=1e-5)
    pairs = read_pairs(str(out_dir / "data" / "test" / "pairs.csv"))
    assert report["min_pairs_per_group"] == min(int(np.sum(pairs[f] == c)) for f in schema.FACTORS
                                                for c in range(schema.NUM_CLASSES[f]))
    assert set(report["meta_signal"]) == {"mvcom_verification"}
    assert "mvcom_verification" in report["mechanism"] and "mvcom_weights_verification" in report["mechanism"]
    assert "tail_correlation_summed" in report["mechanism"]["mvcom_verification"]
    assert set(report["meta_signal"]["mvcom_verification"]) == {*schema.FACTORS, "any"}
    assert {"corr", "corr_ci", "tail_mean", "head_mean"} <= set(report["meta_signal"]["mvcom_verification"]["any"])
    assert "--meta_objective=verification" in open(out_dir / "seed0" / runs["mvcom_verification"] / "flags.txt").read()
    assert report["command"].endswith(f"--quick --arms={','.join(arms)}")
    assert (out_dir / "bias_differences.png").stat().st_size > 10_000
    # A killed study resumes: only the run without metrics.json trains again.
    kept = out_dir / "seed1" / runs["mvcom_verification"] / "metrics.json"
    removed = out_dir / "seed1" / runs["cosface"] / "metrics.json"  # the quicker run to train again
    kept_time = os.path.getmtime(kept)
    os.remove(removed)
    second = run_module(["-m", "benchmarks.bias", "--quick", f"--out_dir={out_dir}", f"--arms={','.join(arms)}"],
                        timeout=1500)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 runs trained in this invocation" in second.stdout
    assert removed.exists() and os.path.getmtime(kept) == kept_time
    assert json.loads(second.stdout.strip().splitlines()[-1])["arms"] == report["arms"]


def test_the_committed_report_renders_the_committed_results_file():
    """benchmarks/results/bias_report.md is report.markdown of bias.json, the kept arms' baseline check included."""
    from benchmarks.bias import report
    from tests.helpers import REPO

    results = os.path.join(REPO, "benchmarks", "results")
    with open(os.path.join(results, "bias.json")) as f:
        study = json.load(f)
    with open(os.path.join(results, "bias_report.md")) as f:
        assert report.markdown(study, study["selection"]) + "\n" == f.read()
    check = study["committed_baseline_check"]
    assert check["cosface_accuracy"] == study["cosface"]["accuracy"]
    assert check["same_pairing"] == (check["committed_cosface_accuracy"] == check["cosface_accuracy"]
                                     and check["committed_seeds"] == study["seeds"])


def test_study_arms_pass_their_settings_to_the_stage_builder():
    from benchmarks.bias.arms import Arm, grid_arms
    from mvcom_tf.config_flags import parse_config
    from mvcom_tf.stages.build import control_config, oracle_offsets, pretrain_config

    def config(arm):
        return parse_config(["--train_data=x", *arm.flags("runs/seed0/pretrain")])

    histograms = {"pose": [1, 2, 3, 50, 3, 2, 1], "occlusion": [40, 1, 1, 1, 1], "blur": [30, 5, 2, 1],
                  "ethnicity": [5, 5, 30, 5]}
    oracle = config(Arm("oracle", 7, delta=0.2))
    assert oracle.meta.oracle_margin_deltas == (0.2,) * 4 and oracle.head.margin_prior == "constant"
    assert oracle.meta.tau == 0.0 and oracle.schedule("meta").epochs == 7
    offsets = oracle_offsets(oracle.meta, histograms)
    np.testing.assert_allclose(offsets["occlusion"].numpy(), [0.0, 0.2, 0.2, 0.2, 0.2])
    assert oracle_offsets(control_config(oracle).meta, histograms) == {}  # the CosFace control: none
    head = config(Arm("oracle_head", 7, delta=0.1))
    np.testing.assert_allclose(oracle_offsets(head.meta, histograms)["blur"].numpy(), [-0.1, 0.0, 0.0, 0.0])
    resample = config(Arm("resample", 7))
    assert resample.data.train_sampling == "balanced" and resample.meta.oracle_margin_deltas == (0.0,) * 4
    prior = config(Arm("prior", 7))
    assert prior.head.margin_prior == "volume" and prior.meta.tau == 0.0
    mvcom = config(Arm("mvcom_variation", 7, tau=1e4, scope="output_block"))
    assert (mvcom.meta.objective, mvcom.meta.tau, mvcom.meta.scope, mvcom.meta.sampling, mvcom.meta.target) == (
        "variation", 1e4, "output_block", "hard", "margins")
    weights = config(Arm("mvcom_weights_verification", 7, mix=0.5))
    assert (weights.meta.target, weights.meta.weight_mix, weights.meta.objective, weights.head.margin_prior) == (
        "weights", 0.5, "verification", "constant")
    both = config(Arm("mvcom_both_verification", 7, tau=1e4, mix=0.5))
    assert (both.meta.target, both.meta.tau, both.head.margin_prior) == ("both", 1e4, "volume")
    jtt = config(Arm("jtt", 7, upweight=20))
    assert (jtt.weighting.loss_weighting, jtt.weighting.error_set, jtt.weighting.error_set_upweight) == (
        "error_set", "runs/seed0/pretrain/error_set.txt", 20.0)
    dro = config(Arm("groupdro", 7, step_size=0.1))
    assert (dro.weighting.loss_weighting, dro.weighting.groupdro_step_size) == ("groupdro", 0.1)
    assert config(Arm("loss_weight", 7)).weighting.loss_weighting == "balanced"
    stacked = config(Arm("resample+jtt", 7, upweight=5))
    assert stacked.data.train_sampling == "balanced" and stacked.weighting.loss_weighting == "error_set"
    both_jtt = config(Arm("resample+mvcom_both_jtt_verification", 7, tau=1e4, mix=1.0, upweight=20))
    assert (both_jtt.meta.target, both_jtt.meta.weight_mix, both_jtt.weighting.loss_weighting,
            both_jtt.weighting.error_set_upweight, both_jtt.data.train_sampling) == (
        "both", 1.0, "error_set", 20.0, "balanced")
    # The CosFace control of any arm: plain CosFace, natural stream, no weights; the pre-training too.
    for control in (control_config(both_jtt), pretrain_config(both_jtt)):
        assert (control.data.train_sampling, control.weighting.loss_weighting) == ("natural", "none")
    assert control_config(both_jtt).meta.target == "margins"
    assert Arm("oracle", 7, delta=0.2).name == "oracle-delta0.2-e7"
    assert Arm("mvcom_variation", 7, tau=1e4).name == "mvcom_variation-tau10000-output_block-e7"
    assert Arm("resample+jtt", 7, upweight=5).name == "resample+jtt-upweight5-e7"
    assert [arm.name for arm in grid_arms("mvcom_both_verification", 7, {"tau": (1e4, 1e5), "mix": (0.5,),
                                                                         "pose_weight": (1.0, 4.0), "power": (1.0,)},
                                          "output_block")] == [
        "mvcom_both_verification-tau10000-mix0.5-output_block-e7",  # pose weight 1: the name it had before the knob
        "mvcom_both_verification-tau10000-mix0.5-pose_weight4-output_block-e7",
        "mvcom_both_verification-tau100000-mix0.5-output_block-e7",
        "mvcom_both_verification-tau100000-mix0.5-pose_weight4-output_block-e7"]
    sharp = config(Arm("mvcom_both_verification", 7, tau=1e4, mix=0.5, pose_weight=4, power=2))
    assert (sharp.meta.factor_weights, sharp.meta.weight_power) == ((4.0, 1.0, 1.0, 1.0), 2.0)
    assert Arm("mvcom_both_verification", 7, tau=1e4, mix=0.5, power=2).name == (
        "mvcom_both_verification-tau10000-mix0.5-power2-output_block-e7")
    refused = run_module(["-m", "benchmarks.bias", "--oracle_deltas=0.5,0"])
    assert refused.returncode == 1 and "--oracle_deltas must be numbers above 0" in refused.stderr


def test_quick_meta_signal_probe_reports_tail_correlations_the_same_whatever_ran_before(tmp_path):
    probe = ["-m", "benchmarks.meta_signal", "--quick", f"--out_dir={tmp_path}", "--batches=6",
             "--variation_warmup_steps=4"]
    result = run_module([*probe, "--objectives=verification,variation"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["objectives"]) == {"variation", "verification"} and report["batches"] == 6
    for figures in report["objectives"].values():
        assert set(figures) == {*schema.FACTORS, "any"}
        for entry in figures.values():
            assert {"corr", "corr_ci", "tail_mean", "head_mean", "tail_se", "head_se", "head_weight"} <= set(entry)
            assert all(0 < entry[key] < 1 for key in ("tail_weight", "head_weight") if entry.get(key) is not None)
            if entry["corr"] is not None and entry["batches"] > 1:
                low, high = entry["corr_ci"]
                assert -1 <= low <= entry["corr"] <= high <= 1
    assert "corr" in result.stdout.splitlines()[0]  # the readable table comes before the JSON
    # Each objective is probed in a fresh process with the run's --deterministic pin and seed: Eq. 13's figures
    # after the verification probe equal those of a command that probes Eq. 13 alone.
    alone = run_module([*probe, "--objectives=variation"], timeout=900)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert json.loads(alone.stdout.strip().splitlines()[-1])["objectives"]["variation"] == \
        report["objectives"]["variation"]


def test_probe_statistics_match_numpy():
    from benchmarks.meta_signal import tail_statistics

    rng = np.random.default_rng(1)
    batch = np.repeat(np.arange(6), 20)
    tail = rng.random(120) < 0.3
    updates = rng.normal(size=120) + 0.5 * tail
    figures = tail_statistics(updates, tail, np.ones(120, bool), batch)
    per_batch = [np.corrcoef(updates[batch == b], tail[batch == b].astype(float))[0, 1] for b in range(6)]
    mean, low, high = paired_interval(per_batch)
    np.testing.assert_allclose([figures["corr"], *figures["corr_ci"]], [mean, low, high], rtol=1e-5)
    tail_means = [updates[(batch == b) & tail].mean() for b in range(6)]
    np.testing.assert_allclose(figures["tail_mean"], np.mean(tail_means), rtol=1e-5)
    np.testing.assert_allclose(figures["tail_se"], np.std(tail_means, ddof=1) / np.sqrt(6), rtol=1e-5)
    assert figures["batches"] == 6 and figures["tail_samples"] == int(tail.sum())
    # Two batches correlated +1 and -1: the t interval (t = 12.7) is clipped to a correlation's range.
    flipped = np.where(batch[:40] == 0, 1.0, -1.0) * tail[:40] + 1e-3 * rng.normal(size=40)
    assert tail_statistics(flipped, tail[:40], np.ones(40, bool), batch[:40])["corr_ci"] == [-1.0, 1.0]
    weights = rng.uniform(0, 1, 120)
    known = rng.random(120) < 0.9
    figures = tail_statistics(updates, tail, known, batch, weights)
    np.testing.assert_allclose([figures["tail_weight"], figures["head_weight"]],
                               [weights[tail & known].mean(), weights[~tail & known].mean()], rtol=1e-5)


def test_a_study_ended_by_sigterm_stops_its_trainings(tiny_data, tmp_path):
    """The study's trainings run in child processes from worker threads: SIGTERM to the study (pkill, a batch
    system) must stop them too, each saving its checkpoint, instead of leaving them writing to its run folders."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO, TINY, data_flags

    folder = tmp_path / "run"
    train_flags = [*TINY, *data_flags(tiny_data), "--epochs=1000", "--checkpoint_every=100000"]
    script = ("import threading\n"
              "from benchmarks import training_run\n"
              "training_run.stop_trainings_with_this_process()\n"
              f"worker = threading.Thread(target=training_run.train_run, args=({train_flags!r}, {str(folder)!r}))\n"
              "worker.start()\nworker.join()\n")
    study = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    try:
        deadline, training = time.monotonic() + 240, None
        while time.monotonic() < deadline and study.poll() is None:
            children = subprocess.run(["pgrep", "-P", str(study.pid)], capture_output=True, text=True).stdout.split()
            log = (folder / "train.log").read_text() if (folder / "train.log").exists() else ""
            if children and "[pretrain] step" in log:
                training = int(children[0])
                break
            time.sleep(0.5)
        assert training is not None, "the training never logged a step"
        study.send_signal(signal.SIGTERM)
        assert study.wait(timeout=120) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and os.path.exists(f"/proc/{training}"):
            time.sleep(0.5)
        assert not os.path.exists(f"/proc/{training}"), "the training outlived the study"
        assert "SIGTERM: saved" in (folder / "train.log").read_text()
    finally:
        study.kill()
