"""The process-wide TensorFlow settings a run makes before its first op: devices, determinism, seed, precision."""

from __future__ import annotations

from mvcom_tf.config import RuntimeConfig


def configure(runtime: RuntimeConfig) -> None:
    """Applies `runtime` to this process; call it before TensorFlow runs an op (devices and threads are fixed then)."""
    import keras
    import tensorflow as tf

    if runtime.cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        devices = [tf.config.LogicalDeviceConfiguration()] * runtime.cpu_replicas
        tf.config.set_logical_device_configuration(cpu, devices)
    if runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
        # One op at a time: with TensorFlow's default inter-op parallelism second-order steps' numbers depended on
        # the order in which independent ops ran, so two runs beside other work diverged (docs/training.md).
        tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(runtime.seed)
    if runtime.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(f"mixed_{runtime.mixed_precision}")
