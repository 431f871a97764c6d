"""Test set-up: two logical CPU devices (for MirroredStrategy) and small synthetic datasets made once."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
import tensorflow as tf

# Logical devices must be configured before TensorFlow's runtime starts, so it happens at import.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture
def float64():
    """Layers built inside the test compute in float64 (Keras caches the policy: both are reset)."""
    import keras

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """train (60 identities), meta (16) and test (16) splits at 32 px."""
    from mvcom_tf.data import synthetic

    root = tmp_path_factory.mktemp("tiny_data")
    configs = {
        "train": synthetic.SplitConfig(num_identities=60, image_size=32, seed=3, max_images=20, min_images=4),
        "meta": synthetic.SplitConfig(num_identities=16, image_size=32, seed=3, meta_images=6),
        "test": synthetic.SplitConfig(num_identities=16, image_size=32, seed=3),
    }
    for split, config in configs.items():
        synthetic.write_split(str(root / split), split, config, num_shards=2)
    return root
