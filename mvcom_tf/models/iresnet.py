"""IResNet: the improved ResNet of face recognition (insightface's `iresnet`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import keras
import tensorflow as tf
from keras import layers

STAGE_BLOCKS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# The output block is what `--meta_scope=output_block` pseudo-updates: it is found by this prefix.
OUTPUT_BLOCK_PREFIX = "output_"


@keras.saving.register_keras_serializable(package="mvcom_tf")
class BatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization, with `fused=True` training on TensorFlow's fused kernel (FusedBatchNormV3).

    Keras composes a training-mode BN from about fifteen ops forward and as many backward, in float32
    even under a bfloat16 policy (two casts a layer); the fused kernel takes the compute dtype as it is
    and is one op each way (`python -m benchmarks.step_profile` shows the share of the step this
    takes back). Same outputs and the same moving statistics (Keras' biased batch variance: the
    kernel's Bessel-corrected one is scaled back). Inference, masks, float64 and other ranks stay on
    Keras' path.
    """

    def __init__(self, fused: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fused = fused

    def _fused_applies(self, inputs, training, mask) -> bool:
        return (self.fused and bool(training) and self.trainable and mask is None and not self.renorm
                and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and inputs.dtype in (tf.float32, tf.bfloat16))

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = self.gamma if self.scale else tf.ones([channels])
        offset = self.beta if self.center else tf.zeros([channels])
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=tf.cast(scale, tf.float32), offset=tf.cast(offset, tf.float32),
            mean=tf.zeros([0]), variance=tf.zeros([0]), epsilon=self.epsilon, data_format="NHWC",
            is_training=True)
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:3]), tf.float32)
        variance = variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "fused": self.fused}


