"""insightface arcface_torch models: PyTorch checkpoints read without torch, the import, ONNX and .pt evaluation.

The reference files in tests/data/arcface_torch_small were written by PyTorch from arcface_torch's
own iresnet (see their README): embeddings.npy is PyTorch's output for images.npy.
"""

import collections
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_module
from mvcom_tf.data import synthetic
from mvcom_tf.evaluation.embedders import OnnxInput, load_embedder
from mvcom_tf.evaluation.run import evaluate
from mvcom_tf.models import arcface_torch, torch_checkpoint

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arcface_torch_small")
IMAGES = np.load(os.path.join(FIXTURE, "images.npy"))
REFERENCE = np.load(os.path.join(FIXTURE, "embeddings.npy"))


def fixture(name):
    return os.path.join(FIXTURE, name)


def assert_matches_pytorch(embeddings, normalised):
    """Cosine >= 0.99999 per image; unnormalised outputs also within 1e-4 of the largest value."""
    reference = REFERENCE / np.linalg.norm(REFERENCE, axis=1, keepdims=True) if normalised else REFERENCE
    embeddings = np.asarray(embeddings, np.float64)
    cosine = np.sum(embeddings * reference, axis=1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(
        reference, axis=1)
    assert cosine.min() >= 0.99999, cosine
    assert np.abs(embeddings - reference).max() <= 1e-4 * np.abs(reference).max()


def test_backbone_pt_gives_pytorchs_embeddings():
    state_dict = torch_checkpoint.load(fixture("backbone.pt"))
    backbone, architecture = arcface_torch.load_backbone(state_dict, "backbone.pt")
    assert architecture == arcface_torch.Architecture("iresnet18", 0.125, 64, 112)
    from mvcom_tf.data.pipeline import normalize_images

    assert_matches_pytorch(backbone(normalize_images(tf.constant(IMAGES)), training=False).numpy(), normalised=False)


def test_import_of_the_checkpoint_pair_exports_a_savedmodel_and_the_joined_centres(tmp_path):
    out = tmp_path / "imported"
    ranks = [fixture("checkpoint_gpu_1.pt"), fixture("checkpoint_gpu_0.pt")]  # any order: sorted by rank
    result = run_module(["tools/import_arcface_torch.py", f"--checkpoint={fixture('checkpoint_gpu_0.pt')}",
                         f"--partial_fc={','.join(ranks)}", "--backbone=iresnet18", f"--out_dir={out}"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identity head of 11 classes" in result.stdout
    reader = tf.train.load_checkpoint(str(out / "checkpoint"))
    np.testing.assert_array_equal(reader.get_tensor("head/kernel/.ATTRIBUTES/VARIABLE_VALUE"),
                                  np.load(fixture("centers.npy")).T)
    loaded = tf.saved_model.load(str(out / "export"))  # written by another process
    embeddings = loaded.signatures["serving_default"](images=tf.constant(IMAGES))["embedding"].numpy()
    assert_matches_pytorch(embeddings, normalised=True)
    config = (out / "model.cfg").read_text()
    assert "--backbone=iresnet18" in config and "--width_multiplier=0.125" in config
    assert "--embedding_size=64" in config and "--image_size=112" in config
    bad = run_module(["tools/import_arcface_torch.py", f"--checkpoint={fixture('backbone.pt')}",
                      f"--partial_fc={fixture('checkpoint_gpu_1.pt')}", f"--out_dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2 and "Partial FC files of ranks [1]" in bad.stderr
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"not partial_fc_v2's split of 11 classes over 2"):
        arcface_torch.join_partial_fc([np.zeros((5, 4)), np.zeros((6, 4))], ["a.pt", "b.pt"])
    assert arcface_torch.partial_fc_rank_sizes(11, 2) == [6, 5]
    assert arcface_torch.partial_fc_rank_sizes(10, 4) == [3, 3, 2, 2]


def test_onnx_and_pt_models_evaluate_like_pytorch(tmp_path):
    embed, size = load_embedder(fixture("backbone.onnx"), onnx_input=OnnxInput())
    assert size == 112
    assert_matches_pytorch(embed(tf.constant(IMAGES)).numpy(), normalised=True)
    bgr, _ = load_embedder(fixture("backbone.onnx"), onnx_input=OnnxInput(bgr=True))
    tinted = tf.constant((IMAGES * np.array([1.0, 0.6, 0.3])).astype(np.uint8))  # the faces are grey: R = G = B
    swapped = tf.constant(tinted.numpy()[..., ::-1].copy())
    np.testing.assert_allclose(bgr(swapped).numpy(), embed(tinted).numpy(), atol=1e-6)
    assert np.abs(bgr(tinted).numpy() - embed(tinted).numpy()).max() > 1e-3
    pt_embed, _ = load_embedder(fixture("backbone.pt"))
    assert_matches_pytorch(pt_embed(tf.constant(IMAGES)).numpy(), normalised=True)
    # The whole benchmark path: both files are the same network, so they score alike on the same pairs.
    config = synthetic.SplitConfig(num_identities=12, image_size=32, seed=2)
    synthetic.write_split(str(tmp_path / "test"), "test", config, num_shards=1)
    spec = [f"synthetic:{tmp_path / 'test'}"]
    from_onnx = evaluate(fixture("backbone.onnx"), spec, str(tmp_path / "onnx"))["synthetic:test"]
    from_pt = evaluate(fixture("backbone.pt"), spec, str(tmp_path / "pt"))["synthetic:test"]
    assert abs(from_onnx["accuracy"] - from_pt["accuracy"]) <= 1.0 / (12 * 14 * 2)
    assert (tmp_path / "onnx" / "results.json").exists()
    missing = run_module(["-m", "mvcom_tf.evaluate", f"--model={tmp_path / 'absent.onnx'}",
                          f"--benchmark=synthetic:{tmp_path / 'test'}"])
    assert missing.returncode == 2 and f"--model={tmp_path / 'absent.onnx'} does not exist" in missing.stderr


def _archive(pickled: bytes, extra=()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil/data.pkl", pickled)
        archive.writestr("evil/byteorder", "little")
        for name, data in extra:
            archive.writestr(name, data)
    return buffer.getvalue()


def test_hostile_legacy_truncated_and_mismatched_files_are_refused(tmp_path):
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(_archive(pickle.dumps(collections.OrderedDict(x=Hostile()), protocol=2)))
    with pytest.raises(torch_checkpoint.CheckpointError, match=r"refusing (posix|os)\.system"):
        torch_checkpoint.load(str(hostile))
    result = run_module(["tools/import_arcface_torch.py", f"--checkpoint={hostile}", f"--out_dir={tmp_path / 'o'}"])
    assert result.returncode == 2 and "refusing" in result.stderr and str(hostile) in result.stderr
    assert not marker.exists()

    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"conv1.weight": [1.0]}, protocol=2))
    with pytest.raises(torch_checkpoint.CheckpointError, match="legacy.pt: a pre-1.6"):
        torch_checkpoint.load(str(legacy))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(fixture("backbone.pt"), "rb").read()[:100_000])
    with pytest.raises(torch_checkpoint.CheckpointError, match="truncated.pt: not a PyTorch checkpoint, or a trunc"):
        torch_checkpoint.load(str(truncated))

    state_dict = torch_checkpoint.load(fixture("backbone.pt"))
    del state_dict["layer2.1.bn3.running_var"]
    state_dict["head.extra"] = np.zeros(3, np.float32)
    with pytest.raises(torch_checkpoint.CheckpointError) as error:
        arcface_torch.load_backbone(state_dict, "edited.pt")
    assert "missing ['layer2.1.bn3.running_var']" in str(error.value)
    assert "left over ['head.extra']" in str(error.value)


def _text(value: str) -> bytes:
    return b"X" + len(value).to_bytes(4, "little") + value.encode()


def _tensor_pickle(storage: str, offset: int, size: tuple, stride: tuple) -> bytes:
    """{"t": tensor} as torch.save pickles it (protocol 2; written opcode by opcode, as torch is not here)."""
    def small_tuple(values):
        return b"(" + b"".join(b"K" + bytes([v]) for v in values) + b"t"

    persistent_id = b"(" + _text("storage") + f"ctorch\n{storage}\n".encode() + _text("0") + _text("cpu") \
        + b"K\x0c" + b"t" + b"Q"
    arguments = b"(" + persistent_id + b"K" + bytes([offset]) + small_tuple(size) + small_tuple(stride) + b"\x89" \
        + b"ccollections\nOrderedDict\n)R" + b"t"
    return b"\x80\x02}" + _text("t") + b"ctorch._utils\n_rebuild_tensor_v2\n" + arguments + b"Rs."


def test_storage_dtypes_and_strides(tmp_path):
    """float16 and bfloat16 storages, an element offset and a transposed (non-contiguous) tensor."""
    import ml_dtypes

    values = np.arange(12, dtype=np.float32)
    for storage, dtype in (("HalfStorage", np.float16), ("BFloat16Storage", ml_dtypes.bfloat16)):
        path = tmp_path / f"{storage}.pt"
        path.write_bytes(_archive(_tensor_pickle(storage, 2, (2, 3), (1, 2)),
                                  [("evil/data/0", values.astype(dtype).tobytes())]))
        tensor = torch_checkpoint.load(str(path))["t"]
        # Offset 2, shape (2, 3), strides (1, 2): element [i, j] is values[2 + i + 2 j].
        np.testing.assert_array_equal(tensor, values[2:8].reshape(3, 2).T)
        assert tensor.dtype == (np.float16 if storage == "HalfStorage" else np.float32)


def test_meta_stage_fine_tunes_an_import_without_centres(tmp_path, tiny_data):
    out = tmp_path / "imported"
    result = run_module(["tools/import_arcface_torch.py", f"--checkpoint={fixture('backbone.pt')}",
                         f"--out_dir={out}"])
    assert result.returncode == 0 and "no identity head" in result.stdout
    run_dir = tmp_path / "run"
    common = [f"--flagfile={out / 'model.cfg'}", f"--train_data={tiny_data / 'train'}",
              f"--meta_data={tiny_data / 'meta'}", "--eval_data=", f"--model_dir={run_dir}", "--stage=meta",
              "--batch_size=8", "--meta_epochs=1", "--head_warmup_steps=3", "--variation_warmup_steps=1",
              "--log_every=1", "--checkpoint_every=3", "--scale=16"]
    # TensorFlow 2.21's oneDNN kernels crash (SIGSEGV) in the meta step's second-order pass for this
    # 8-channel network at 64-112 px (not at width 1/4, nor at 32 px); Eigen's kernels run it (README).
    meta = run_module(["-m", "mvcom_tf.train", *common, "--max_steps=7"], env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert meta.returncode == 0, meta.stderr[-3000:]
    assert "holds no identity head" in meta.stderr
    # The save at step 3, the end of the head's warm-up, restored through the object graph (a training
    # checkpoint keeps trainable weights under the optimizer).
    architecture = arcface_torch.Architecture("iresnet18", 0.125, 64, 112)
    imported, after = architecture.build(), architecture.build()
    tf.train.Checkpoint(backbone=imported).restore(tf.train.latest_checkpoint(str(out / "checkpoint"))).expect_partial()
    tf.train.Checkpoint(backbone=after).restore(str(run_dir / "checkpoints" / "meta" / "ckpt-3")).expect_partial()
    for before_warmup, after_warmup in zip(imported.weights, after.weights):
        # Frozen weights and BatchNorm statistics (inference mode) through the head's warm-up.
        np.testing.assert_array_equal(after_warmup.numpy(), before_warmup.numpy(), err_msg=before_warmup.path)
    assert len(imported.weights) > 100
    losses = [float(line.split(" loss ")[1].split()[0]) for line in meta.stderr.splitlines() if " loss " in line]
    assert len(losses) >= 3 and np.all(np.isfinite(losses))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "residual/pose/std" in metrics["stages"]["meta"]["training"]
