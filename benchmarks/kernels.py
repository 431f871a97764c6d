"""What TensorFlow's own convolution kernels allow: the IResNet step's convolutions timed alone.

    python -m benchmarks.kernels [--backbone=iresnet100 --image_size=112 --batch=8 --repeats=7]

Every distinct convolution of the backbone (shape, kernel, stride) is timed forward, and forward
plus both backward kernels (input and filter gradients), at the training batch, in float32 and
bfloat16, the fastest of --repeats calls; times are multiplied by how often each occurs. The sum
is the step's convolution time, a floor under the whole step (which adds BatchNorm, PReLU, the head and the optimizer), and its
images/s a ceiling for the training step. A large float32 matmul is timed as well, for the
machine's reachable peak. Prints a table, then one JSON line.
"""

from __future__ import annotations

import collections
import json

from absl import app, flags

from benchmarks.timed_steps import call_seconds

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("backbone", "iresnet100", "Backbone whose convolutions are timed.")
    flags.DEFINE_integer("image_size", 112, "Image size.")
    flags.DEFINE_integer("batch", 8, "Batch size.")
    flags.DEFINE_integer("repeats", 7, "Timed calls per kernel (the fastest counts), after one warm-up call.")


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` calls: a ceiling needs the kernel's best, not the machine's noise."""
    return min(call_seconds(fn, repeats))


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from mvcom_tf.models.iresnet import build_iresnet

    model = build_iresnet(FLAGS.backbone, FLAGS.image_size, 512)
    shapes = collections.Counter()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, _, channels = layer.input.shape
            shapes[(height, channels, layer.filters, layer.kernel_size[0], layer.strides[0], layer.padding)] += 1
    flops_per_step = 0.0
    seconds = {}
    rows = []
    for dtype in ("float32", "bfloat16"):
        forward_total = backward_total = 0.0
        for (size, channels, filters, kernel, stride, padding), count in sorted(shapes.items()):
            x = tf.cast(tf.random.normal([FLAGS.batch, size, size, channels]), dtype)
            w = tf.cast(tf.random.normal([kernel, kernel, channels, filters]) * 0.05, dtype)
            conv = lambda x, w: tf.nn.conv2d(x, w, stride, padding.upper())  # noqa: E731
            out = conv(x, w)
            upstream = tf.cast(tf.random.normal(out.shape), dtype)

            @tf.function
            def forward():
                return conv(x, w)

            @tf.function
            def forward_backward():
                with tf.GradientTape() as tape:
                    tape.watch([x, w])
                    y = conv(x, w)
                # y is returned so that the forward convolution is not pruned away.
                return y, tape.gradient(y, [x, w], output_gradients=upstream)

            fwd = best_seconds(forward, FLAGS.repeats)
            both = best_seconds(forward_backward, FLAGS.repeats)
            flops = 2.0 * kernel * kernel * channels * filters * out.shape[1] * out.shape[2] * FLAGS.batch
            if dtype == "float32":
                flops_per_step += 3 * flops * count
            forward_total += fwd * count
            backward_total += max(both - fwd, 0.0) * count
            rows.append((dtype, f"{size}x{size}x{channels}->{filters} k{kernel} s{stride}", count,
                         flops / fwd / 1e9, 2 * flops / max(both - fwd, 1e-9) / 1e9))
        seconds[dtype] = (forward_total, backward_total)
    a = tf.random.normal([2048, 2048])
    matmul = tf.function(lambda: tf.matmul(a, a))
    matmul_gflops = 2 * 2048 ** 3 / best_seconds(matmul, 10) / 1e9

    print(f"{FLAGS.backbone}, {FLAGS.image_size}x{FLAGS.image_size}, batch {FLAGS.batch}: "
          f"{len(shapes)} distinct convolutions, {flops_per_step / FLAGS.batch / 1e9:.1f} GFLOP per image per step")
    print("| dtype | convolution | count | forward GFLOP/s | backward GFLOP/s |")
    print("|---|---|---|---|---|")
    for dtype, name, count, forward, backward in rows:
        print(f"| {dtype} | {name} | {count} | {forward:.0f} | {backward:.0f} |")
    print()
    print("| dtype | convolutions forward s | backward s | total s/step | images/s ceiling |")
    print("|---|---|---|---|---|")
    summary = {"backbone": FLAGS.backbone, "batch": FLAGS.batch, "matmul_float32_gflops": round(matmul_gflops, 1),
               "gflop_per_image": round(flops_per_step / FLAGS.batch / 1e9, 2)}
    for dtype, (forward, backward) in seconds.items():
        total = forward + backward
        print(f"| {dtype} | {forward:.3f} | {backward:.3f} | {total:.3f} | {FLAGS.batch / total:.2f} |")
        summary[f"conv_seconds_{dtype}"] = round(total, 3)
        summary[f"ceiling_images_per_s_{dtype}"] = round(FLAGS.batch / total, 2)
        summary[f"conv_gflops_{dtype}"] = round(flops_per_step / total / 1e9, 1)
    print(f"\nfloat32 matmul 2048x2048: {matmul_gflops:.0f} GFLOP/s")
    print(json.dumps(summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
