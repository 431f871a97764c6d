"""Fault drills in fresh processes: SIGKILL at random steps, SIGTERM (one and two replicas), a NaN batch (stop and
skip), and stage ends that move on."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

from tests.helpers import REPO, TINY, data_flags, final_weights, kill_during_a_save, run_module


def _start(args, env=None):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
                                            **(env or {})})


def _wait_for(path, process, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, "the run ended before the signal could be sent"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_three_kills_at_random_steps_and_one_during_a_save_end_with_the_weights_of_an_uninterrupted_run(
        tmp_path, tiny_data):
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--max_steps=14",
            "--checkpoint_every=1", "--keep_checkpoints=2", "--epochs=3"]
    # The uninterrupted run goes on beside the killed ones (op determinism: load does not change its numbers).
    straight = _start([*args, f"--model_dir={tmp_path}/straight"])
    run_dir = f"{tmp_path}/killed"
    kill_after = sorted(random.Random(7).sample(range(2, 13), 3))
    for step in kill_after:
        process = _start([*args, f"--model_dir={run_dir}"])
        _wait_for(f"{run_dir}/checkpoints/pretrain/ckpt-{step}.index", process)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = run_module([*args, f"--model_dir={run_dir}"])
    assert finished.returncode == 0, finished.stderr[-2000:]
    # Issue 23's kill during a save, in a run folder of its own: the checkpoint being written is lost, the one
    # before it is whole, and the run resumes from it.
    saving_dir = f"{tmp_path}/killed_while_saving"
    interrupted = None
    for _ in range(5):
        process = _start([*args, f"--model_dir={saving_dir}"])
        interrupted = kill_during_a_save(f"{saving_dir}/checkpoints/pretrain", [process])
        if interrupted:
            break
    assert interrupted, "no kill landed during a save in 5 tries"
    previous = tf.train.latest_checkpoint(f"{saving_dir}/checkpoints/pretrain")
    assert previous.endswith(f"ckpt-{interrupted - 1}")
    tf.train.load_checkpoint(previous)  # whole and readable
    finished = run_module([*args, f"--model_dir={saving_dir}"])
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resumed from {previous} at step {interrupted - 1}" in finished.stderr
    _, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-2000:]
    straight_weights = final_weights(f"{tmp_path}/straight", 14)
    for interrupted_dir in (run_dir, saving_dir):
        weights = final_weights(interrupted_dir, 14)
        assert weights.keys() == straight_weights.keys()
        for name in weights:
            np.testing.assert_array_equal(weights[name], straight_weights[name], err_msg=f"{interrupted_dir}: {name}")


def test_sigterm_saves_exits_zero_and_resumes_from_that_step(tmp_path, tiny_data):
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--max_steps=60",
            "--checkpoint_every=50", "--epochs=20", f"--model_dir={tmp_path}/run"]
    process = _start(args)
    # The tensorboard folder appears when training starts; give it a few steps.
    _wait_for(f"{tmp_path}/run/tensorboard/pretrain", process)
    time.sleep(2.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    line = [x for x in stderr.splitlines() if x.startswith("stopped: [pretrain] SIGTERM: saved")][0]
    step = int(line.split(" at step ")[1].split(";")[0])
    assert 0 < step < 60 and os.path.exists(f"{tmp_path}/run/checkpoints/pretrain/ckpt-{step}.index")
    resumed = run_module(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path}/run/checkpoints/pretrain/ckpt-{step} at step {step}" in resumed.stderr


def test_a_nan_batch_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--max_steps=8",
            "--checkpoint_every=2", "--epochs=3"]
    # The skip run (below) goes on beside the stop run.
    args.append("--debug_nan_step=5")
    skipping = _start([*args, "--nan_policy=skip", "--steps_per_execution=2", f"--model_dir={tmp_path}/skip"])
    stopped = run_module([*args, f"--model_dir={tmp_path}/stop"])
    assert stopped.returncode == 3, stopped.stderr[-2000:]
    last = f"{tmp_path}/stop/checkpoints/pretrain/ckpt-4"
    assert (f"error: [pretrain] the loss is nan at step 6; nothing of this step was saved. The last good "
            f"checkpoint, {last}, is kept") in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not os.path.exists(f"{tmp_path}/stop/checkpoints/pretrain/ckpt-6.index")
    weights = final_weights(f"{tmp_path}/stop", 4)
    assert all(np.all(np.isfinite(value)) for value in weights.values() if value.dtype.kind == "f")

    # Two steps per call: the poisoned step shares its call with a good one.
    _, stderr = skipping.communicate(timeout=600)
    assert skipping.returncode == 0, stderr[-2000:]
    assert "1 steps with a non-finite loss or gradient skipped so far" in stderr
    reader = tf.train.load_checkpoint(f"{tmp_path}/skip/checkpoints/pretrain/ckpt-8")
    iterations = [name for name in reader.get_variable_to_shape_map() if name.startswith("optimizer/_iterations")]
    assert iterations and int(reader.get_tensor(iterations[0])) == 7  # 8 steps, one of them skipped
    weights = final_weights(f"{tmp_path}/skip", 8)
    assert all(np.all(np.isfinite(value)) for value in weights.values() if value.dtype.kind == "f")


def _log_seconds(line):
    """Seconds of the day of an absl log line (I1202 01:23:45.678901 ...)."""
    clock = line.split()[1]
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_two_replicas_stop_within_seconds_of_the_save_and_move_on_at_stage_ends(tmp_path, tiny_data):
    """With two replicas a finished stage's tf.data iterators could hold the process for minutes in their
    destructors (at a stage's end, and after a SIGTERM's save): they are no longer deleted during the run,
    and the command exits without destructors. The wait was intermittent (about 1 run in 3 under load), so
    a pass here bounds the gaps of this run; the fix is that no such destructor runs before the exit."""
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--stage=pretrain,meta", "--cpu_replicas=2",
            "--strategy=mirrored", "--epochs=2", "--meta_epochs=1", "--variation_warmup_steps=2",
            "--meta_scope=output_block"]
    whole = run_module([*args, f"--model_dir={tmp_path}/whole"], timeout=900)
    assert whole.returncode == 0, whole.stderr[-2000:]
    lines = whole.stderr.splitlines()
    last_step = [line for line in lines if "[pretrain] step" in line and "progress.py" in line][-1]
    next_stage = next(line for line in lines if "[meta]" in line)
    assert _log_seconds(next_stage) - _log_seconds(last_step) < 10, (last_step, next_stage)
    last_meta = [line for line in lines if "[meta] step" in line and "progress.py" in line][-1]
    after = next(line for line in lines[lines.index(last_meta) + 1:] if "synthetic:test" in line or "export" in line)
    assert _log_seconds(after) - _log_seconds(last_meta) < 10, (last_meta, after)
    # A SIGTERM mid-epoch of the meta stage (after a pretrain stage's iterators were retired): the save, then
    # the exit within seconds. (One replica, pretrain: test_sigterm_saves_exits_zero_and_resumes_from_that_step.)
    run_dir = f"{tmp_path}/stopped"
    process = _start([*args, f"--model_dir={run_dir}", "--epochs=1", "--meta_epochs=20"])
    _wait_for(f"{run_dir}/tensorboard/meta", process)
    time.sleep(3.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    ended = time.time()
    assert process.returncode == 0, stderr[-2000:]
    saved = [x for x in stderr.splitlines() if x.startswith("stopped: [meta] SIGTERM: saved")][0]
    step = int(saved.split(" at step ")[1].split(";")[0])
    assert ended - os.path.getmtime(f"{run_dir}/checkpoints/meta/ckpt-{step}.index") < 30


def _meta_weights(run_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(f"{run_dir}/checkpoints/meta"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH" and not name.startswith("save_counter")}


def test_the_meta_stage_ends_with_the_same_weights_alone_and_beside_cpu_bound_processes(tmp_path, tiny_data):
    """Issue 23, item 5: --deterministic (the default) pins TensorFlow's inter-op parallelism to 1; unpinned, the
    demo's meta stage diverged under load between its steps 40 and 60 (docs/training.md). At this size the
    unpinned runs also agree (tried: --nodeterministic passes here too), so this guards the pinned behaviour
    rather than reproducing the divergence, which needs the demo's length."""
    args = ["-m", "mvcom_tf.train", *TINY, *data_flags(tiny_data), "--eval_data=", "--stage=pretrain,meta",
            "--epochs=1", "--meta_epochs=1", "--variation_warmup_steps=2", "--meta_scope=output_block"]
    alone = run_module([*args, f"--model_dir={tmp_path}/alone"], timeout=900)
    assert alone.returncode == 0, alone.stderr[-2000:]
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        loaded = run_module([*args, f"--model_dir={tmp_path}/loaded"], timeout=900)
    finally:
        for burner in burners:
            burner.kill()
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    a, b = _meta_weights(f"{tmp_path}/alone"), _meta_weights(f"{tmp_path}/loaded")
    assert a.keys() == b.keys() and any(name.startswith("variation_optimizer/") for name in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
