"""MXNet RecordIO (insightface's `train.rec` / `train.idx` / `property`) read in pure Python.

A record is: uint32 magic 0xced7230a, uint32 lrec = (cflag << 29) | length, the payload,
zero padding to a multiple of 4 bytes (all little-endian). MXNet splits a payload wherever
the magic occurs in it: cflag 1, 2, 3 mark the start, middle and end parts, and the magic
belongs between consecutive parts. The payload of an image record starts with the header
struct `<IfQQ` (flag, label, id, id2); flag > 0 means `flag` float32 labels follow.
"""

from __future__ import annotations

import dataclasses
import posixpath
import struct
from typing import Iterator

import numpy as np
import tensorflow as tf

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
HEADER = struct.Struct("<IfQQ")
WHOLE, START, MIDDLE, END = 0, 1, 2, 3
LENGTH_MASK = (1 << 29) - 1
READ_AHEAD = 4 << 20  # bytes read at once when records are read by key


class RecordIOError(ValueError):
    """A RecordIO file that cannot be read: the message names the file, the byte offset and the problem."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One unpacked record: its key, header fields and the bytes after the header (the image)."""

    key: int
    offset: int
    flag: int
    labels: tuple[float, ...]
    id: int
    id2: int
    image: bytes

    @property
    def label(self) -> float:
        return self.labels[0]


def unpack(payload: bytes, key: int = -1, offset: int = -1) -> Record:
    """Splits a payload into its header and image bytes (mx.recordio.unpack)."""
    if len(payload) < HEADER.size:
        raise RecordIOError(f"record {key} at byte {offset}: payload of {len(payload)} bytes is shorter "
                            f"than the {HEADER.size}-byte header")
    flag, label, id1, id2 = HEADER.unpack_from(payload)
    body = payload[HEADER.size:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"record {key} at byte {offset}: header announces {flag} labels, "
                                f"only {len(body)} bytes follow")
        labels = tuple(float(x) for x in np.frombuffer(body[:4 * flag], "<f4"))
        body = body[4 * flag:]
    else:
        labels = (float(label),)
    return Record(key, offset, flag, labels, id1, id2, body)


def read_index(path: str) -> dict[int, int]:
    """Reads a `.idx` file (`key<TAB>offset` lines) into {key: byte offset}."""
    index = {}
    with tf.io.gfile.GFile(path, "r") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                key, offset = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise RecordIOError(f"{path} line {line_number}: expected 'key<TAB>offset', got {line.strip()!r}") \
                    from None
            index[key] = offset
    return index


def read_property(path: str) -> tuple[int, int, int]:
    """Reads insightface's `property` file: `num_classes,height,width`."""
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read().strip()
    try:
        num_classes, height, width = (int(x) for x in text.split(","))
    except ValueError:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width', got {text!r}") from None
    return num_classes, height, width


