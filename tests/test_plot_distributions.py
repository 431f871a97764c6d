"""tools/plot_distributions.py: a PNG from dataset.json, and a clear error for a folder without one."""

import tensorflow as tf

from tests.helpers import run_module


def test_plot_distributions_writes_a_png(tiny_data, tmp_path):
    out = tmp_path / "train.png"
    result = run_module(["tools/plot_distributions.py", f"--data_dir={tiny_data / 'train'}", f"--out={out}"])
    assert result.returncode == 0, result.stderr
    picture = tf.io.decode_png(out.read_bytes())
    assert picture.shape[0] > 200 and picture.shape[1] > 4 * picture.shape[0]  # one row of 5 panels
    missing = run_module(["tools/plot_distributions.py", f"--data_dir={tmp_path}"])
    assert missing.returncode == 2 and f"{tmp_path}/dataset.json is missing" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_plot_margins_draws_the_learned_residuals(tiny_data, tmp_path):
    import json

    from tools.plot_margins import class_margins, example_faces

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    training = {"margin/pose/6": 0.012, "margin/pose/3": -0.001, "margin/ethnicity/0": 0.02, "loss": 3.0}
    (run_dir / "metrics.json").write_text(json.dumps({"stages": {"meta": {"training": training}}}))
    (run_dir / "flags.txt").write_text(f"--meta_data={tiny_data / 'meta'}\n")
    assert class_margins(str(run_dir)) == {"pose": {6: 0.012, 3: -0.001}, "ethnicity": {0: 0.02}}
    faces = example_faces(str(tiny_data / "meta"))
    assert sorted(faces["pose"]) == list(range(7)) and faces["pose"][0].shape == (32, 32, 3)
    result = run_module(["tools/plot_margins.py", f"--run_dir={run_dir}"])
    assert result.returncode == 0, result.stderr
    assert tf.io.decode_png((run_dir / "margins.png").read_bytes()).shape[0] > 300
    (run_dir / "metrics.json").write_text(json.dumps({"stages": {}}))
    failed = run_module(["tools/plot_margins.py", f"--run_dir={run_dir}"])
    assert failed.returncode == 2 and "has no meta-stage margins" in failed.stderr
