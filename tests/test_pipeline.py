import numpy as np
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.data.pipeline import DecodeFailures, eval_dataset, looks_complete, normalize_images, train_dataset
from mvcom_tf.data.synthesis import VariationSynthesis
from mvcom_tf.data.tfrecord import SplitWriter, read_info


def png(value):
    return tf.io.encode_png(np.full((8, 8, 3), value, np.uint8)).numpy()


def write(tmp_path, records):
    writer = SplitWriter(str(tmp_path), "train", 1, 8)
    writer.write_shard(0, records)
    writer.finish({})
    return read_info(str(tmp_path))


def test_undecodable_images_are_dropped_and_counted(tmp_path):
    good = png(200)
    jpeg = tf.io.encode_jpeg(np.full((8, 8, 3), 100, np.uint8)).numpy()
    records = [schema.FaceRecord(good, identity=i, source=f"{i}") for i in range(6)]
    records[1].image = good[: len(good) // 2]          # truncated PNG
    records[3].image = jpeg[:-20]                     # truncated JPEG
    records[4].image = b"GIF89a garbage"               # neither format
    records[5].image = jpeg + b"\x00\x00"              # valid JPEG with padding after its end marker
    info = write(tmp_path, records)
    failures = DecodeFailures()
    dataset = train_dataset(str(tmp_path), info, batch_size=1, image_size=8, seed=0, epoch=0,
                            failures=failures, shuffle_buffer=1)
    seen = [int(batch["identity"][0]) for batch in dataset.take(6)]
    assert sorted(set(seen)) == [0, 2, 5]
    assert int(failures.count.numpy()) >= 3
    assert list(looks_complete(tf.constant([r.image for r in records])).numpy()) == [
        True, False, True, False, False, True]


def test_flip_mirrors_pose_and_yaw_and_normalises(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 255  # left half white
    records = [schema.FaceRecord(tf.io.encode_png(image).numpy(), identity=0, pose=1, yaw=-40.0, source=str(i))
               for i in range(64)]
    info = write(tmp_path, records)
    batch = next(iter(train_dataset(str(tmp_path), info, batch_size=64, image_size=8, seed=1, epoch=0)))
    flipped = batch["image"][:, 0, 0, 0].numpy() < 0  # left column dark after mirroring
    assert 16 < flipped.sum() < 48
    np.testing.assert_array_equal(batch["pose"].numpy(), np.where(flipped, 5, 1))
    np.testing.assert_array_equal(batch["yaw"].numpy(), np.where(flipped, 40.0, -40.0))
    assert np.allclose(batch["image"].numpy().max(), (255 - 127.5) / 128)
    assert float(normalize_images(tf.constant([127.5]))[0]) == 0.0


def test_resumed_epoch_continues_the_same_order(tmp_path):
    records = [schema.FaceRecord(png(i), identity=i, source=str(i)) for i in range(40)]
    info = write(tmp_path, records)

    def batches(skip_records):
        dataset = train_dataset(str(tmp_path), info, batch_size=4, image_size=8, seed=7, epoch=2,
                                skip_records=skip_records, shuffle_buffer=40,
                                augment=VariationSynthesis(blur_prob=0.5, occlusion_prob=0.5))
        return [(b["identity"].numpy().tolist(), b["image"].numpy(), b["blur"].numpy(), b["occlusion"].numpy())
                for b in dataset.take(10 - skip_records // 4)]

    whole, resumed = batches(0), batches(12)
    assert [batch[0] for batch in resumed] == [batch[0] for batch in whole[3:]]
    for a, b in zip(resumed, whole[3:]):
        for array_a, array_b in zip(a[1:], b[1:]):
            np.testing.assert_array_equal(array_a, array_b)  # same flips, blurs and occluders too
    assert sorted(sum((batch[0] for batch in whole), [])) == list(range(40))
    blur = np.concatenate([batch[2] for batch in whole])
    occlusion = np.concatenate([batch[3] for batch in whole])
    # Records without labels keep -1 unless a variation was applied.
    assert 0 < np.sum(blur > 0) < 40 and 0 < np.sum(occlusion > 0) < 40
    assert set(blur) <= {-1, 1, 2, 3} and set(occlusion) <= {-1, 1, 2, 3, 4}


def test_eval_dataset_keeps_stored_order(tiny_data):
    info = read_info(str(tiny_data / "test"))
    batch = next(iter(eval_dataset(str(tiny_data / "test"), info, 15, 32)))
    assert batch["image"].dtype == tf.uint8 and batch["image"].shape == (15, 32, 32, 3)
    assert batch["identity"].numpy().tolist() == [0] * 15
