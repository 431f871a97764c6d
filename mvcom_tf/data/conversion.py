"""The converters' engine: a source's images -> TFRecord schema v1 shards, resumable, with a report.

A `Source` lists its images (`items`, in the parent process) and turns a batch of them into
encoded bytes plus measured labels (`load_batch`, in worker processes). The engine drops excluded
identities, attaches label-file rows, remaps identities to 0..C-1, shuffles the items once
(runs of consecutive images dealt to shards at random, seeded, so every shard mixes all
identities and a re-run plans the same shards), and
writes the shards with a pool of processes. A shard is complete when its file and its
statistics (`conversion/<shard>.json`) both exist; a re-run skips complete shards and
rewrites the others, so a conversion killed at any point resumes to the same bytes.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import posixpath
import sys
import threading
import time
from typing import Any, Hashable, Protocol

import numpy as np
import tensorflow as tf

from mvcom_tf.data import images, recordio, schema
from mvcom_tf.data.detection import DETECT_BATCH
from mvcom_tf.data.tfrecord import DatasetError, DatasetInfo, LabelCounter, SplitWriter, shard_name
from mvcom_tf.files import write_json

REPORT_FILE = "report.json"
STATE_DIR = "conversion"
MAX_EXAMPLES = 5
SKIP_REASONS = ("undecodable_image", "image_too_large", "image_too_small", "no_landmarks", "no_face",
                "excluded_identity", "bad_label_row", "corrupt_record")
LABEL_COLUMNS = ("pose", "occlusion", "blur", "ethnicity", "yaw")
BLOCK_ITEMS = 256  # consecutive source images kept together when dealing them to shards
LOAD_BATCH = DETECT_BATCH  # images a worker loads at once (face detection runs them as one batch)


class Skip(Exception):
    """Why an image cannot be converted (raised, or returned by `Source.load_batch`); `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Report:
    """Counts of a conversion: read, written, skipped by reason, with the first examples of each."""

    read: int = 0
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    detected: int = 0  # images aligned by the landmarks of a detected face

    def skip(self, reason: str, example: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(example)

    def merge(self, other: "Report") -> None:
        self.read += other.read
        self.written += other.written
        self.detected += other.detected
        for reason, count in other.skipped.items():
            self.skipped[reason] += count
            room = MAX_EXAMPLES - len(self.examples.setdefault(reason, []))
            self.examples[reason].extend(other.examples.get(reason, [])[:room])

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "detected": self.detected,
                "skipped": {reason: self.skipped[reason] for reason in SKIP_REASONS},
                "examples": {reason: self.examples[reason] for reason in SKIP_REASONS if self.examples.get(reason)}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Report":
        return cls(data["read"], data["written"], collections.Counter(data["skipped"]), dict(data["examples"]),
                   data.get("detected", 0))


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a source: its name (as label files and reports call it), raw identity, and locator."""

    source: str
    identity: Hashable
    locator: Any


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What `Source.load` returns: the bytes to store and the labels measured from the image."""

    image: bytes
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)
    detected: bool = False  # aligned by a detected face's landmarks


class Source(Protocol):
    """A dataset in its original format. Must pickle: workers receive it."""

    image_size: int

    def items(self, report: Report) -> list[Item]:
        """Every image, in a fixed order (parent process); may count skips (corrupt records, bad rows)."""

    def load_batch(self, items: list[Item]) -> list[Loaded | Skip]:
        """For each item (worker process), its stored bytes and measured labels, or the Skip that says why not."""

    def describe(self) -> dict[str, Any]:
        """What identifies this source's inputs and options (for dataset.json and resume checks)."""


# ----------------------------------------------------------------------------- label and identity files


def load_each(load, items: list[Item]) -> list[Loaded | Skip]:
    """`load_batch` for a source that loads its images one by one: `load(item)` for each, a raised Skip kept."""
    results: list[Loaded | Skip] = []
    for item in items:
        try:
            results.append(load(item))
        except Skip as skip:
            results.append(skip)
    return results


def read_label_file(path: str, report: Report) -> dict[str, dict[str, Any]]:
    """Reads a `source,pose,occlusion,blur,ethnicity,yaw` CSV (any label column optional, empty or -1 = unknown).

    Rows with a non-numeric or out-of-range value are counted as bad_label_row and ignored.
    """
    with tf.io.gfile.GFile(path, "r") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "source" not in reader.fieldnames:
            raise DatasetError(f"{path}: expected a header with a 'source' column and any of {LABEL_COLUMNS}, "
                               f"got {reader.fieldnames}")
        unknown_columns = set(reader.fieldnames) - {"source", *LABEL_COLUMNS}
        if unknown_columns:
            raise DatasetError(f"{path}: unknown columns {sorted(unknown_columns)}; expected source and any of "
                               f"{LABEL_COLUMNS}")
        table = {}
        for line, row in enumerate(reader, 2):
            try:
                table[row["source"]] = _parse_label_row(row)
            except ValueError as error:
                report.skip("bad_label_row", f"{path} line {line}: {error}")
    return table


def _parse_label_row(row: dict[str, str]) -> dict[str, Any]:
    labels: dict[str, Any] = {}
    for column in LABEL_COLUMNS:
        text = (row.get(column) or "").strip()
        if text in ("", "-1"):
            continue
        if column == "yaw":
            yaw = float(text)
            if not -180.0 <= yaw <= 180.0:
                raise ValueError(f"yaw {text!r} outside [-180, 180]")
            labels["yaw"] = yaw
            continue
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{column} {text!r} is not an integer class") from None
        if not 0 <= value < schema.NUM_CLASSES[column]:
            raise ValueError(f"{column} {value} outside [-1, {schema.NUM_CLASSES[column] - 1}]")
        labels[column] = value
    return labels


def read_identity_list(path: str) -> set[str]:
    """Identities listed one per line (`#` starts a comment), as strings."""
    with tf.io.gfile.GFile(path, "r") as f:
        return {line.split("#")[0].strip() for line in f} - {""}


