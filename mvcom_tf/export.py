"""SavedModel export: uint8 images in, L2-normalised float32 embeddings out, preprocessing inside."""

from __future__ import annotations

import os
import tempfile

import keras
import tensorflow as tf

from mvcom_tf.data.pipeline import normalize_images


def embedding_fn(backbone: keras.Model):
    """uint8 (or float 0-255) images [B, H, W, 3] -> L2-normalised float32 embeddings [B, E]."""

    def embed(images):
        features = backbone(normalize_images(images), training=False)
        return tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)

    return embed


def export_saved_model(backbone: keras.Model, export_dir: str, image_size: int) -> str:
    """Writes a SavedModel whose `serving_default` maps `images` (uint8) to `embedding`."""
    embed = embedding_fn(backbone)
    archive = keras.export.ExportArchive()
    archive.track(backbone)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda images: {"embedding": embed(images)},
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")],
    )
    archive.write_out(export_dir, verbose=False)
    return export_dir


TFLITE_VARIANTS = ("float", "int8")


def export_tflite(saved_model_dir: str, out_dir: str) -> dict[str, str]:
    """TFLite models of a SavedModel: `float` (float32) and `int8` (dynamic-range: int8 weights, float
    activations). Returns {variant: path}; the files are `embedding_<variant>.tflite` in out_dir."""
    paths = {}
    tf.io.gfile.makedirs(out_dir)
    for variant in TFLITE_VARIANTS:
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
        if variant == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        path = f"{out_dir}/embedding_{variant}.tflite"
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(converter.convert())
        paths[variant] = path
    return paths


ONNX_VARIANTS = ("float", "int8")
# ONNX Runtime and TensorRT both run opset 17 (LayerNormalization, all ops this network needs).
ONNX_OPSET = 17


def export_onnx(saved_model_dir: str, out_dir: str) -> dict[str, str]:
    """ONNX models of a SavedModel's `serving_default` (tf2onnx): `float`, and `int8` with dynamic-range
    int8 weights (ONNX Runtime's quantizer). Returns {variant: path}: `embedding_<variant>.onnx` in out_dir."""
    # Imported here: the converters are needed by this export only, and take seconds to import.
    import tf2onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    loaded = tf.saved_model.load(saved_model_dir)  # kept referenced: the signature uses its variables
    serving = loaded.signatures["serving_default"]
    spec = serving.structured_input_signature[1]["images"]
    model, _ = tf2onnx.convert.from_function(
        tf.function(lambda images: serving(images=images)),
        input_signature=[tf.TensorSpec(spec.shape, spec.dtype, name="images")], opset=ONNX_OPSET)
    paths = {}
    tf.io.gfile.makedirs(out_dir)
    # The quantizer reads and writes local files; the results are copied to out_dir (any file system).
    with tempfile.TemporaryDirectory() as scratch:
        local = {variant: os.path.join(scratch, f"embedding_{variant}.onnx") for variant in ONNX_VARIANTS}
        with open(local["float"], "wb") as f:
            f.write(model.SerializeToString())
        prepared = os.path.join(scratch, "prepared.onnx")
        quant_pre_process(local["float"], prepared, skip_symbolic_shape=True)
        quantize_dynamic(prepared, local["int8"], weight_type=QuantType.QInt8)
        for variant in ONNX_VARIANTS:
            paths[variant] = f"{out_dir}/embedding_{variant}.onnx"
            tf.io.gfile.copy(local[variant], paths[variant], overwrite=True)
    return paths