class RecordIOReader:
    """Random and sequential access to a `.rec` file, with its `.idx` when given."""

    def __init__(self, rec_path: str, idx_path: str | None = None) -> None:
        self.path = rec_path
        self._file = tf.io.gfile.GFile(rec_path, "rb")
        self.size = self._file.size()
        self.index = read_index(idx_path) if idx_path else None
        # Bytes from each indexed record to the next one (or the end of the file).
        offsets = sorted(self.index.values()) if self.index else []
        ends = dict(zip(offsets, offsets[1:] + [self.size]))
        self._spans = {key: max(ends[offset] - offset, 0) for key, offset in (self.index or {}).items()}
        self._chunk = (0, b"")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _header(self, head: bytes, offset: int) -> tuple[int, int]:
        """(cflag, length) of the physical record whose first 8 bytes are `head`."""
        if len(head) < 8:
            raise RecordIOError(f"{self.path}: truncated record at byte {offset}: {len(head)} of 8 header bytes")
        magic, lrec = struct.unpack_from("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{self.path}: bad magic 0x{magic:08x} at byte {offset} "
                                f"(expected 0x{MAGIC:08x}): not a RecordIO file or a corrupt record")
        return lrec >> 29, lrec & LENGTH_MASK

    def _part(self, offset: int, buffer: bytes | None = None, start: int = 0) -> tuple[int, bytes, int]:
        """One physical record at `offset` (from `buffer[start:]` when given, else the file):
        (cflag, payload part, offset of the next record)."""
        if buffer is None:
            self._file.seek(offset)
            cflag, length = self._header(self._file.read(8), offset)
            data = self._file.read(length)
        else:
            cflag, length = self._header(buffer[start:start + 8], offset)
            data = buffer[start + 8:start + 8 + length]
        if len(data) < length:
            raise RecordIOError(f"{self.path}: truncated record at byte {offset}: payload of {length} bytes, "
                                f"only {len(data)} present")
        return cflag, data, offset + 8 + length + (-length % 4)

    def _cached(self, offset: int, span: int) -> bytes:
        """`span` bytes at `offset`, served from a read-ahead chunk: sequential reads cost one read per chunk."""
        start, chunk = self._chunk
        if not (start <= offset and offset + span <= start + len(chunk)):
            self._file.seek(offset)
            chunk = self._file.read(max(span, READ_AHEAD))
            self._chunk = (offset, chunk)
            start = offset
        return chunk[offset - start:offset - start + span]

    def read_payload(self, offset: int, span: int = 0) -> tuple[bytes, int]:
        """The logical record starting at `offset`, parts joined: (payload, offset of the next record).

        With `span` (the bytes up to the next indexed record) it costs one read instead of two per part.
        """
        buffer = self._cached(offset, span) if span else None
        cflag, data, after = self._part(offset, buffer)
        if cflag == WHOLE:
            return data, after
        if cflag != START:
            raise RecordIOError(f"{self.path}: record at byte {offset} has continuation flag {cflag}; "
                                "expected a whole record (0) or a first part (1)")
        parts = [data]
        while True:
            part_offset = after
            cflag, data, after = self._part(part_offset, buffer, part_offset - offset)
            if cflag not in (MIDDLE, END):
                raise RecordIOError(f"{self.path}: record split at byte {offset} continues at byte "
                                    f"{part_offset} with flag {cflag}; expected 2 (middle) or 3 (end)")
            parts.append(data)
            if cflag == END:
                return MAGIC_BYTES.join(parts), after

    def read(self, key: int) -> Record:
        """The record of `key` (needs the `.idx`)."""
        if self.index is None:
            raise RecordIOError(f"{self.path}: reading by key needs the .idx file")
        if key not in self.index:
            raise RecordIOError(f"{self.path}: key {key} is not in the index")
        offset = self.index[key]
        payload, _ = self.read_payload(offset, self._spans.get(key, 0))
        return unpack(payload, key, offset)

    def scan(self) -> Iterator[tuple[int, bytes]]:
        """Every logical record in file order without the index: (offset, payload)."""
        offset = 0
        while offset < self.size:
            payload, next_offset = self.read_payload(offset)
            yield offset, payload
            offset = next_offset


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the images are in an insightface `.rec`, and their identities' key ranges if it says."""

    image_keys: range
    # identity label -> [first key, end key) when the file has identity records, else empty.
    identity_ranges: dict[int, tuple[int, int]]
    has_header: bool


def read_layout(reader: RecordIOReader) -> Layout:
    """Recognises insightface's header layout (key 0: flag 2, label [N+1, N+1+K]) or the headerless one."""
    if reader.index is None or not reader.index:
        raise RecordIOError(f"{reader.path}: the layout is read from the .idx file, which is missing or empty")
    first = reader.read(0) if 0 in reader.index else None
    if first is not None and first.flag == 2 and not first.image:
        image_end, identity_end = int(first.labels[0]), int(first.labels[1])
        ranges = {}
        for key in range(image_end, identity_end):
            record = reader.read(key)
            if len(record.labels) < 2:
                raise RecordIOError(f"{reader.path}: identity record {key} at byte {record.offset} has "
                                    f"labels {record.labels}; expected [first key, end key)")
            ranges[key - image_end] = (int(record.labels[0]), int(record.labels[1]))
        return Layout(range(1, image_end), ranges, has_header=True)
    keys = sorted(reader.index)
    return Layout(range(keys[0], keys[-1] + 1), {}, has_header=False)


def rec_paths(rec_dir: str, name: str = "train") -> tuple[str, str, str]:
    """The `.rec`, `.idx` and `property` paths of an insightface dataset folder."""
    return (posixpath.join(rec_dir, f"{name}.rec"), posixpath.join(rec_dir, f"{name}.idx"),
            posixpath.join(rec_dir, "property"))