def _sort_key(identity: Hashable) -> tuple:
    return (0, identity, "") if isinstance(identity, (int, np.integer)) else (1, 0, str(identity))


def _final_labels(measured: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """A label file's values override measured ones; a yaw without a pose gives the pose bin."""
    labels = {**measured, **table}
    if "yaw" in table and "pose" not in table:
        labels["pose"] = schema.pose_bin(table["yaw"])
    return labels


# ----------------------------------------------------------------------------- the engine


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    index: int
    items: list[tuple[Item, int, dict[str, Any]]]


class _Progress:
    """A Keras-style progress line (images, images/s, ETA) fed by a counter shared with the workers; the rate counts
    only this run's images (a resumed conversion starts its counter at the shards already written)."""

    def __init__(self, name: str, total: int, counter, enabled: bool) -> None:
        self.name, self.total, self.counter, self.enabled = name, total, counter, enabled
        self.start = time.perf_counter()
        self.done_before = counter.value
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._print()
            print(file=sys.stderr)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._print()

    def _print(self) -> None:
        done = self.counter.value
        elapsed = time.perf_counter() - self.start
        rate = (done - self.done_before) / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        width = 30
        filled = int(width * done / max(self.total, 1))
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
        print(f"\r{self.name} [{'=' * filled}{'.' * (width - filled)}] {done}/{self.total} images "
              f"{rate:.0f} images/s ETA {eta_text}", end="", file=sys.stderr, flush=True)


_worker_counter = None


def _init_worker(counter) -> None:
    global _worker_counter
    _worker_counter = counter


def _write_shard(source: Source, out_dir: str, split: str, num_shards: int, shuffle_seed: int, load_batch: int,
                 task: _ShardTask) -> None:
    """Writes one shard atomically, then its statistics file (which marks it complete).

    Images are read in the source's order (sequential reads) and written in a seeded random
    order, so the shard is held in memory once: size shards with --num_shards accordingly.
    """
    report = Report()
    records = []
    for start in range(0, len(task.items), load_batch):
        batch = task.items[start:start + load_batch]
        loaded_batch = source.load_batch([item for item, _, _ in batch])
        if _worker_counter is not None:
            with _worker_counter.get_lock():
                _worker_counter.value += len(batch)
        for (item, identity, table), loaded in zip(batch, loaded_batch):
            if isinstance(loaded, Skip):
                report.skip(loaded.reason, f"{item.source}: {loaded.detail}")
                continue
            report.detected += loaded.detected
            labels = _final_labels(loaded.labels, table)
            records.append(schema.FaceRecord(
                image=loaded.image, identity=identity, source=item.source,
                yaw=float(np.float32(labels.get("yaw", math.nan))),
                **{factor: labels.get(factor, schema.UNKNOWN) for factor in schema.FACTORS}))
    report.written = len(records)
    order = np.random.default_rng([shuffle_seed, task.index]).permutation(len(records))
    writer = SplitWriter(out_dir, split, num_shards, source.image_size)
    count = writer.write_shard(task.index, (records[i] for i in order))
    write_json(_stats_path(out_dir, split, task.index, num_shards),
               {"num_images": count, "labels": writer.counter.to_json(), "report": report.to_json()})


def _run_task(arguments) -> int:
    _write_shard(*arguments)
    return arguments[-1].index


def _deal_blocks(count: int, num_shards: int, seed: int) -> list[list[int]]:
    """Item positions of each shard: runs of consecutive items dealt to shards in a seeded random order.

    Sources list images grouped by identity; dealing short runs spreads every part of the
    source over all shards (each shard mixes all identities) while each worker still reads
    long sequential stretches.
    """
    run = max(1, min(BLOCK_ITEMS, count // (4 * num_shards)))
    runs = [range(start, min(start + run, count)) for start in range(0, count, run)]
    dealt = np.random.default_rng(seed).permutation(len(runs))
    return [[position for r in sorted(dealt[index::num_shards]) for position in runs[r]]
            for index in range(num_shards)]


def _stats_path(out_dir: str, split: str, index: int, num_shards: int) -> str:
    return posixpath.join(out_dir, STATE_DIR, shard_name(split, index, num_shards) + ".json")


def _is_complete(out_dir: str, split: str, index: int, num_shards: int) -> bool:
    return (tf.io.gfile.exists(_stats_path(out_dir, split, index, num_shards))
            and tf.io.gfile.exists(posixpath.join(out_dir, shard_name(split, index, num_shards))))


def _plan_fingerprint(plan: dict[str, Any], tasks: list[_ShardTask]) -> str:
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode())
    for task in tasks:
        for item, identity, table in task.items:
            digest.update(f"{task.index}\t{item.source}\t{identity}\t{sorted(table.items())}\n".encode())
    return digest.hexdigest()


def convert(
    source: Source,
    out_dir: str,
    *,
    split: str = "train",
    num_shards: int = 1,
    workers: int = 1,
    labels_path: str = "",
    exclude_path: str = "",
    shuffle_seed: int = 0,
    progress: bool = True,
    tool: str = "",
    load_batch: int = LOAD_BATCH,
) -> tuple[DatasetInfo, Report]:
    """Converts `source` into `out_dir` (shards, dataset.json, report.json); resumes an interrupted run.
    `load_batch`: images a worker loads at once (1: one by one, the benchmark's baseline)."""
    if num_shards < 1 or workers < 1 or load_batch < 1:
        raise ValueError(f"num_shards, workers and load_batch must be >= 1, got {num_shards}, {workers} and "
                         f"{load_batch}")
    report = Report()
    items = source.items(report)
    table = read_label_file(labels_path, report) if labels_path else {}
    excluded = read_identity_list(exclude_path) if exclude_path else set()
    names = {item.source for item in items}
    for name in sorted(set(table) - names):
        report.skip("bad_label_row", f"{labels_path}: row for {name!r}, which is not an image of the input")
    report.read += len(items)
    kept = []
    for item in items:
        if str(item.identity) in excluded:
            report.skip("excluded_identity", f"{item.source}: identity {item.identity}")
        else:
            kept.append(item)
    identities = sorted({item.identity for item in kept}, key=_sort_key)
    new_id = {identity: index for index, identity in enumerate(identities)}
    tasks = [_ShardTask(index, [(kept[i], new_id[kept[i].identity], table.get(kept[i].source, {}))
                                for i in positions])
             for index, positions in enumerate(_deal_blocks(len(kept), num_shards, shuffle_seed))]

    plan = {"source": source.describe(), "split": split, "num_shards": num_shards, "shuffle_seed": shuffle_seed,
            "labels": labels_path, "exclude_identities": exclude_path}
    fingerprint = _plan_fingerprint(plan, tasks)
    tf.io.gfile.makedirs(posixpath.join(out_dir, STATE_DIR))
    plan_path = posixpath.join(out_dir, STATE_DIR, "plan.json")
    if tf.io.gfile.exists(plan_path):
        with tf.io.gfile.GFile(plan_path) as f:
            previous = json.load(f).get("fingerprint")
        if previous != fingerprint:
            raise DatasetError(f"{out_dir} holds a conversion of other inputs or options ({plan_path}); "
                               "use another --out_dir, or delete it to start over")
    else:
        write_json(plan_path, {"fingerprint": fingerprint, **plan})

    pending = [task for task in tasks if not _is_complete(out_dir, split, task.index, num_shards)]
    done_before = sum(len(task.items) for task in tasks) - sum(len(task.items) for task in pending)
    counter = multiprocessing.get_context("spawn").Value("q", done_before)
    with _Progress(f"{split}", len(kept), counter, progress):
        arguments = [(source, out_dir, split, num_shards, shuffle_seed, load_batch, task) for task in pending]
        if workers == 1 or len(pending) <= 1:
            _init_worker(counter)
            try:
                for argument in arguments:
                    _run_task(argument)
            finally:
                _init_worker(None)
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(pending)), initializer=_init_worker, initargs=(counter,)) as pool:
                for _ in pool.imap_unordered(_run_task, arguments):
                    pass

    writer = SplitWriter(out_dir, split, num_shards, source.image_size)
    for task in tasks:
        with tf.io.gfile.GFile(_stats_path(out_dir, split, task.index, num_shards)) as f:
            stats = json.load(f)
        writer.add_shard(task.index, stats["num_images"], LabelCounter.from_json(stats["labels"]))
        report.merge(Report.from_json(stats["report"]))
    for leftover in tf.io.gfile.glob(posixpath.join(out_dir, "*.incomplete")):
        tf.io.gfile.remove(leftover)
    made_by = {"tool": tool or "mvcom_tf.data.conversion", **plan}
    info = writer.finish(made_by, {"identity_names": [str(identity) for identity in identities],
                                   "report": REPORT_FILE})
    write_json(posixpath.join(out_dir, REPORT_FILE), report.to_json())
    return info, report


