"""What a finished run leaves in its folder: the exported model(s) and metrics.json."""

from __future__ import annotations

import posixpath

import keras

from mvcom_tf.config import TrainConfig
from mvcom_tf.export import export_onnx, export_saved_model, export_tflite
from mvcom_tf.files import write_json
from mvcom_tf.models.iresnet import build_iresnet

METRICS_FILE = "metrics.json"


def single_device_copy(config: TrainConfig, backbone: keras.Model) -> keras.Model:
    """The backbone rebuilt outside any strategy with the trained weights (for export)."""
    model = config.model
    copy = build_iresnet(model.backbone, model.image_size, model.embedding_size, model.width_multiplier,
                         model.dropout, sync_bn=False)
    copy.set_weights(backbone.get_weights())
    return copy


def export_folder(config: TrainConfig) -> str | None:
    """Where the run's SavedModel goes: --export_dir, or <model_dir>/export; None with --noexport."""
    if not config.export.saved_model:
        return None
    return config.export.dir or posixpath.join(config.runtime.model_dir, "export")


def write_outputs(config: TrainConfig, backbone: keras.Model, metrics: dict) -> dict:
    """Exports the backbone (SavedModel, and TFLite/ONNX if asked; --noexport: none) and writes metrics.json;
    returns metrics."""
    export, export_dir = config.export, export_folder(config)
    if export_dir:
        export_saved_model(single_device_copy(config, backbone), export_dir, config.model.image_size)
    if export.tflite:
        metrics["tflite"] = export_tflite(export_dir, f"{export_dir}_tflite")
    if export.onnx:
        metrics["onnx"] = export_onnx(export_dir, f"{export_dir}_onnx")
    write_json(posixpath.join(config.runtime.model_dir, METRICS_FILE), metrics)
    return metrics
