"""Bad training files in fresh processes: a truncated shard ends the run with one line naming it (or is read past
with --skip_corrupt_records, the records lost counted), and a failed save ends with one line naming the folder and
the last good checkpoint, leaving no temporary folder behind."""

import json
import os
import shutil

import tensorflow as tf

from mvcom_tf.data.shard_checks import first_damage
from mvcom_tf.data.tfrecord import read_info, shard_paths
from tests.helpers import TINY, data_flags, run_module


def _truncated_copy(tiny_data, root):
    """tiny_data with its second training shard cut to 40% of its bytes (a partial copy); returns the shard."""
    shutil.copytree(tiny_data, root)
    info = read_info(str(root / "train"))
    shard = shard_paths(str(root / "train"), info)[1]
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:
        f.write(data[:int(len(data) * 0.4)])
    return shard, info


def test_a_truncated_shard_stops_the_run_naming_it_or_is_read_past_and_counted(tmp_path, tiny_data):
    shard, info = _truncated_copy(tiny_data, tmp_path / "data")
    damage = first_damage([shard], [info.shards[1]["num_images"]])
    assert damage.reason.startswith("truncated record at ") and 0 < damage.records_read < damage.records_expected
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tmp_path / "data"), "--eval_data=", "--epochs=2",
            "--checkpoint_every=4"]
    stopped = run_module([*args, f"--model_dir={tmp_path}/stopped"])
    assert stopped.returncode == 5, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("error: [pretrain] after step ")
    assert f"--train_data shard {shard}: truncated record at " in line
    assert f"record {damage.records_read + 1} of {damage.records_expected}" in line and "--skip_corrupt_records" in line
    step = int(line.split("after step ")[1].split(":")[0])
    saved = tf.train.latest_checkpoint(f"{tmp_path}/stopped/checkpoints/pretrain")
    assert saved.endswith(f"ckpt-{step}") and f"saved {saved}" in line  # what the run had is kept

    skipped = run_module([*args, f"--model_dir={tmp_path}/skipped", "--skip_corrupt_records"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    lost = damage.records_expected - damage.records_read
    counted = json.load(open(f"{tmp_path}/skipped/metrics.json"))["stages"]["pretrain"]["training"]["corrupt_records"]
    assert counted >= lost and counted % lost == 0  # each pass over the shard loses the same records
    assert "dropped: corrupt records" in skipped.stderr


def test_a_failed_save_ends_with_one_line_and_the_same_command_resumes(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--checkpoint_every=2",
            f"--model_dir={run_dir}"]
    first = run_module([*args, "--max_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    folder = run_dir / "checkpoints" / "pretrain"
    # A file where TensorFlow writes step 6's temporary folder: the save cannot create it (as root too).
    (folder / "ckpt-6_temp").write_text("in the way")
    failed = run_module([*args, "--max_steps=8"])
    assert failed.returncode == 6, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: [pretrain] could not save step 6 to {folder} (")
    assert f"the last good checkpoint is {folder}/ckpt-4" in line and "run the same command" in line
    assert not [name for name in os.listdir(folder) if "_temp" in name or name.startswith("ckpt-6")]
    assert tf.train.latest_checkpoint(str(folder)).endswith("ckpt-4")
    resumed = run_module([*args, "--max_steps=8"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and tf.train.latest_checkpoint(str(folder)).endswith("ckpt-8")