def image_problem(data: bytes) -> str | None:
    """Why encoded image bytes cannot be a whole JPEG, PNG, BMP, GIF or WebP (None if they look complete).

    A structural check (format signature, end marker) that costs nothing next to decoding:
    it catches truncated files, which decoders may silently pad with grey.
    """
    if data[:2] == b"\xff\xd8" or data[:8] == b"\x89PNG\r\n\x1a\n":
        return images.truncation_problem(data)
    if data[:2] == b"BM" or data[:6] in (b"GIF87a", b"GIF89a") or data[8:12] == b"WEBP":
        return None
    return f"not a JPEG, PNG, BMP, GIF or WebP file (starts with {data[:8]!r})"


def print_summary(info: DatasetInfo, report: Report, out_dir: str, stream=sys.stderr) -> None:
    """The closing lines of a converter: what was written and what was skipped, and why."""
    lines = [f"wrote {report.written} images of {info.num_identities} identities to {out_dir} "
             f"({len(info.shards)} shards); read {report.read}"
             + (f"; {report.detected} aligned by detected faces" if report.detected else "")]
    for reason in SKIP_REASONS:
        if report.skipped[reason]:
            lines.append(f"  skipped {report.skipped[reason]} ({reason}), e.g. {report.examples[reason][0]}")
    print("\n".join(lines), file=stream)


