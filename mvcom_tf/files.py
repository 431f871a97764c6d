"""Small files written whole and atomically through tf.io.gfile (any TensorFlow file system: local, gs://, ...)."""

from __future__ import annotations

import json
from typing import Any

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
