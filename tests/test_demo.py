"""The demo recipe, shortened: it learns, writes the whole run folder, fine-tunes with the recommended recipe (balanced
resampling) credited against its CosFace control, and its run folder answers embed --compare and evaluate."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_module
from mvcom_tf.data import schema, synthetic


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    configs = {
        "train": synthetic.SplitConfig(num_identities=150, image_size=32, seed=11),
        "meta": synthetic.SplitConfig(num_identities=40, image_size=32, seed=11, meta_images=8),
        "test": synthetic.SplitConfig(num_identities=64, image_size=32, seed=11),
    }
    for split, config in configs.items():
        synthetic.write_split(str(root / split), split, config, num_shards=2)
    run_dir = root / "run"
    result = run_module(["-m", "mvcom_tf.train", "--flagfile=flags/demo.cfg", f"--train_data={root}/train",
                         f"--meta_data={root}/meta", f"--eval_data={root}/test", f"--model_dir={run_dir}",
                         "--epochs=6", "--lr_steps=4,5", "--meta_epochs=1", "--variation_warmup_steps=10",
                         "--log_every=10"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def scalar_tags(folder):
    tags = set()
    for name in tf.io.gfile.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_demo_learns_and_writes_the_run_folder(demo_run):
    run_dir, result = demo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.75
    for factor in schema.FACTORS:
        assert sorted(metrics["groups"][factor]) == [str(c) for c in range(schema.NUM_CLASSES[factor])]
    assert set(metrics["stages"]) == {"pretrain", "finetune", "meta"}
    for stage in ("pretrain", "finetune", "meta"):
        assert tf.train.latest_checkpoint(str(run_dir / "checkpoints" / stage))
    assert (run_dir / "export" / "saved_model.pb").exists()
    assert "--backbone=iresnet18" in (run_dir / "flags.txt").read_text()
    assert {"loss", "lr", "accuracy", "images_per_s", "steps_per_s", "margin/mean", "eval/accuracy",
            "eval/pose/6", "data/train_data"} <= scalar_tags(run_dir / "tensorboard" / "pretrain")
    meta_tags = scalar_tags(run_dir / "tensorboard" / "meta")
    assert {"data/train_data", "data/meta_data", "margin/pose/6", "margin/ethnicity/0", "variation/blur/accuracy", "variation/occlusion/loss",
            "residual/pose/std", "residual/blur", "margin/final", "margins/faces"} <= meta_tags
    assert "images/s" in result.stderr and "ETA" in result.stderr


def test_the_recipe_is_credited_only_with_its_difference_from_a_cosface_fine_tuning(demo_run):
    run_dir, result = demo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = metrics["stages"]
    difference = metrics["meta_minus_finetune"]
    assert difference["accuracy"]["difference"] == pytest.approx(stages["meta"]["accuracy"]
                                                                  - stages["finetune"]["accuracy"])
    for factor in schema.FACTORS:
        assert difference[f"{factor}_worst"]["baseline"] == stages["finetune"]["factors"][factor]["worst_accuracy"]
    # Both fine-tunings start from the pre-training (not one from the other), for the same number of steps.
    assert result.stderr.count(f"initialised backbone and identity head from {run_dir}/checkpoints/pretrain") == 2
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "finetune")).endswith(
        tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "meta")).rsplit("-", 1)[1])
    # The recipe's stream is balanced, the control's natural. Balanced is the mixture "draw one of the 4 factors, then
    # one of its K classes": with factors drawn independently a class of K has share 1 / (4 K) + 3/4 p(class).
    def shares(stage, factor):
        counts = [stages[stage]["training"][f"margin_count/{factor}/{c}"] for c in range(schema.NUM_CLASSES[factor])]
        return np.array(counts) / sum(counts)

    for factor in ("pose", "occlusion", "blur"):
        natural, balanced = shares("finetune", factor), shares("meta", factor)
        np.testing.assert_allclose(balanced, 1 / (4 * len(natural)) + 0.75 * natural, atol=0.03, err_msg=factor)
        # The rarest class gains at least half the mixture's expected rise (the tolerance above allows less).
        rarest = np.argmin(natural)
        expected = 1 / (4 * len(natural)) + 0.75 * natural[rarest]
        assert balanced[rarest] - natural[rarest] > 0.5 * (expected - natural[rarest]), (factor, natural, balanced)
    for factor in schema.FACTORS:  # nothing meta-learned: a constant margin for both
        assert stages["finetune"]["training"][f"residual/{factor}/std"] == 0.0
        assert stages["meta"]["training"][f"residual/{factor}/std"] == 0.0
    # The paired interval: per-pair outcomes of both stages on the same test pairs, resampled together.
    from mvcom_tf.files import read_array
    outcomes = {name: read_array(stages[name]["pair_outcomes"]) for name in ("meta", "finetune")}
    accuracy = difference["accuracy"]
    assert accuracy["pairs"] == len(outcomes["meta"]) == len(outcomes["finetune"])
    assert accuracy["pair_mean"] == pytest.approx(outcomes["meta"].mean() - outcomes["finetune"].mean())
    assert accuracy["interval"][0] <= accuracy["pair_mean"] <= accuracy["interval"][1]
    assert re.search(r"meta stage against CosFace fine-tuning \(same start, batches and length\), accuracy: "
                     r"[\d.]+ - [\d.]+ = [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] \(95%, paired bootstrap over the \d+ test "
                     r"pairs: (not )?beyond noise\)", result.stderr)


def test_evaluate_reproduces_the_training_accuracy_from_the_saved_model(demo_run, tmp_path):
    """`python -m mvcom_tf.evaluate` on the exported SavedModel, in its own process, scores what training did."""
    run_dir, _ = demo_run
    test_data = json.loads((run_dir / "metrics.json").read_text())
    data_dir = [line.split("=", 1)[1] for line in (run_dir / "flags.txt").read_text().splitlines()
                if line.startswith("--eval_data=")][0]
    result = run_module(["-m", "mvcom_tf.evaluate", f"--model={run_dir}", f"--benchmark=synthetic:{data_dir}",
                         f"--output_dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((tmp_path / "results.json").read_text())["synthetic:test"]
    assert abs(scored["accuracy"] - test_data["accuracy"]) <= 1.0 / scored["num_pairs"] + 1e-9
    for factor, groups in test_data["groups"].items():  # a pair or two may flip in the smallest groups
        assert scored["groups"][factor] == pytest.approx(groups, abs=2.0 / 128), factor
    ethnicity = scored["factors"]["ethnicity"]
    worst = min(ethnicity["global_threshold"].values())
    assert ethnicity["worst_accuracy"] == worst
    assert ethnicity["skewed_error_ratio"] == pytest.approx((1 - worst) / (1 - max(ethnicity["global_threshold"].values())))
    assert (tmp_path / "roc_synthetic_test.png").exists()
    assert "| synthetic:test |" in result.stdout
    # The progress line of the embedding, in the training log's form; its last one has every image done.
    assert re.search(r"\[embed\] ([\d,]+)/\1 images, [\d.]+ images/s, ETA \d\d:\d\d:\d\d", result.stderr)

    missing = run_module(["-m", "mvcom_tf.evaluate", f"--model={tmp_path}", f"--benchmark=synthetic:{data_dir}"])
    assert missing.returncode == 2 and "holds a saved_model.pb" in missing.stderr
    unknown = run_module(["-m", "mvcom_tf.evaluate", f"--model={run_dir}", "--benchmark=megaface:x"])
    assert unknown.returncode != 0 and "unknown benchmark kind 'megaface'" in unknown.stderr


def test_embed_compares_two_photos_at_the_runs_own_threshold(demo_run, tmp_path):
    """A newcomer's first command after the demo: no --threshold needed, the run's evaluation gives it."""
    from mvcom_tf.data.tfrecord import iterate_records

    run_dir, _ = demo_run
    data_dir = [line.split("=", 1)[1] for line in (run_dir / "flags.txt").read_text().splitlines()
                if line.startswith("--eval_data=")][0]
    anchor, probe = list(iterate_records(data_dir))[:2]  # identity 0: a clean anchor and a clean probe
    assert anchor.identity == probe.identity
    (tmp_path / "a.png").write_bytes(anchor.image)
    (tmp_path / "b.png").write_bytes(probe.image)
    result = run_module(["-m", "mvcom_tf.embed", f"--model={run_dir}", "--compare", str(tmp_path / "a.png"),
                         str(tmp_path / "b.png")])
    assert result.returncode == 0, result.stderr[-2000:]
    threshold = json.loads((run_dir / "metrics.json").read_text())["benchmarks"]["synthetic:test"]["global_threshold"]
    assert f"(threshold {threshold:.4f})" in result.stdout