@keras.saving.register_keras_serializable(package="mvcom_tf")
class SyncBatchNormalization(BatchNormalization):
    """BatchNormalization whose batch statistics are those of the global batch across replicas.

    Keras' `synchronized=True` computes the variance as E[x^2] - E[x]^2, which cancels where a
    channel's mean is large against its spread (common after residual additions); this layer
    all-reduces the sum, then the squared deviations from the global mean (two passes). Fused
    (one replica's statistics) only where there is one replica.
    """

    def _fused_applies(self, inputs, training, mask) -> bool:
        context = tf.distribute.get_replica_context()
        single = context is None or context.num_replicas_in_sync == 1
        return single and super()._fused_applies(inputs, training, mask)

    def _moments(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        if mask is not None or context is None or context.num_replicas_in_sync == 1:
            return super()._moments(inputs, mask)
        axes = self._reduction_axes
        # Every replica holds the same number of images (batches drop their remainder), so the
        # global count needs no all-reduce: each all-reduce costs a graph walk when traced.
        local_count = tf.reduce_prod(tf.gather(tf.shape(inputs), axes))
        count = tf.cast(local_count * context.num_replicas_in_sync, inputs.dtype)
        mean = context.all_reduce("sum", tf.reduce_sum(inputs, axis=axes)) / count
        deviations = tf.reduce_sum(tf.square(inputs - mean), axis=axes)
        return mean, context.all_reduce("sum", deviations) / count


@contextlib.contextmanager
def fused_batchnorm(model: keras.Model) -> Iterator[None]:
    """Within it, `model`'s BatchNormalization layers train on the fused kernel (read when a tf.function traces): for
    passes that no derivative is taken through, where the kernel's inexact second derivative cannot matter."""
    norms = [layer for layer in model.layers if isinstance(layer, BatchNormalization)]
    before = [layer.fused for layer in norms]
    for layer in norms:
        layer.fused = True
    try:
        yield
    finally:
        for layer, fused in zip(norms, before):
            layer.fused = fused


def float32_if_mixed() -> str | None:
    """"float32" under a mixed-precision global policy (for layers that must keep full precision), else None."""
    return "float32" if keras.mixed_precision.global_policy().name.startswith("mixed") else None


def _batch_norm(name: str, sync: bool, fused: bool, **kwargs) -> layers.Layer:
    layer = SyncBatchNormalization if sync else BatchNormalization
    return layer(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name, fused=fused, **kwargs)


def _conv(filters: int, kernel: int, stride: int, name: str) -> layers.Layer:
    return layers.Conv2D(filters, kernel, strides=stride, padding="same" if kernel > 1 else "valid",
                         use_bias=False, kernel_initializer="he_normal", name=name)


def _block(x, filters: int, stride: int, name: str, batch_norm):
    """BN-conv3x3-BN-PReLU-conv3x3(stride)-BN plus the (projected) shortcut."""
    shortcut = x
    y = batch_norm(f"{name}_bn1")(x)
    y = _conv(filters, 3, 1, f"{name}_conv1")(y)
    y = batch_norm(f"{name}_bn2")(y)
    y = layers.PReLU(shared_axes=[1, 2], name=f"{name}_prelu")(y)
    if stride > 1:
        # insightface pads 1 on each side before a strided 3x3; 'same' would pad only bottom-right.
        y = layers.ZeroPadding2D(1, name=f"{name}_pad")(y)
        y = layers.Conv2D(filters, 3, strides=stride, padding="valid", use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv2")(y)
    else:
        y = _conv(filters, 3, 1, f"{name}_conv2")(y)
    y = batch_norm(f"{name}_bn3")(y)
    if stride > 1 or shortcut.shape[-1] != filters:
        shortcut = _conv(filters, 1, stride, f"{name}_downsample_conv")(shortcut)
        shortcut = batch_norm(f"{name}_downsample_bn")(shortcut)
    return layers.Add(name=f"{name}_add")([y, shortcut])


def build_iresnet(
    name: str = "iresnet100",
    image_size: int = 112,
    embedding_size: int = 512,
    width_multiplier: float = 1.0,
    dropout: float = 0.0,
    sync_bn: bool = False,
    fused_bn: bool = False,
) -> keras.Model:
    """Builds an IResNet mapping float images [B, S, S, 3] (normalised) to embeddings [B, E]."""
    if name not in STAGE_BLOCKS:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(STAGE_BLOCKS)}")
    if image_size % 16:
        raise ValueError(f"image_size must be divisible by 16 (four stride-2 stages), got {image_size}")
    widths = [max(1, int(round(w * width_multiplier))) for w in STAGE_WIDTHS]

    batch_norm = functools.partial(_batch_norm, sync=sync_bn, fused=fused_bn)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = _conv(widths[0], 3, 1, "stem_conv")(inputs)
    x = batch_norm("stem_bn")(x)
    x = layers.PReLU(shared_axes=[1, 2], name="stem_prelu")(x)
    for stage, (blocks, filters) in enumerate(zip(STAGE_BLOCKS[name], widths), start=1):
        for index in range(blocks):
            x = _block(x, filters, 2 if index == 0 else 1, f"stage{stage}_block{index + 1}", batch_norm)

    x = batch_norm(f"{OUTPUT_BLOCK_PREFIX}bn")(x)
    x = layers.Dropout(dropout, name=f"{OUTPUT_BLOCK_PREFIX}dropout")(x)
    x = layers.Flatten(name=f"{OUTPUT_BLOCK_PREFIX}flatten")(x)
    x = layers.Dense(embedding_size, name=f"{OUTPUT_BLOCK_PREFIX}fc")(x)
    # insightface fixes this BN's scale at 1 (only the shift is learned). Under mixed precision
    # the embedding stays float32: the margin logits and the meta-gradient are computed from it.
    outputs = batch_norm(f"{OUTPUT_BLOCK_PREFIX}features", scale=False, dtype=float32_if_mixed())(x)
    return keras.Model(inputs, outputs, name=name)


def output_block_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of the output block (BN-Dropout-Flatten-Dense-BN), in order: what --meta_scope=output_block
    pseudo-updates."""
    return [layer for layer in model.layers if layer.name.startswith(OUTPUT_BLOCK_PREFIX)]
