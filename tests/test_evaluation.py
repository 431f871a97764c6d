"""Evaluation protocols: 10-fold accuracy by hand, the safe .bin loader, LFW/RFW parsing, IJB aggregation."""

import json
import os
import pickle

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data import alignment
from mvcom_tf.data.tfrecord import DatasetError
from mvcom_tf.evaluation import formats, ijb, metrics, protocols
from mvcom_tf.evaluation.verification import best_threshold, kfold_accuracy


def test_tenfold_accuracy_worked_by_hand():
    # Fold k holds pairs 2k (positive) and 2k+1 (negative). Only fold 3's negative (0.65) and
    # fold 8's positive (0.60) overlap. Testing fold 3, the other nine separate at the midpoint
    # 0.475 of 0.35 and 0.60, which accepts 0.65: fold 3 scores 1/2. Testing fold 8, the midpoint
    # of 0.65 and 0.70 (0.675) rejects 0.60: 1/2. Every other fold: 0.475 (17/18 right on its
    # nine folds, tied with 0.675; ties take the lower) is right on both: 1. Mean 0.9, std 0.2.
    positives = [0.9, 0.8, 0.85, 0.7, 0.95, 0.75, 0.8, 0.9, 0.6, 0.88]
    negatives = [0.1, 0.2, 0.3, 0.65, 0.15, 0.25, 0.05, 0.35, 0.2, 0.1]
    scores = np.ravel(np.column_stack([positives, negatives]))
    same = np.tile([True, False], 10)
    result = kfold_accuracy(scores, same)
    assert result.accuracy == pytest.approx(0.9)
    assert result.std == pytest.approx(0.2)
    assert result.thresholds[3] == pytest.approx(0.475) and result.thresholds[8] == pytest.approx(0.675)
    assert result.thresholds[0] == pytest.approx(0.475)


