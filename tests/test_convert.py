"""The converters: RecordIO and image folders -> TFRecord schema v1, with reports, resume and clean errors."""

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data import alignment, conversion, recordio, schema, sources
from mvcom_tf.data.tfrecord import iterate_records, read_info
from tests import recordio_files
from tests.helpers import REPO, run_module


def _records(out_dir):
    return list(iterate_records(str(out_dir)))


def _checksum(out_dir):
    info = read_info(str(out_dir))
    digest = hashlib.sha256()
    for shard in info.shards:
        digest.update(open(os.path.join(out_dir, shard["file"]), "rb").read())
    return info.num_images, digest.hexdigest()


def test_ms1m_conversion_copies_bytes_and_counts_everything(tmp_path):
    rec_dir = tmp_path / "faces_emore"
    counts = [5, 3, 4, 2, 6]
    images = recordio_files.write_package(str(rec_dir), counts, header=True, magic_in=(2, 1))
    # Record key 2 (identity 0) holds a truncated JPEG.
    truncated_key = 2
    rec, idx, _ = recordio.rec_paths(str(rec_dir))
    offsets = recordio.read_index(idx)
    with recordio.RecordIOReader(rec, idx) as reader:
        keys = sorted(offsets)
        payloads = {key: reader.read_payload(offsets[key])[0] for key in keys}
    payloads[truncated_key] = payloads[truncated_key][:-40]
    with open(rec, "wb") as f, open(idx, "w") as index_file:
        for key in keys:
            index_file.write(f"{key}\t{f.tell()}\n")
            f.write(recordio_files.logical(payloads[key]))
    labels = tmp_path / "labels.csv"
    labels.write_text("source,pose,ethnicity,yaw\n"
                      "1,3,2,\n"
                      "3,,1,-70.5\n"
                      "4,x,0,\n"         # non-numeric pose: a bad row
                      "9999,3,2,\n")     # no such record: a bad row
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# overlaps with the meta set\n3\n")

    info, report = conversion.convert(sources.RecordIOSource(str(rec_dir)), str(tmp_path / "out"), num_shards=3,
                                      workers=2, labels_path=str(labels), exclude_path=str(exclude),
                                      progress=False)

    records = _records(tmp_path / "out")
    assert report.read == sum(counts)
    assert report.skipped["excluded_identity"] == counts[3]
    assert report.skipped["undecodable_image"] == 1
    assert report.skipped["bad_label_row"] == 2
    assert report.written == len(records) == sum(counts) - counts[3] - 1
    assert "9999" in " ".join(report.examples["bad_label_row"])
    by_key = {int(r.source): r for r in records}
    assert truncated_key not in by_key
    for key, record in by_key.items():
        assert record.image == images[key]  # copied, not re-encoded (key 11 was split in 3 parts)
    # Identities 0, 1, 2, 4 (3 excluded) become 0..3; per-identity counts follow.
    assert info.extras["identity_names"] == ["0", "1", "2", "4"]
    assert info.images_per_identity == [counts[0] - 1, counts[1], counts[2], counts[4]]
    assert (by_key[1].pose, by_key[1].ethnicity, by_key[1].blur) == (3, 2, -1)
    assert (by_key[3].pose, by_key[3].ethnicity) == (schema.pose_bin(-70.5), 1) and by_key[3].yaw == -70.5
    assert by_key[5].labels() == {f: -1 for f in schema.FACTORS}
    # dataset.json's histograms are the records'.
    for factor in schema.FACTORS:
        histogram = collections.Counter(getattr(r, factor) for r in records)
        assert info.histograms[factor] == [histogram[c] for c in range(schema.NUM_CLASSES[factor])]
    saved = json.load(open(tmp_path / "out" / "report.json"))
    assert saved["skipped"]["undecodable_image"] == 1 and saved["written"] == len(records)


def test_headerless_rec_and_corrupt_record_through_the_cli(tmp_path):
    rec_dir = tmp_path / "rec"
    images = recordio_files.write_package(str(rec_dir), [2, 3], header=False)
    rec, idx, _ = recordio.rec_paths(str(rec_dir))
    info, report = conversion.convert(sources.RecordIOSource(str(rec_dir)), str(tmp_path / "ok"), progress=False)
    assert info.images_per_identity == [2, 3] and report.written == 5
    assert {int(r.source): r.image for r in _records(tmp_path / "ok")} == images

    offset = recordio.read_index(idx)[3]
    raw = bytearray(open(rec, "rb").read())
    raw[offset] ^= 0xFF
    open(rec, "wb").write(bytes(raw))
    args = ["tools/convert_ms1m.py", f"--rec_dir={rec_dir}", "--num_shards=2", "--workers=1", "--noprogress"]
    failed = run_module([*args, f"--out_dir={tmp_path / 'bad'}"])
    assert failed.returncode == 2, failed.stderr
    assert f"error: {rec}: bad magic" in failed.stderr and f"at byte {offset}" in failed.stderr
    assert "Traceback" not in failed.stderr
    skipped = run_module([*args, f"--out_dir={tmp_path / 'skipped'}", "--skip_corrupt"])
    assert skipped.returncode == 0, skipped.stderr
    saved = json.load(open(tmp_path / "skipped" / "report.json"))
    assert saved["skipped"]["corrupt_record"] == 1 and saved["written"] == 4 and saved["read"] == 5
    assert f"byte {offset}" in saved["examples"]["corrupt_record"][0]


