"""Small files written whole and atomically through tf.io.gfile (any TensorFlow file system: local, gs://, ...)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import tensorflow as tf


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically (a temporary name, then a rename): a reader never sees half of it."""
    temporary = path + ".incomplete"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def write_json(path: str, data: Any) -> None:
    """Writes JSON atomically (indented, keys sorted)."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_array(path: str, array: np.ndarray) -> None:
    """Writes a .npy file atomically, its folder made if missing."""
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0] if "/" in path else ".")
    buffer = io.BytesIO()
    np.save(buffer, array)
    temporary = path + ".incomplete"
    with tf.io.gfile.GFile(temporary, "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(temporary, path, overwrite=True)


def read_array(path: str) -> np.ndarray:
    """Reads a .npy file through tf.io.gfile."""
    with tf.io.gfile.GFile(path, "rb") as f:
        return np.load(io.BytesIO(f.read()))
