"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 against one process with the whole batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO, TINY, data_flags, final_weights, kill_during_a_save


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _env(**extra):
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


@pytest.mark.parametrize("stage", ["pretrain", "meta", "meta_sharded"])
def test_two_workers_reach_the_weights_of_one_process_with_the_whole_batch(tmp_path, stage):
    """meta_sharded: the workers' identity centres split over them, the single process's replicated."""
    ports = ",".join(str(p) for p in free_ports(2))
    job = ["-m", "tests.multi_worker_job"]
    workers = [subprocess.Popen([sys.executable, *job, "worker", str(i), ports, str(tmp_path / f"w{i}.npz"), stage],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    single = subprocess.run([sys.executable, *job, "single", "0", "0", str(tmp_path / "one.npz"), stage], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=600)
    outputs = [w.communicate(timeout=600) for w in workers]
    assert single.returncode == 0, single.stderr[-2000:]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-2000:]
        assert "2 replicas" in out
    one, first, second = (np.load(tmp_path / name) for name in ("one.npz", "w0.npz", "w1.npz"))
    finals = [key for key in one.files if key.startswith("final_") and key in first.files]
    assert "final_centres" in finals and any(key.startswith("final_backbone") for key in finals)
    moved = max(float(np.max(np.abs(one[k] - one[k.replace("final", "initial")]))) for k in finals)
    assert moved > 1e-2  # the steps changed the weights, so the equality below means something
    for key in finals:
        np.testing.assert_allclose(first[key], one[key], atol=1e-5, err_msg=key)
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_two_workers_shard_the_identity_head_only_the_chief_writes_and_one_process_resumes(tmp_path, tiny_data):
    """Each worker holds its own shard of centres; a checkpoint gathers both (a collective at save), only the chief
    writes into the run folder, and a single process restores the whole head and goes on."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    run_dir = tmp_path / "run"
    common = [*TINY, *data_flags(tiny_data), f"--model_dir={run_dir}", "--head_sharding=sharded",
              "--checkpoint_every=2"]
    processes, scratch = [], []
    for index in range(2):
        folder = tmp_path / f"worker{index}"
        (folder / "tmp").mkdir(parents=True)
        scratch.append(folder)
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "mvcom_tf.train", *common, f"--eval_data=synthetic:{tiny_data}/test",
             "--strategy=multi_worker", "--max_steps=4", "--export"],
            cwd=str(folder), env=_env(TF_CONFIG=tf_config, TMPDIR=str(folder / "tmp")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
        assert "identity head, sharded over 2 replica(s): 30 centres per replica" in err

    written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert "metrics.json" in written and "flags.txt" in written and "export/saved_model.pb" in written
    assert "checkpoints/pretrain/ckpt-4.index" in written
    assert json.loads((run_dir / "metrics.json").read_text())["accuracy"] > 0
    # Worker 1 wrote only in its temporary folder, and removed its scratch run folder from there
    # (TensorFlow's autograph may leave its own generated modules in the temporary folder).
    assert [p.name for p in scratch[1].iterdir()] == ["tmp"]
    assert not list((scratch[1] / "tmp").glob("mvcom_tf_worker_*"))

    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "pretrain" / "ckpt-4"))
    kernel, momentum = reader.get_tensor("head/.ATTRIBUTES/kernel"), reader.get_tensor("head/.ATTRIBUTES/momentum")
    assert kernel.shape == momentum.shape == (16, 60)
    # Both workers' halves moved (a worker that saved only its own shard would leave the other's initial
    # N(0, 0.01) values with zero momentum).
    assert np.abs(momentum[:, :30]).max() > 0 and np.abs(momentum[:, 30:]).max() > 0
    resumed = subprocess.run([sys.executable, "-m", "mvcom_tf.train", *common, "--eval_data=", "--max_steps=6"],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/pretrain/ckpt-4 at step 4" in resumed.stderr


def _workers(tmp_path, ports, args, attempt):
    """Both workers of a loopback cluster running `mvcom_tf.train args`, each in its own folder."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for index in range(2):
        folder = tmp_path / f"{attempt}_worker{index}"
        (folder / "tmp").mkdir(parents=True)
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen([sys.executable, "-m", "mvcom_tf.train", *args], cwd=str(folder),
                                          env=_env(TF_CONFIG=tf_config, TMPDIR=str(folder / "tmp")),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return processes


def test_a_lost_worker_ends_the_survivor_with_one_line_and_a_restart_resumes_from_its_checkpoint(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    args = [*TINY, *data_flags(tiny_data), "--eval_data=", f"--model_dir={run_dir}", "--strategy=multi_worker",
            "--checkpoint_every=3", "--epochs=50", "--max_steps=400"]
    ports = free_ports(2)
    chief, other = _workers(tmp_path, ports, args, "first")
    saved = run_dir / "checkpoints" / "pretrain" / "ckpt-6.index"
    deadline = time.time() + 300
    while not saved.exists():
        assert chief.poll() is None and time.time() < deadline, "the chief never saved step 6"
        time.sleep(0.05)
    other.send_signal(signal.SIGKILL)  # a crashed host: no goodbye
    killed = time.time()
    _, err = chief.communicate(timeout=240)
    waited = time.time() - killed
    other.wait()
    assert chief.returncode == 4, err[-3000:]
    assert waited < 120, waited
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "lost /job:worker/replica:0/task:1 after step" in lines[0], err[-3000:]
    last = int(lines[0].split("restart every worker with the same command to resume from ")[1].rsplit("ckpt-", 1)[1])
    assert last >= 6 and (run_dir / "checkpoints" / "pretrain" / f"ckpt-{last}.index").exists()
    # Every worker restarted with the same command (a shorter run, for time) resumes there and finishes.
    restarted = _workers(tmp_path, ports, [*args[:-1], f"--max_steps={last + 2}"], "second")
    outputs = [p.communicate(timeout=600) for p in restarted]
    for process, (_, err) in zip(restarted, outputs):
        assert process.returncode == 0, err[-3000:]
    assert f"resumed from {run_dir}/checkpoints/pretrain/ckpt-{last} at step {last}" in outputs[0][1]
    assert (run_dir / "checkpoints" / "pretrain" / f"ckpt-{last + 2}.index").exists()


def test_two_workers_stopped_by_a_sigterm_then_killed_while_saving_end_with_the_uninterrupted_weights(
        tmp_path, tiny_data):
    """Issue 23's two-worker drills: a SIGTERM (TensorFlow's PreemptionCheckpointHandler agrees on the step), then
    both workers killed while the chief writes a checkpoint; the run resumes from the checkpoint before."""
    args = [*TINY, *data_flags(tiny_data), "--eval_data=", "--strategy=multi_worker", "--checkpoint_every=5",
            "--epochs=20", "--max_steps=40"]
    run_dir, straight_dir = tmp_path / "run", tmp_path / "straight"
    straight = _workers(tmp_path, free_ports(2), [*args, f"--model_dir={straight_dir}"], "straight")
    ports = free_ports(2)
    chief, other = _workers(tmp_path, ports, [*args, f"--model_dir={run_dir}"], "first")
    started = run_dir / "tensorboard" / "pretrain"
    deadline = time.time() + 300
    while not started.exists():
        assert chief.poll() is None and time.time() < deadline, "the chief never started training"
        time.sleep(0.05)
    time.sleep(3.0)  # a few steps in
    other.send_signal(signal.SIGTERM)  # what a scheduler sends before preempting a host
    outputs = [p.communicate(timeout=240) for p in (chief, other)]
    stops = []
    for process, (_, err) in zip((chief, other), outputs):
        assert process.returncode == 0, err[-3000:]
        assert "Traceback" not in err
        stopped = [line for line in err.splitlines() if line.startswith("stopped: ")]
        assert len(stopped) == 1, err[-3000:]
        stops.append(stopped[0])
    step = int(stops[0].split("stopped after step ")[1].split(",")[0])
    assert 0 < step < 40 and f"stopped after step {step}," in stops[1]
    assert f"saved as {run_dir}/checkpoints/pretrain/ckpt-{step};" in stops[0]
    assert f"saved as the chief's latest checkpoint in {run_dir}/checkpoints/pretrain;" in stops[1]  # not its scratch
    folder = run_dir / "checkpoints" / "pretrain"
    assert tf.train.latest_checkpoint(str(folder)) == f"{folder}/ckpt-{step}"
    # Both hosts lose power while the chief writes a periodic checkpoint.
    interrupted, attempt = None, 0
    while not interrupted and attempt < 5:
        attempt += 1
        resumed = _workers(tmp_path, ports, [*args, f"--model_dir={run_dir}"], f"killed{attempt}")
        interrupted = kill_during_a_save(folder, resumed, from_step=step + 1)
    assert interrupted, "no kill landed during a save in 5 tries"
    previous = tf.train.latest_checkpoint(str(folder))
    assert int(previous.rsplit("-", 1)[1]) < interrupted
    restarted = _workers(tmp_path, ports, [*args, f"--model_dir={run_dir}"], "last")
    outputs = [p.communicate(timeout=600) for p in [*restarted, *straight]]
    for process, (_, err) in zip([*restarted, *straight], outputs):
        assert process.returncode == 0, err[-3000:]
    assert f"resumed from {previous} at step {previous.rsplit('-', 1)[1]}" in outputs[0][1]
    a, b = final_weights(straight_dir, 40), final_weights(run_dir, 40)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
