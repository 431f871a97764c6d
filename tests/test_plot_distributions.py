"""tools/plot_distributions.py: a PNG from dataset.json, and a clear error for a folder without one."""

import tensorflow as tf

from tests.conftest import run_module


def test_plot_distributions_writes_a_png(tiny_data, tmp_path):
    out = tmp_path / "train.png"
    result = run_module(["tools/plot_distributions.py", f"--data_dir={tiny_data / 'train'}", f"--out={out}"])
    assert result.returncode == 0, result.stderr
    picture = tf.io.decode_png(out.read_bytes())
    assert picture.shape[0] > 200 and picture.shape[1] > 4 * picture.shape[0]  # one row of 5 panels
    missing = run_module(["tools/plot_distributions.py", f"--data_dir={tmp_path}"])
    assert missing.returncode == 2 and f"{tmp_path}/dataset.json is missing" in missing.stderr
    assert "Traceback" not in missing.stderr
