"""Dataset folders: sharded TFRecord files written atomically, and the dataset.json that describes them."""

from __future__ import annotations

import collections
import dataclasses
import json
import posixpath
from typing import Any, Iterable, Iterator

import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.files import write_json

INFO_FILE = "dataset.json"


class DatasetError(ValueError):
    """A dataset folder that cannot be used: the message names the file and what was expected."""


@dataclasses.dataclass
class DatasetInfo:
    """The contents of dataset.json."""

    split: str
    image_size: int
    num_images: int
    images_per_identity: list[int]
    histograms: dict[str, list[int]]
    unknown: dict[str, int]
    shards: list[dict[str, Any]]
    made_by: dict[str, Any]
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = schema.SCHEMA_VERSION

    @property
    def num_identities(self) -> int:
        return len(self.images_per_identity)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["num_identities"] = self.num_identities
        return data


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def read_info(data_dir: str) -> DatasetInfo:
    """Reads and checks `<data_dir>/dataset.json`."""
    path = posixpath.join(data_dir, INFO_FILE)
    if not tf.io.gfile.isdir(data_dir):
        raise DatasetError(f"dataset folder {data_dir} does not exist")
    if not tf.io.gfile.exists(path):
        raise DatasetError(f"{path} is missing: {data_dir} is not a dataset folder "
                           "(make one with tools/make_synthetic.py or a converter in tools/)")
    try:
        with tf.io.gfile.GFile(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None
    version = data.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise DatasetError(f"{path} has schema_version {version}; this version of mvcom_tf reads "
                           f"schema_version {schema.SCHEMA_VERSION}")
    data.pop("num_identities", None)
    try:
        info = DatasetInfo(**data)
    except TypeError as error:
        raise DatasetError(f"{path}: {error}") from None
    for shard in info.shards:
        if not tf.io.gfile.exists(posixpath.join(data_dir, shard["file"])):
            raise DatasetError(f"{path} lists shard {shard['file']}, which is missing from {data_dir}")
    return info


def shard_paths(data_dir: str, info: DatasetInfo) -> list[str]:
    return [posixpath.join(data_dir, shard["file"]) for shard in info.shards]


class LabelCounter:
    """Counts images per identity and per factor class, as dataset.json reports them."""

    def __init__(self) -> None:
        self.identities: collections.Counter = collections.Counter()
        self.classes = {factor: collections.Counter() for factor in schema.FACTORS}

    def add(self, record: schema.FaceRecord) -> None:
        self.identities[record.identity] += 1
        for factor, label in record.labels().items():
            self.classes[factor][label] += 1

    def merge(self, other: "LabelCounter") -> None:
        self.identities.update(other.identities)
        for factor in schema.FACTORS:
            self.classes[factor].update(other.classes[factor])

    def to_json(self) -> dict[str, Any]:
        return {"identities": {str(k): v for k, v in self.identities.items()},
                "classes": {f: {str(k): v for k, v in c.items()} for f, c in self.classes.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LabelCounter":
        counter = cls()
        counter.identities.update({int(k): v for k, v in data["identities"].items()})
        for factor in schema.FACTORS:
            counter.classes[factor].update({int(k): v for k, v in data["classes"][factor].items()})
        return counter

    def histograms(self) -> dict[str, list[int]]:
        return {factor: [self.classes[factor][c] for c in range(schema.NUM_CLASSES[factor])]
                for factor in schema.FACTORS}

    def unknown(self) -> dict[str, int]:
        return {factor: self.classes[factor][schema.UNKNOWN] for factor in schema.FACTORS}

    def images_per_identity(self) -> list[int]:
        if not self.identities:
            return []
        if min(self.identities) < 0:
            raise DatasetError(f"identity labels must be >= 0, got {min(self.identities)}")
        return [self.identities[i] for i in range(max(self.identities) + 1)]


class SplitWriter:
    """Writes one split as `<split>-NNNNN-of-NNNNN.tfrecord` shards plus dataset.json.

    Each shard is written under a temporary name and renamed when complete, so a
    folder never holds a partial shard under a final name.
    """

    def __init__(self, out_dir: str, split: str, num_shards: int, image_size: int) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.out_dir, self.split, self.num_shards, self.image_size = out_dir, split, num_shards, image_size
        self.counter = LabelCounter()
        self.shard_sizes: dict[int, int] = {}
        tf.io.gfile.makedirs(out_dir)

    def shard_path(self, index: int) -> str:
        return posixpath.join(self.out_dir, shard_name(self.split, index, self.num_shards))

    def write_shard(self, index: int, records: Iterable[schema.FaceRecord]) -> int:
        """Writes shard `index` atomically; returns the number of records written."""
        final = self.shard_path(index)
        temporary = final + ".incomplete"
        counter = LabelCounter()
        count = 0
        with tf.io.TFRecordWriter(temporary) as writer:
            for record in records:
                writer.write(schema.encode_record(record))
                counter.add(record)
                count += 1
        tf.io.gfile.rename(temporary, final, overwrite=True)
        self.add_shard(index, count, counter)
        return count

    def add_shard(self, index: int, count: int, counter: LabelCounter) -> None:
        """Accounts for shard `index`, written by this writer or (resumed conversions) earlier."""
        self.counter.merge(counter)
        self.shard_sizes[index] = count

    def finish(self, made_by: dict[str, Any], extras: dict[str, Any] | None = None) -> DatasetInfo:
        """Writes dataset.json once every shard is complete."""
        missing = sorted(set(range(self.num_shards)) - set(self.shard_sizes))
        if missing:
            raise DatasetError(f"{self.out_dir}: shards {missing} of {self.split} were never written")
        info = DatasetInfo(
            split=self.split,
            image_size=self.image_size,
            num_images=sum(self.shard_sizes.values()),
            images_per_identity=self.counter.images_per_identity(),
            histograms=self.counter.histograms(),
            unknown=self.counter.unknown(),
            shards=[{"file": posixpath.basename(self.shard_path(i)), "num_images": self.shard_sizes[i]}
                    for i in range(self.num_shards)],
            made_by=made_by,
            extras=extras or {},
        )
        write_json(posixpath.join(self.out_dir, INFO_FILE), info.to_json())
        return info


def iterate_records(data_dir: str) -> Iterator[schema.FaceRecord]:
    """Yields every record of a dataset folder in shard order (Python side: tests, tools)."""
    info = read_info(data_dir)
    for path in shard_paths(data_dir, info):
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            yield schema.decode_record(serialized)
