"""The training command end to end, in fresh processes: bad flags, kill and resume, the demo, the SavedModel."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO, TINY, data_flags, final_weights, run_module


@pytest.mark.parametrize("flag,expected", [
    ("--backbone=iresnet99", "flag --backbone=iresnet99"),
    ("--image_size=40", "--image_size must be divisible by 16"),
    ("--stage=pretrain,warmup", "--stage must list some of pretrain, finetune, meta"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(tmp_path, flag, expected):
    result = run_module(["-m", "mvcom_tf.train", flag, f"--model_dir={tmp_path}/run"])
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_data_folders_exit_with_a_message_naming_the_path(tmp_path, tiny_data):
    result = run_module(["-m", "mvcom_tf.train", *TINY, f"--train_data={tmp_path}/missing",
                         f"--model_dir={tmp_path}/run"])
    assert result.returncode == 2
    assert f"error: --train_data: dataset folder {tmp_path}/missing does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    other = tmp_path / "v2"
    other.mkdir()
    for item in (tiny_data / "train").iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    info = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**info, "schema_version": 2}))
    result = run_module(["-m", "mvcom_tf.train", *TINY, f"--train_data={other}", f"--model_dir={tmp_path}/run"])
    assert result.returncode == 2
    assert f"--train_data: {other}/dataset.json has schema_version 2" in result.stderr.strip().splitlines()[-1]


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, tiny_data):
    """Also: --noexport writes no SavedModel, and the same command with --export exports the finished run."""
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--max_steps=12",
            "--checkpoint_every=3", "--epochs=3"]
    straight = run_module([*args, f"--model_dir={tmp_path}/straight", "--noexport"])
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "metrics.json; no SavedModel (--noexport)" in straight.stderr
    assert (tmp_path / "straight" / "metrics.json").exists() and not (tmp_path / "straight" / "export").exists()

    interrupted = f"{tmp_path}/interrupted"
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen([sys.executable, *args, f"--model_dir={interrupted}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(f"{interrupted}/checkpoints/pretrain/ckpt-6.index") and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(f"{interrupted}/checkpoints/pretrain/ckpt-12.index")
    resumed = run_module([*args, f"--model_dir={interrupted}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    a, b = final_weights(f"{tmp_path}/straight", 12), final_weights(interrupted, 12)
    assert a.keys() == b.keys() and len(a) > 50
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    exported = run_module([*args, f"--model_dir={tmp_path}/straight", "--export"])
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"resumed from {tmp_path}/straight/checkpoints/pretrain/ckpt-12 at step 12" in exported.stderr
    assert f"SavedModel in {tmp_path}/straight/export" in exported.stderr
    assert (tmp_path / "straight" / "export" / "saved_model.pb").exists()


LOAD_SAVED_MODEL = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    serving = model.signatures["serving_default"]
    spec = serving.structured_input_signature[1]["images"]
    outputs = serving.structured_outputs["embedding"]
    images = np.load(sys.argv[2])
    embedding = serving(images=tf.constant(images))["embedding"].numpy()
    np.save(sys.argv[3], embedding)
    assert not any(name.startswith("mvcom_tf") for name in sys.modules)
    print(spec.dtype.name, spec.shape.as_list(), outputs.dtype.name, outputs.shape.as_list())
""")


