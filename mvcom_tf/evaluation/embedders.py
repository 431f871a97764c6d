"""Models as embed functions for evaluation: SavedModels, ONNX models (ONNX Runtime), arcface_torch checkpoints.

Every embed function maps uint8 images [B, H, W, 3] to L2-normalised float32 embeddings [B, E].
"""

from __future__ import annotations

import dataclasses
import posixpath


def saved_model_dir(model: str) -> str:
    """The SavedModel folder of --model: itself, or `<run folder>/export`."""
    import tensorflow as tf

    for candidate in (model, posixpath.join(model, "export")):
        if tf.io.gfile.exists(posixpath.join(candidate, "saved_model.pb")):
            return candidate
    raise FileNotFoundError(f"--model={model}: neither it nor {model}/export holds a saved_model.pb (a run trained "
                            "with --noexport has none: run its training command again with --export)")


def load_embedder(model: str, image_size: int = 0, onnx_input: OnnxInput | None = None):
    """(embed function on uint8 images [B, H, W, 3] -> L2-normalised embeddings, image size) of --model."""
    if model.endswith((".onnx", ".pt", ".pth")):
        import tensorflow as tf

        if not tf.io.gfile.exists(model):
            raise FileNotFoundError(f"--model={model} does not exist")
    if model.endswith(".onnx"):
        return onnx_embedder(model, image_size, onnx_input or OnnxInput())
    if model.endswith((".pt", ".pth")):
        from mvcom_tf.export import embedding_fn
        from mvcom_tf.models.arcface_torch import load_model_file

        backbone, architecture = load_model_file(model)
        return embedding_fn(backbone), image_size or architecture.image_size
    return saved_model_embedder(model, image_size)


def saved_model_embedder(model: str, image_size: int = 0):
    """The embed function of a SavedModel exported by mvcom_tf (or any with the same `serving_default`:
    `images` uint8 [None, H, W, 3] -> `embedding`), and its image size."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir(model))
    signature = loaded.signatures["serving_default"]
    spec = signature.structured_input_signature[1]["images"]
    size = image_size or spec.shape[1]
    if not size:
        raise ValueError(f"{model}: the SavedModel's input has no fixed size; give --image_size")

    def embed(images):
        # `loaded` is referenced here so that its variables live as long as the function.
        return loaded.signatures["serving_default"](images=images)["embedding"]

    return embed, int(size)


@dataclasses.dataclass(frozen=True)
class OnnxInput:
    """How to feed an ONNX model with a float input (insightface's model zoo: (x - 127.5) / 127.5, RGB)."""

    mean: float = 127.5
    std: float = 127.5
    bgr: bool = False


def onnx_embedder(path: str, image_size: int, feed: OnnxInput):
    """An ONNX model's embed function, run by ONNX Runtime; input name, layout (NCHW or NHWC) and size are
    read from the graph. A uint8 input (this project's export) gets the images as they are."""
    import numpy as np
    import onnxruntime
    import tensorflow as tf

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    source = session.get_inputs()[0]
    shape = source.shape
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise ValueError(f"{path}: input {source.name} has shape {shape}, not an image batch (NCHW or NHWC, 3 channels)")
    channels_first = shape[1] == 3
    size = image_size or (shape[2] if channels_first else shape[1])
    if not isinstance(size, int):
        raise ValueError(f"{path}: the input has no fixed size ({shape}); give --image_size")
    raw = source.type == "tensor(uint8)"
    output = session.get_outputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        batch = images
        if not raw:
            batch = images.astype(np.float32)[..., ::-1] if feed.bgr else images.astype(np.float32)
            batch = (batch - feed.mean) / feed.std
        if channels_first:
            batch = batch.transpose(0, 3, 1, 2)
        features = session.run([output], {source.name: np.ascontiguousarray(batch)})[0].astype(np.float32)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    def embed(images):
        return tf.numpy_function(run, [tf.cast(images, tf.uint8)], tf.float32, stateful=False)

    return embed, int(size)
