"""Builds insightface RecordIO packages byte by byte from the documented layout (independent of mvcom_tf)."""

from __future__ import annotations

import os
import struct

import numpy as np
import tensorflow as tf

MAGIC = struct.pack("<I", 0xCED7230A)


def physical(cflag: int, data: bytes) -> bytes:
    """One physical record: magic, (cflag << 29) | length, data, zero padding to 4 bytes."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def logical(payload: bytes) -> bytes:
    """A payload as MXNet writes it: split into parts wherever the magic occurs."""
    parts = payload.split(MAGIC)
    if len(parts) == 1:
        return physical(0, payload)
    flags = [1] + [2] * (len(parts) - 2) + [3]
    return b"".join(physical(flag, part) for flag, part in zip(flags, parts))


def payload(label, image: bytes, record_id: int = 0) -> bytes:
    """Header `<IfQQ` then labels (flag > 0) then the image bytes."""
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, record_id, 0) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, float(label), record_id, 0) + image


def face_jpeg(identity: int, index: int, size: int = 24, magic_inside: bool = False) -> bytes:
    """A small JPEG whose pixels depend on (identity, index); with magic_inside, the magic is in its bytes twice."""
    rng = np.random.default_rng([identity, index])
    data = tf.io.encode_jpeg(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), quality=90).numpy()
    if magic_inside:
        # A JPEG comment segment holding the magic twice: the record is then split into 3 parts.
        comment = MAGIC + b"xy" + MAGIC
        segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
        data = data[:2] + segment + data[2:]
    return data


def write_package(folder: str, images_per_identity: list[int], *, header: bool = True,
                  magic_in: tuple[int, int] | None = None, size: int = 24, image_fn=None) -> dict[int, bytes]:
    """Writes train.rec/.idx/property; returns {key: image bytes}. `magic_in` = (identity, index) split 3-ways.

    `image_fn(identity, index)` gives the image bytes (default: face_jpeg).
    """
    os.makedirs(folder, exist_ok=True)
    records: dict[int, bytes] = {}
    images: dict[int, bytes] = {}
    key = 1 if header else 0
    ranges = []
    for identity, count in enumerate(images_per_identity):
        start = key
        for index in range(count):
            image = (image_fn(identity, index) if image_fn else
                     face_jpeg(identity, index, size, magic_inside=(identity, index) == magic_in))
            label = [float(identity), 0.0] if header else float(identity)
            records[key] = payload(label, image, key)
            images[key] = image
            key += 1
        ranges.append((start, key))
    if header:
        first_identity_key = key
        for start, end in ranges:
            records[key] = payload([float(start), float(end)], b"", key)
            key += 1
        records[0] = payload([float(first_identity_key), float(key)], b"")
    offsets = {}
    with open(os.path.join(folder, "train.rec"), "wb") as rec:
        for record_key in sorted(records):
            offsets[record_key] = rec.tell()
            rec.write(logical(records[record_key]))
    with open(os.path.join(folder, "train.idx"), "w") as idx:
        idx.writelines(f"{record_key}\t{offsets[record_key]}\n" for record_key in sorted(records))
    with open(os.path.join(folder, "property"), "w") as prop:
        prop.write(f"{len(images_per_identity)},{size},{size}\n")
    return images
