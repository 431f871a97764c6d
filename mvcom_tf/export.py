"""SavedModel export: uint8 images in, L2-normalised float32 embeddings out, preprocessing inside."""

from __future__ import annotations

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
