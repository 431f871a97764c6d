"""TFLite and ONNX exports (float32 and dynamic-range int8) against the SavedModel, on synthetic test faces."""

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data.tfrecord import iterate_records
from mvcom_tf.export import export_onnx, export_saved_model, export_tflite
from mvcom_tf.models.iresnet import build_iresnet


def tflite_embeddings(model_path: str, images: np.ndarray) -> np.ndarray:
    """Runs a TFLite embedding model image by image (its input has batch size 1)."""
    with tf.io.gfile.GFile(model_path, "rb") as f:
        interpreter = tf.lite.Interpreter(model_content=f.read())
    input_detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(input_detail["index"], [1, *images.shape[1:]])
    interpreter.allocate_tensors()
    output_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    for image in images:
        interpreter.set_tensor(input_detail["index"], image[None].astype(np.uint8))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index)[0].copy())
    return np.stack(outputs)


def onnx_embeddings(model_path: str, images: np.ndarray) -> np.ndarray:
    """Runs an ONNX embedding model with ONNX Runtime on CPU: uint8 images [B, H, W, 3] -> [B, E]."""
    import onnxruntime

    with tf.io.gfile.GFile(model_path, "rb") as f:
        session = onnxruntime.InferenceSession(f.read(), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"images": images.astype(np.uint8)})[0]


FORMATS = {"tflite": (export_tflite, tflite_embeddings), "onnx": (export_onnx, onnx_embeddings)}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_data):
    """A tiny backbone with trained-looking BatchNorm statistics, exported, and test faces."""
    tf.keras.utils.set_random_seed(5)
    backbone = build_iresnet("iresnet18", 32, 16, width_multiplier=0.25)
    for variable in backbone.non_trainable_variables:
        variable.assign(np.random.default_rng(1).uniform(0.5, 1.5, variable.shape).astype(np.float32))
    folder = tmp_path_factory.mktemp("formats")
    export_saved_model(backbone, str(folder / "export"), 32)
    images = np.stack([tf.io.decode_png(r.image).numpy() for _, r in zip(range(24), iterate_records(
        str(tiny_data / "test")))])
    return folder, images


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_exported_embeddings_match_the_saved_model(saved_model, name):
    folder, images = saved_model
    export, embed = FORMATS[name]
    paths = export(str(folder / "export"), str(folder / f"export_{name}"))
    serving = tf.saved_model.load(str(folder / "export")).signatures["serving_default"]
    reference = serving(images=tf.constant(images))["embedding"].numpy()
    for variant, least in (("float", 0.9999), ("int8", 0.99)):
        embeddings = embed(paths[variant], images)
        assert embeddings.shape == reference.shape
        cosine = np.sum(embeddings * reference, axis=1) / (
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
        assert cosine.min() > least, (variant, cosine.min())
    sizes = {variant: tf.io.gfile.stat(path).length for variant, path in paths.items()}
    assert sizes["int8"] < sizes["float"] / 2, sizes
