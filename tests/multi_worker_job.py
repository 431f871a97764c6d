"""One process of the multi-worker check (run by test_multi_worker.py, not collected by pytest).

    python -m tests.multi_worker_job <single|worker> <index> <port,port> <out.npz> <pretrain|meta|meta_sharded>

Takes two steps of the margin step (pretrain) or the MvCoM meta step (meta) in float64 on fixed
batches, each replica its slice of the global batch, and saves every weight before and after to out.npz,
by name. `meta_sharded`: the workers' identity centres are sharded over them (the single process's are not).
"""

import json
import os
import sys

role, index, ports, out, stage = sys.argv[1:6]
if role == "worker":
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports.split(",")]},
        "task": {"type": "worker", "index": int(index)}})

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mvcom_tf.training.distribute import make_strategy  # noqa: E402
from mvcom_tf.margin_step import ShardedMarginStep  # noqa: E402
from tests.helpers import build, make_batches  # noqa: E402

keras.config.set_floatx("float64")
keras.config.set_dtype_policy("float64")
strategy = make_strategy("multi_worker") if role == "worker" else tf.distribute.OneDeviceStrategy("/cpu:0")
meta_step = build(strategy, tau=1.0, sync_bn=True, sharded=stage == "meta_sharded" and role == "worker")
step = meta_step if stage.startswith("meta") else meta_step.margin_step


def slice_of(data, context):
    n = len(next(iter(data.values()))) // context.num_replicas_in_sync
    i = context.replica_id_in_sync_group
    return {key: value[i * n:(i + 1) * n] for key, value in data.items()}


def weights():
    """Every weight by name: backbone, identity centres (gathered from every worker when sharded), variation
    heads, and the optimizer's slots when the head is replicated (a sharded head keeps its momentum apart)."""
    margin_step = meta_step.margin_step
    named = {f"backbone_{i}": v for i, v in enumerate(margin_step.backbone.weights)}
    named.update({f"heads_{i}": v for i, v in enumerate(meta_step.variation_heads.weights)})
    if isinstance(margin_step, ShardedMarginStep):
        named["centres"] = margin_step.head.centres.full()
    else:
        named["centres"] = margin_step.head.kernel
        named.update({f"optimizer_{i}": v for i, v in enumerate(margin_step.optimizer.variables)})
    return {name: np.asarray(value.numpy()) for name, value in named.items()}


initial = weights()


@tf.function
def run(batch, meta):
    strategy.run(step, args=(batch, meta) if stage.startswith("meta") else (batch,))


for seed in range(2):
    batch, meta = make_batches(seed)
    run(strategy.experimental_distribute_values_from_function(lambda c: slice_of(batch, c)),
        strategy.experimental_distribute_values_from_function(lambda c: slice_of(meta, c)))
final = weights()
np.savez(out, **{f"initial_{name}": value for name, value in initial.items()},
         **{f"final_{name}": value for name, value in final.items()})
print(f"{role} {index}: {strategy.num_replicas_in_sync} replicas, saved {len(final)} arrays")
