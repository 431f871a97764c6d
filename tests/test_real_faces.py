"""benchmarks.real_faces on a small folder of CelebA's layout (Celeb/ + identity_CelebA.txt) made here."""

import json
import os

import numpy as np
from PIL import Image

from mvcom_tf.data import schema, synthetic
from mvcom_tf.evaluation.verification import read_pairs
from tests.helpers import run_module


def celeba_like(root, people=8, photos=6):
    """Synthetic faces on grey canvases, CelebA-numbered, with the identity list (header line first)."""
    (root / "Celeb").mkdir(parents=True)
    lines, number = ["image identity"], 0
    for person in range(people):
        identity = synthetic.make_identity(3, person, person % 4)
        for photo in range(photos):
            rng = np.random.default_rng(100 * person + photo)
            face, _ = synthetic.render_face_with_landmarks(identity, float(rng.uniform(-10, 10)), 0, 0, 112, rng)
            canvas = np.full((218, 178, 3), 110, np.uint8)
            top, left = 40 + photo * 5, 25 + photo * 4
            canvas[top:top + 112, left:left + 112] = face
            number += 1
            Image.fromarray(canvas).save(root / "Celeb" / f"{number:06d}.jpg", quality=95)
            lines.append(f"{number:06d}.jpg {1000 + person}")
    lines.append("999999.jpg 1000")  # listed but not in Celeb/: left out
    (root / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")


def test_real_faces_benchmark_converts_pairs_scores_and_pairs_its_arms(tmp_path):
    celeba = tmp_path / "celeba"
    celeba_like(celeba)
    out = tmp_path / "out"
    result = run_module(["-m", "benchmarks.real_faces", f"--celeba={celeba}", f"--out_dir={out}", "--quick",
                         "--seeds=0,1", "--train_identities=5", "--min_group_pairs=1",
                         "--min_confidence=0.5"], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The identities split 5 / 3, every photo linked (not copied) and detected or counted as skipped.
    assert report["train"]["identities"] + report["test"]["identities"] <= 8
    assert os.path.islink(next((out / "photos" / "train").glob("*/*.jpg")))
    # Every same-identity pair of the test split, and as many different-identity pairs.
    pairs = read_pairs(str(out / "data" / "test" / "pairs.csv"))
    from mvcom_tf.data.tfrecord import iterate_records
    identities = np.array([r.identity for r in iterate_records(str(out / "data" / "test"))])
    counts = np.bincount(identities)
    assert report["pairs"]["same"] == int(np.sum(pairs["same"])) == int(np.sum(counts * (counts - 1) // 2))
    assert report["pairs"]["different"] == report["pairs"]["same"]
    # Shuffled, not all same pairs first: the 10-fold protocol takes its folds in file order.
    assert len(pairs["same"]) > 10 and np.any(np.diff(pairs["same"]) > 0)
    assert np.all((identities[pairs["index_a"]] == identities[pairs["index_b"]]) == pairs["same"].astype(bool))
    assert np.all(pairs["occlusion"] == -1) and np.all(pairs["pose"] >= 0)  # measured: pose and blur only
    # The paired difference is the mean of the per-seed differences of the two fine-tunings.
    runs = [json.load(open(out / f"seed{seed}" / "fine_tuning" / "metrics.json")) for seed in (0, 1)]
    diffs = [r["stages"]["meta"]["accuracy"] - r["stages"]["finetune"]["accuracy"] for r in runs]
    np.testing.assert_allclose(report["recipe_minus_cosface"]["accuracy_diff"], np.mean(diffs), atol=1e-9)
    assert 0.0 <= report["raw_pixels"]["accuracy"] <= 1.0 and set(report["stages"]) == {"pretrain", "finetune", "meta"}
    # The recipe is the fine-tuning's; the pre-training is plain CosFace, on the fused BatchNorm kernel.
    assert "--train_sampling=balanced" in open(out / "seed0" / "fine_tuning" / "flags.txt").read()
    pretrain_flags = open(out / "seed0" / "pretrain" / "flags.txt").read()
    assert "--train_sampling=balanced" not in pretrain_flags and "--fused_bn" in pretrain_flags
    assert report["stages"]["pretrain"]["per_seed"][0] == json.load(
        open(out / "seed0" / "pretrain" / "metrics.json"))["stages"]["pretrain"]["accuracy"]
    assert "raw pixels" in result.stdout and "recipe - CosFace fine-tuning" in result.stdout
    assert set(report["pairs_per_group"]) == {"pose", "blur"}
    assert sum(report["pairs_per_group"]["pose"].values()) == len(pairs["same"])
    assert all(name in schema.CLASS_NAMES["pose"] for name in report["pairs_per_group"]["pose"])