def define_flags() -> None:
    """Registers the flags every converter shares (called by the tools, never at import)."""
    from absl import flags

    flags.DEFINE_string("out_dir", None, "Dataset folder to write (shards, dataset.json, report.json).", required=True)
    flags.DEFINE_string("split", "train", "Split name: shards are <split>-NNNNN-of-NNNNN.tfrecord.")
    flags.DEFINE_integer("num_shards", 16, "TFRecord shards (a few hundred MB each suits large sets).", lower_bound=1)
    flags.DEFINE_integer("workers", 2, "Worker processes.", lower_bound=1)
    flags.DEFINE_string("labels", "", "CSV source,pose,occlusion,blur,ethnicity,yaw (any label column optional, "
                        "empty or -1 unknown); overrides measured labels.")
    flags.DEFINE_string("exclude_identities", "", "File with one identity per line to drop (e.g. those shared "
                        "with the meta set or RFW).")
    flags.DEFINE_integer("shuffle_seed", 0, "Seed of the one-time shuffle that spreads identities over shards.")
    flags.DEFINE_bool("progress", True, "Show a progress line.")


def run_tool(make_source, tool: str) -> int:
    """Runs a converter from its flags; a bad input ends with `error: ...` and exit status 2, not a traceback."""
    from absl import flags

    options = flags.FLAGS
    try:
        source = make_source()
        info, report = convert(source, options.out_dir, split=options.split, num_shards=options.num_shards,
                               workers=options.workers, labels_path=options.labels,
                               exclude_path=options.exclude_identities, shuffle_seed=options.shuffle_seed,
                               progress=options.progress, tool=tool)
    except (DatasetError, recordio.RecordIOError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 2
    print_summary(info, report, options.out_dir)
    return 0
