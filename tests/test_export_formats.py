"""TFLite exports (float32 and dynamic-range int8) against the SavedModel, on synthetic test faces."""

import numpy as np
import tensorflow as tf

from mvcom_tf.data.tfrecord import iterate_records
from mvcom_tf.export import export_saved_model, export_tflite, tflite_embeddings
from mvcom_tf.models.iresnet import build_iresnet


def test_tflite_embeddings_match_the_saved_model(tmp_path, tiny_data):
    tf.keras.utils.set_random_seed(5)
    backbone = build_iresnet("iresnet18", 32, 16, width_multiplier=0.25)
    for variable in backbone.non_trainable_variables:  # trained-looking BatchNorm statistics
        variable.assign(np.random.default_rng(1).uniform(0.5, 1.5, variable.shape).astype(np.float32))
    export_saved_model(backbone, str(tmp_path / "export"), 32)
    paths = export_tflite(str(tmp_path / "export"), str(tmp_path / "export_tflite"))
    images = np.stack([tf.io.decode_png(r.image).numpy() for _, r in zip(range(24), iterate_records(
        str(tiny_data / "test")))])
    serving = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"]
    reference = serving(images=tf.constant(images))["embedding"].numpy()
    for variant, least in (("float", 0.9999), ("int8", 0.99)):
        embeddings = tflite_embeddings(paths[variant], images)
        cosine = np.sum(embeddings * reference, axis=1) / (
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
        assert cosine.min() > least, (variant, cosine.min())
    assert (tmp_path / "export_tflite" / "embedding_int8.tflite").stat().st_size < \
        (tmp_path / "export_tflite" / "embedding_float.tflite").stat().st_size / 2