def test_best_threshold_equals_trying_every_candidate_on_every_pair():
    """The cumulative count against the definition: each midpoint between distinct scores (and one below and one
    above them all) tried on every pair, the most accurate kept, ties to the lowest; scores rounded to force ties."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 200))
        same = rng.random(n) < rng.random()
        scores = np.round(rng.normal(size=n) + 2 * rng.random() * same, int(rng.integers(0, 3)))
        values = np.unique(scores)
        candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1.0]])
        accuracy = [np.mean((scores >= t) == same) for t in candidates]
        assert best_threshold(scores, same) == candidates[int(np.argmax(accuracy))]


def test_tar_at_far_equals_brute_force():
    rng = np.random.default_rng(0)
    same = rng.random(3000) < 0.3
    scores = np.round(np.where(same, rng.normal(0.6, 0.15, 3000), rng.normal(0.2, 0.15, 3000)), 2)  # ties
    figures = metrics.tar_at_far(scores, same, fars=(1e-3, 1e-2, 1e-1))
    for far_text, tar in figures.items():
        best = 0.0
        for threshold in np.unique(scores):
            accepted = scores >= threshold
            if np.mean(accepted[~same]) <= float(far_text):
                best = max(best, np.mean(accepted[same]))
        assert tar == pytest.approx(best)
    assert metrics.skewed_error_ratio([0.9, 0.95, 0.8]) == pytest.approx(0.2 / 0.05)


def _jpeg(value, size=8):
    return tf.io.encode_jpeg(np.full((size, size, 3), value, np.uint8)).numpy()


def test_bin_loader_reads_a_genuine_file_and_refuses_code(tmp_path):
    images = [_jpeg(v) for v in (10, 20, 30, 40)]
    genuine = tmp_path / "lfw.bin"
    genuine.write_bytes(pickle.dumps((images, [True, False]), protocol=pickle.HIGHEST_PROTOCOL))
    loaded, issame = formats.load_bin(str(genuine))
    assert loaded == images and issame.tolist() == [True, False]
    # insightface's newer files hold numpy arrays of bytes.
    as_arrays = tmp_path / "cfp_fp.bin"
    as_arrays.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in images], np.array([True, True]))))
    assert formats.load_bin(str(as_arrays))[0] == images

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    hostile = tmp_path / "agedb_30.bin"
    hostile.write_bytes(pickle.dumps(([Exploit()], [True])))
    with pytest.raises(DatasetError, match=r"agedb_30\.bin: refusing (posix|os)\.system"):
        formats.load_bin(str(hostile))
    assert not marker.exists()


def test_lfw_and_rfw_parsing_in_the_real_layout(tmp_path):
    (tmp_path / "pairs.txt").write_text("10\t300\nGeorge_W_Bush\t1\t1234\nAbel_Pacheco\t1\tJean_Chretien\t25\n")
    pairs = formats.read_lfw_pairs(str(tmp_path / "pairs.txt"), str(tmp_path))
    assert pairs.paths == [f"{tmp_path}/George_W_Bush/George_W_Bush_0001.jpg",
                           f"{tmp_path}/George_W_Bush/George_W_Bush_1234.jpg",
                           f"{tmp_path}/Abel_Pacheco/Abel_Pacheco_0001.jpg",
                           f"{tmp_path}/Jean_Chretien/Jean_Chretien_0025.jpg"]
    assert pairs.first.tolist() == [0, 2] and pairs.second.tolist() == [1, 3] and pairs.same.tolist() == [True, False]
    (tmp_path / "bad.txt").write_text("A_B\t1\n")
    with pytest.raises(DatasetError, match=r"bad\.txt line 1: expected 'name n1 n2'"):
        formats.read_lfw_pairs(str(tmp_path / "bad.txt"), str(tmp_path))

    txts = tmp_path / "RFW" / "test" / "txts" / "African"
    txts.mkdir(parents=True)
    (txts / "African_pairs.txt").write_text("m.0c7mh2\t3\t1012\nm.0c7mh2\t3\tm.0_zz_9\t2\n")
    (txts / "African_lmk.txt").write_text(
        "./test/data/African/m.0c7mh2/m.0c7mh2_0003.jpg\t7\t" + "\t".join(str(v) for v in range(10)) + "\n")
    pairs, landmarks = formats.read_rfw(str(tmp_path / "RFW"), "African")
    data = f"{tmp_path}/RFW/test/data/African"
    assert pairs.paths == [f"{data}/m.0c7mh2/m.0c7mh2_0003.jpg", f"{data}/m.0c7mh2/m.0c7mh2_1012.jpg",
                           f"{data}/m.0_zz_9/m.0_zz_9_0002.jpg"]
    np.testing.assert_array_equal(landmarks["m.0c7mh2_0003.jpg"], np.arange(10).reshape(5, 2))


def test_ijb_aggregation_and_tar_match_numpy(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "IJBC"
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    # 12 images; templates 1..4; template 1 has two media, one of them with two frames.
    templates = np.array([1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4])
    medias = np.array([10, 10, 11, 20, 21, 30, 30, 30, 40, 41, 41, 42])
    detector = rng.uniform(0.5, 1.0, 12)
    colours = rng.integers(20, 235, (12, 3))
    reference = alignment.ARCFACE_REFERENCE
    face_rows, point_rows = [], []
    for index in range(12):
        name = f"{index + 1}.jpg"
        (root / "loose_crop" / name).write_bytes(
            tf.io.encode_png(np.full((112, 112, 3), colours[index], np.uint8)).numpy())
        face_rows.append(f"{name} {templates[index]} {medias[index]}")
        point_rows.append(name + " " + " ".join(f"{v:.4f}" for v in reference.reshape(-1)) + f" {detector[index]:.6f}")
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(face_rows) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(point_rows) + "\n")
    pairs = np.array([[1, 2, 1], [1, 3, 0], [2, 4, 0], [3, 4, 1], [1, 4, 0], [2, 3, 1]])
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(" ".join(map(str, p)) for p in pairs))

    def embed(images):  # the mean colour as the "embedding" (a flat face is its own mirror image)
        return tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2])

    scored = protocols.run_ijb(embed, str(root), 112, batch_size=5)

    detector = np.round(detector, 6)
    features = colours / np.linalg.norm(colours, axis=1, keepdims=True) * detector[:, None]
    template_features = {}
    for template in (1, 2, 3, 4):
        media_means = [features[(templates == template) & (medias == media)].mean(axis=0)
                       for media in np.unique(medias[templates == template])]
        total = np.sum(media_means, axis=0)
        template_features[template] = total / np.linalg.norm(total)
    expected = np.array([template_features[a] @ template_features[b] for a, b, _ in pairs])
    ids, computed = ijb.template_features(features, templates, medias)
    np.testing.assert_allclose(ijb.pair_scores(ids, computed, pairs[:, :2]), expected, atol=1e-9)
    labels = pairs[:, 2] == 1
    for far_text, tar in scored.result["tar_at_far"].items():
        accepted = [expected >= t for t in np.unique(expected)]
        allowed = [np.mean(a[labels]) for a in accepted if np.mean(a[~labels]) <= float(far_text)]
        assert tar == pytest.approx(max(allowed, default=0.0), abs=1e-6)
    assert scored.result["num_templates"] == 4 and scored.result["protocol"] == "ijbc"


def test_compare_threshold_comes_from_the_models_own_evaluation(tmp_path):
    from mvcom_tf.evaluation.photos import model_threshold

    run = tmp_path / "run"
    run.mkdir()
    assert model_threshold(str(run)) is None  # then embed --compare asks for --threshold
    # A training run's evaluation after its last stage (--eval_data): metrics.json's benchmarks.
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "benchmarks": {
        "synthetic:test": {"accuracy": 0.9, "global_threshold": 0.31, "threshold": 0.33}}}))
    assert model_threshold(str(run)) == 0.31
    # mvcom_tf.evaluate's own results take precedence: the model was evaluated again since.
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"bin:lfw": {"accuracy": 0.99, "threshold": 0.27}}))
    assert model_threshold(str(run)) == 0.27


def test_progress_line_says_count_rate_and_eta():
    from mvcom_tf.progress_line import ProgressLine

    progress = ProgressLine("embed", 200)
    progress.start, progress.done = 0.0, 50
    assert progress.line(10.0) == "[embed] 50/200 images, 5.0 images/s, ETA 00:00:30"
    unknown = ProgressLine("detect", None, "photos")
    unknown.start, unknown.done = 0.0, 1234
    assert unknown.line(2.0) == "[detect] 1,234 photos, 617.0 photos/s"


def test_paired_bootstrap_matches_the_normal_approximation_on_many_pairs():
    from mvcom_tf.evaluation.metrics import paired_bootstrap

    rng = np.random.default_rng(3)
    baseline = rng.random(20_000) < 0.90
    outcomes = np.where(rng.random(20_000) < 0.05, ~baseline, baseline)  # 5% of the pairs flip
    mean, low, high = paired_bootstrap(outcomes, baseline, resamples=2000)
    differences = outcomes.astype(float) - baseline
    half = 1.96 * differences.std(ddof=1) / np.sqrt(len(differences))
    assert mean == pytest.approx(differences.mean())
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)
    assert paired_bootstrap(baseline, baseline) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="two equal-length 1-d arrays"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
