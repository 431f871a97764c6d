"""Damaged shards: finding which file a TFRecord read error came from, and reading past damage when asked.

TensorFlow's reader says "truncated record at 1755154" or "corrupted record at 1168528" without
the file. A record's framing has no way to resynchronise after damage, so a damaged shard is
readable only up to its first bad record: `--skip_corrupt_records` reads each shard that far and
counts the records it loses (dataset.json knows how many each shard holds).
"""

from __future__ import annotations

import dataclasses
import re

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Damage:
    """Where a shard stops being readable."""

    path: str
    records_read: int
    records_expected: int
    reason: str  # TensorFlow's words, e.g. "truncated record at 1755154"

    def describe(self) -> str:
        return (f"{self.path}: {self.reason} (record {self.records_read + 1} of {self.records_expected}; the "
                f"{self.records_read} before it are intact)")


def reader_reason(error: tf.errors.OpError) -> str:
    """The reader's own words from an error's message ("truncated record at N", "corrupted record at N")."""
    found = re.search(r"(truncated|corrupted) record at \d+", error.message or "")
    return found.group(0) if found else (error.message or type(error).__name__).splitlines()[0][:200]


def first_damage(paths: list[str], expected: list[int]) -> Damage | None:
    """Reads the shards in order until one fails; None if every shard reads whole with the records it should hold."""
    for path, count in zip(paths, expected):
        read = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                read += 1
        except tf.errors.DataLossError as error:
            return Damage(path, read, count, reader_reason(error))
        if read != count:
            return Damage(path, read, count, f"{read} records where dataset.json lists {count}")
    return None


class CorruptRecords:
    """--skip_corrupt_records: each shard read up to its first damaged record; the records lost are counted."""

    def __init__(self) -> None:
        with tf.init_scope(), tf.device("/cpu:0"):
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="corrupt_records")

    def read(self, path: tf.Tensor, expected: tf.Tensor) -> tf.data.Dataset:
        """The shard's readable records; at its end, adds the records it lacks to `count` (each pass over it)."""
        records = tf.data.TFRecordDataset(path).ignore_errors().map(lambda record: (record, tf.constant(False)))
        end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))

        def number(read, element):
            record, is_end = element
            return read + tf.cast(tf.logical_not(is_end), tf.int64), (record, is_end, read)

        def keep(record, is_end, read):
            lost = tf.where(is_end, tf.maximum(tf.cast(expected, tf.int64) - read, 0), tf.constant(0, tf.int64))
            with tf.control_dependencies([self.count.assign_add(lost)]):
                return tf.logical_not(is_end)

        return (records.concatenate(end).scan(tf.constant(0, tf.int64), number).filter(keep)
                .map(lambda record, is_end, read: record))
