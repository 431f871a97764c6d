"""Heads on the embedding: the identity classifier with margins, and the variation classifiers."""

from __future__ import annotations

import math

import keras
from keras import ops

from mvcom_tf.data import schema

MARGIN_LOSSES = ("cosface", "arcface")


def centre_initializer() -> keras.initializers.Initializer:
    """The identity centres' initial values, N(0, 0.01) (insightface's), drawn from Keras' seeded generator:
    the sharded head draws its W with it too, so a seed starts both heads from the same centres."""
    return keras.initializers.RandomNormal(stddev=0.01)


class MarginHead(keras.layers.Layer):
    """Identity classifier W [E, C] producing scaled margin logits (insightface's CombinedMarginLoss).

    `call(embeddings, labels, margins)`: cosine logits cos(theta_c) = <f/|f|, W_c/|W_c|>; the
    target class gets `cos - m` (CosFace) or `cos(theta + m)` (ArcFace), all times `scale`.
    `margins` is a per-sample [B] tensor (MvCoM feeds its own) or a scalar keyword argument.
    Under mixed precision, build it with dtype="float32": margin logits need the precision.
    """

    def __init__(self, num_classes: int, loss: str = "cosface", scale: float = 64.0, **kwargs):
        super().__init__(**kwargs)
        if loss not in MARGIN_LOSSES:
            raise ValueError(f"unknown margin loss {loss!r}; expected one of {MARGIN_LOSSES}")
        self.num_classes, self.loss, self.scale = num_classes, loss, scale

    def build(self, embedding_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(embedding_shape[-1], self.num_classes),
            initializer=centre_initializer())

    def cosine(self, embeddings):
        """cos(theta) [B, C] between embeddings and class centres."""
        embeddings = ops.cast(embeddings, self.compute_dtype)
        normalized = embeddings / ops.maximum(ops.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        kernel = self.kernel / ops.maximum(ops.norm(self.kernel, axis=0, keepdims=True), 1e-12)
        return ops.matmul(normalized, kernel)

    def target_cosine(self, embeddings, labels):
        """cos(theta_y) [B] of each embedding with its own class centre (O(B E): the centres gathered)."""
        embeddings = ops.cast(embeddings, self.compute_dtype)
        normalized = embeddings / ops.maximum(ops.norm(embeddings, axis=-1, keepdims=True), 1e-12)
        centres = ops.transpose(ops.take(self.kernel, labels, axis=1))
        centres = centres / ops.maximum(ops.norm(centres, axis=-1, keepdims=True), 1e-12)
        return ops.sum(normalized * centres, axis=-1)

    def call(self, embeddings, labels, margins):
        cosine = self.cosine(embeddings)
        margins = ops.broadcast_to(ops.cast(margins, cosine.dtype), ops.shape(labels))
        onehot = ops.one_hot(labels, self.num_classes, dtype=cosine.dtype)
        target_cos = ops.sum(cosine * onehot, axis=-1)
        target_logit = margin_target(target_cos, margins, self.loss)
        logits = cosine + onehot * ops.expand_dims(target_logit - target_cos, -1)
        return logits * self.scale

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "loss": self.loss, "scale": self.scale}


def margin_target(target_cos, margins, loss: str):
    """The target class's cosine after its margin: cos - m (CosFace) or cos(theta + m) (ArcFace)."""
    if loss == "cosface":
        return target_cos - margins
    sine = ops.sqrt(ops.clip(1.0 - target_cos * target_cos, 1e-9, 1.0))
    shifted = target_cos * ops.cos(margins) - sine * ops.sin(margins)
    # Past theta + m = pi, cos(theta + m) stops decreasing: insightface falls back to the
    # CosFace-like cos - m * sin(m) there, keeping the target logit monotonic.
    threshold = ops.cos(math.pi - margins)
    return ops.where(target_cos > threshold, shifted, target_cos - margins * ops.sin(margins))


class VariationHeads(keras.layers.Layer):
    """One linear classifier per variation factor on the embedding (pose 7, occlusion 5, blur 4, ethnicity 4)."""

    def __init__(self, factors: tuple[str, ...] = schema.FACTORS, **kwargs):
        super().__init__(**kwargs)
        self.factors = tuple(factors)
        self.classifiers = {factor: keras.layers.Dense(schema.NUM_CLASSES[factor], name=f"{factor}_classifier",
                                                       dtype=self.dtype_policy)
                            for factor in self.factors}

    def build(self, embedding_shape):
        for classifier in self.classifiers.values():
            classifier.build(embedding_shape)

    def call(self, embeddings):
        """Logits per factor: {factor: [B, classes]}."""
        embeddings = ops.cast(embeddings, self.compute_dtype)
        return {factor: classifier(embeddings) for factor, classifier in self.classifiers.items()}

    def get_config(self):
        return {**super().get_config(), "factors": self.factors}

