import json
import math

import numpy as np
import pytest
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.data.tfrecord import DatasetError, SplitWriter, iterate_records, read_info


def make_records():
    png = tf.io.encode_png(np.full((4, 4, 3), 7, np.uint8)).numpy()
    return [
        schema.FaceRecord(png, identity=0, pose=3, occlusion=0, blur=1, ethnicity=2, yaw=4.5, source="a/1.png"),
        schema.FaceRecord(png, identity=2, source="b/ü.png"),  # every variation unknown, yaw NaN
        schema.FaceRecord(b"\xff\xd8 not really a jpeg", identity=2, pose=6, occlusion=4, blur=3, ethnicity=0,
                          yaw=-75.25, source="c"),
    ]


def test_round_trip_keeps_every_field_and_histograms_match(tmp_path):
    records = make_records()
    writer = SplitWriter(str(tmp_path), "train", num_shards=2, image_size=4)
    writer.write_shard(0, records[:2])
    writer.write_shard(1, records[2:])
    info = writer.finish({"tool": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dataset.json", "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    back = list(iterate_records(str(tmp_path)))
    for original, read in zip(records, back):
        for field in ("image", "identity", "pose", "occlusion", "blur", "ethnicity", "source"):
            assert getattr(read, field) == getattr(original, field), field
        assert (math.isnan(read.yaw) and math.isnan(original.yaw)) or read.yaw == original.yaw
    stored = json.loads((tmp_path / "dataset.json").read_text())
    assert stored["schema_version"] == 1 and stored["num_images"] == 3 and stored["num_identities"] == 3
    assert stored["images_per_identity"] == [1, 0, 2]
    for factor in schema.FACTORS:
        counts = [sum(getattr(r, factor) == c for r in back) for c in range(schema.NUM_CLASSES[factor])]
        assert stored["histograms"][factor] == counts
        assert stored["unknown"][factor] == sum(getattr(r, factor) == -1 for r in back)
    assert read_info(str(tmp_path)) == info


def test_out_of_range_label_is_refused():
    with pytest.raises(ValueError, match="label/pose=7"):
        schema.encode_record(schema.FaceRecord(b"", identity=0, pose=7, source="x.jpg"))


def test_bad_folders_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_info(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        read_info(str(tmp_path))
    writer = SplitWriter(str(tmp_path), "train", 1, 4)
    writer.write_shard(0, make_records())
    writer.finish({})
    data = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(DatasetError, match="schema_version 2"):
        read_info(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    (tmp_path / "train-00000-of-00001.tfrecord").unlink()
    with pytest.raises(DatasetError, match="train-00000-of-00001.tfrecord, which is missing"):
        read_info(str(tmp_path))


def test_pose_bins_follow_the_table():
    cases = {-90: 0, -60: 1, -35.1: 1, -35: 2, -15: 3, 0: 3, 15: 3, 15.01: 4, 35: 4, 35.5: 5, 60: 5, 60.5: 6}
    assert {yaw: schema.pose_bin(yaw) for yaw in cases} == cases
    assert schema.pose_bin(float("nan")) == -1