def test_saved_model_loads_without_mvcom_tf_and_matches(tmp_path):
    from mvcom_tf.export import embedding_fn, export_saved_model
    from mvcom_tf.models.iresnet import build_iresnet

    tf.keras.utils.set_random_seed(4)
    backbone = build_iresnet("iresnet18", 32, 16, width_multiplier=0.125)
    # Non-trivial BatchNorm statistics, so that inference mode is checked too.
    for variable in backbone.non_trainable_variables:
        variable.assign(np.random.default_rng(1).uniform(0.5, 1.5, variable.shape).astype(np.float32))
    export_saved_model(backbone, str(tmp_path / "export"), 32)
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = tmp_path / "load.py"
    script.write_text(LOAD_SAVED_MODEL)
    result = run_module([str(script), str(tmp_path / "export"), str(tmp_path / "images.npy"),
                         str(tmp_path / "out.npy")], cwd=str(tmp_path), env={"PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["uint8", "[None,", "32,", "32,", "3]", "float32", "[None,", "16]"]
    expected = embedding_fn(backbone)(tf.constant(images)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


def test_eval_every_logs_verification_during_the_stage(tmp_path, tiny_data):
    """Also: --export_tflite and --export_onnx write their files beside the SavedModel."""
    run_dir = tmp_path / "run"
    result = run_module(["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--max_steps=6", "--epochs=3",
                         "--eval_every=3", f"--eval_data=synthetic:{tiny_data}/test", f"--model_dir={run_dir}",
                         "--export", "--export_tflite", "--export_onnx"])
    assert result.returncode == 0, result.stderr[-2000:]
    steps = {}
    for path in tf.io.gfile.glob(f"{run_dir}/tensorboard/pretrain/events.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                steps.setdefault(value.tag, set()).add(event.step)
    assert steps["eval/synthetic:test/accuracy"] == {3, 6}
    assert steps["eval/accuracy"] == {3, 6} and 6 in steps["eval/ethnicity/0"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["benchmarks"]["synthetic:test"]["accuracy"] == metrics["accuracy"]
    assert "step 3: synthetic:test accuracy" in result.stderr
    for name, suffix in (("tflite", "tflite"), ("onnx", "onnx")):
        assert metrics[name] == {variant: f"{run_dir}/export_{name}/embedding_{variant}.{suffix}"
                                 for variant in ("float", "int8")}
        assert all((run_dir / f"export_{name}" / f"embedding_{variant}.{suffix}").stat().st_size > 10_000
                   for variant in ("float", "int8"))
    bad = run_module(["-m", "mvcom_tf.train", "--eval_data=lfw:x.bin", f"--model_dir={tmp_path}/bad"])
    assert bad.returncode != 0 and "--eval_data entries must be <kind>:<path>" in bad.stderr


def _trainable_weights(run_dir, stage):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(f"{run_dir}/checkpoints/{stage}"))
    names = sorted(name for name in reader.get_variable_to_shape_map()
                   if name.startswith(("backbone/", "head/")) and "moving" not in name)
    return np.concatenate([reader.get_tensor(name).ravel().astype(np.float64) for name in names])


def test_xla_and_bfloat16_steps_follow_the_plain_float32_step(tmp_path, tiny_data):
    """One pre-training step and one meta step: the weight updates of the XLA and bfloat16 runs point where the
    plain float32 run's do (a pre-training at --lr=0 gives the initial weights). The meta step pseudo-updates the
    output block: tracing and compiling the whole network's second-order pass three times would take minutes
    here (test_meta.py compiles that pass with XLA in process)."""
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--max_steps=1",
            "--stage=pretrain,meta", "--variation_warmup_steps=0", "--weight_decay=0", "--meta_scope=output_block"]
    runs = {"initial": ["--lr=0", "--stage=pretrain"], "plain": [], "xla": ["--jit_compile"],
            "bf16": ["--mixed_precision=bfloat16"]}
    # Two runs at a time: tracing and XLA compilation, most of each run here, use one core.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(runs, pool.map(lambda item: run_module([*args, *item[1], f"--model_dir={tmp_path}/{item[0]}"]),
                                          runs.items())))
    weights = {}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-2000:])
        weights[name] = _trainable_weights(f"{tmp_path}/{name}", "pretrain" if name == "initial" else "meta")
    update = weights["plain"] - weights["initial"]
    assert np.linalg.norm(update) > 1e-3
    for name, least in (("xla", 0.999), ("bf16", 0.98)):
        other = weights[name] - weights["initial"]
        cosine = update @ other / (np.linalg.norm(update) * np.linalg.norm(other))
        assert cosine > least, (name, cosine)
    refused = run_module(["-m", "mvcom_tf.train", "--mixed_precision=float16", "--stage=pretrain,meta",
                          f"--model_dir={tmp_path}/fp16"])
    assert refused.returncode != 0 and "--mixed_precision=float16 trains the pretrain stage only" in refused.stderr