def _landmarks_for(yaw_degrees, scale, shift):
    """5 landmarks of the yaw estimator's face model turned by `yaw_degrees`, then scaled and shifted."""
    depth = np.array([0.0, 0.0, 35.0, 15.0, 15.0]) / 31.5
    model = np.array([[-1.0, -0.45], [1.0, -0.45], [0.0, 0.1], [-0.83, 0.75], [0.83, 0.75]])
    theta = np.radians(yaw_degrees)
    x = model[:, 0] * np.cos(theta) + depth * np.sin(theta)
    return np.stack([x, model[:, 1]], axis=1) * scale + shift


def _vggface2_tree(root, identities=4, per_identity=5):
    """VGGFace2's layout with synthetic faces; returns {NAME_ID: landmarks}."""
    rng = np.random.default_rng(0)
    landmarks = {}
    for identity in range(identities):
        for index in range(per_identity):
            name = f"n{identity:06d}/{index:04d}_01"
            os.makedirs(os.path.join(root, "train", f"n{identity:06d}"), exist_ok=True)
            image = rng.integers(60, 200, (90, 80, 3), dtype=np.uint8)
            data = tf.io.encode_jpeg(image, quality=90).numpy()
            open(os.path.join(root, "train", name + ".jpg"), "wb").write(data)
            landmarks[name] = _landmarks_for(rng.uniform(-80, 80), 14.0, np.array([40.0, 45.0]))
    return landmarks


def _write_landmark_csv(path, landmarks, extra_rows=()):
    header = "NAME_ID," + ",".join(f"P{i}{axis}" for i in range(1, 6) for axis in "XY")
    rows = [name + "," + ",".join(f"{v:.3f}" for v in points.reshape(-1)) for name, points in landmarks.items()]
    with open(path, "w") as f:
        f.write("\n".join([header, *rows, *extra_rows]) + "\n")


def test_vggface2_conversion_aligns_labels_and_reports(tmp_path):
    root = tmp_path / "vggface2"
    landmarks = _vggface2_tree(str(root))
    # A truncated JPEG, an image without landmarks, a row with a non-numeric field.
    truncated = "n000001/0002_01"
    data = open(root / "train" / f"{truncated}.jpg", "rb").read()
    open(root / "train" / f"{truncated}.jpg", "wb").write(data[: len(data) // 2])
    listed = dict(landmarks)
    del listed["n000002/0003_01"]
    bad = listed.pop("n000003/0000_01")
    os.makedirs(root / "bb_landmark")
    _write_landmark_csv(root / "bb_landmark" / "loose_landmark_train.csv", listed,
                        ["n000003/0000_01," + ",".join(["12.5"] * 9 + ["left"])])
    info, report = conversion.convert(sources.vggface2(str(root)), str(tmp_path / "meta"), split="meta",
                                      num_shards=2, progress=False)
    assert bad is not None
    assert report.read == 20 and report.written == 17
    assert report.skipped["undecodable_image"] == 1
    assert report.skipped["no_landmarks"] == 2  # the missing row and the bad row's image
    assert report.skipped["bad_label_row"] == 1
    records = {r.source: r for r in _records(tmp_path / "meta")}
    assert len(records) == 17 and info.split == "meta" and info.image_size == 112
    for source, record in records.items():
        expected_yaw = alignment.estimate_yaw(landmarks[source.removesuffix(".jpg")])
        assert record.yaw == pytest.approx(expected_yaw, abs=0.02)  # the CSV keeps 3 decimals
        assert record.pose == schema.pose_bin(expected_yaw)
        assert 0 <= record.blur < 4
        assert tf.io.decode_jpeg(record.image).shape == (112, 112, 3)


def test_killed_conversion_resumes_to_the_same_shards(tmp_path):
    root = tmp_path / "faces"
    landmarks = _vggface2_tree(str(root / "all"), identities=30, per_identity=20)
    _write_landmark_csv(tmp_path / "landmarks.csv", landmarks)
    args = ["tools/convert_folder.py", f"--root={root / 'all' / 'train'}", f"--landmarks={tmp_path / 'landmarks.csv'}",
            "--num_shards=40", "--workers=1", "--image_size=64", "--noprogress"]
    reference = run_module([*args, f"--out_dir={tmp_path / 'reference'}"])
    assert reference.returncode == 0, reference.stderr

    out_dir = tmp_path / "killed"
    state = out_dir / conversion.STATE_DIR
    process = subprocess.Popen([sys.executable, *args, f"--out_dir={out_dir}"], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": REPO}, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(state.glob("*.tfrecord.json"))) < 5:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    completed_at_kill = len(list(state.glob("*.tfrecord.json")))
    assert 5 <= completed_at_kill < 40, "the kill must land midway"
    assert not (out_dir / "dataset.json").exists()

    resumed = run_module([*args, f"--out_dir={out_dir}"])
    assert resumed.returncode == 0, resumed.stderr
    assert _checksum(out_dir) == _checksum(tmp_path / "reference")
    assert not list(out_dir.glob("*.incomplete")) and not list(state.glob("*.incomplete"))
    assert json.load(open(out_dir / "report.json"))["written"] == 600

    # Re-running with other options into the same folder is refused, not mixed.
    other = run_module([*args[:-1], "--image_size=32", "--noprogress", f"--out_dir={out_dir}"])
    assert other.returncode == 2 and "holds a conversion of other inputs or options" in other.stderr


def test_a_resumed_conversion_reports_the_rate_of_its_own_images(capsys):
    import multiprocessing

    from mvcom_tf.data.conversion import _Progress

    counter = multiprocessing.Value("q", 2037)  # every shard written by an earlier run
    with _Progress("test", 2037, counter, enabled=True):
        pass
    line = capsys.readouterr().err.strip().split("\r")[-1]
    assert "2037/2037 images 0 images/s" in line
