import numpy as np
import tensorflow as tf

from mvcom_tf.data import schema
from mvcom_tf.data.pipeline import (DecodeFailures, balanced_acceptance, eval_dataset, looks_complete,
                                    normalize_images, train_dataset)
from mvcom_tf.data.augmentation import VariationAugmentation
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
                                augment=VariationAugmentation(blur_prob=0.5, occlusion_prob=0.5))
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


def skewed_records(count=400):
    """Pose 3 in 9 of 10 records, pose 0 in 1 of 10; blur 0 in 3 of 4, blur 2 in 1 of 4; identity = index."""
    return [schema.FaceRecord(png(i % 250), identity=i, pose=0 if i % 10 == 0 else 3, blur=2 if i % 4 == 0 else 0,
                              occlusion=-1, ethnicity=-1, source=str(i)) for i in range(count)]


def test_balanced_sampling_draws_the_mixture_over_factors(tmp_path):
    info = write(tmp_path, skewed_records())
    keep = balanced_acceptance(info.histograms)
    # By hand: w_pose(0) = 1 / (7 * 0.1), w_pose(3) = 1 / (7 * 0.9), w_blur(2) = 1 / (4 * 0.25),
    # w_blur(0) = 1 / (4 * 0.75); unknown factors weigh 1; the ceiling is the mean of the largest weights.
    weights = {"pose": {0: 1 / 0.7, 3: 1 / 6.3}, "blur": {2: 1.0, 0: 1 / 3.0}}
    ceiling = (1 / 0.7 + 1.0 + 1.0 + 1.0) / 4
    labels = {"pose": tf.constant([0, 3, 3]), "blur": tf.constant([2, 0, 2]), "occlusion": tf.constant([-1] * 3),
              "ethnicity": tf.constant([-1] * 3)}
    expected = [(weights["pose"][p] + weights["blur"][b] + 2.0) / 4 / ceiling for p, b in ((0, 2), (3, 0), (3, 2))]
    np.testing.assert_allclose(keep(labels).numpy(), expected, rtol=1e-6)
    dataset = train_dataset(str(tmp_path), info, batch_size=50, image_size=8, seed=0, epoch=0,
                            shuffle_buffer=400, keep_probability=keep)
    poses = np.concatenate([batch["pose"].numpy() for batch in dataset.take(40)])
    # Kept with probability proportional to p(x) w(x): pose 0's share is 0.1 w(0, .) / E[w] over the records.
    record_weights = [(weights["pose"][0 if i % 10 == 0 else 3] + weights["blur"][2 if i % 4 == 0 else 0] + 2) / 4
                      for i in range(400)]
    share = sum(w for i, w in enumerate(record_weights) if i % 10 == 0) / sum(record_weights)
    assert share > 0.14  # against 0.1 in the natural stream (two unlabelled factors dilute the mixture)
    profile = np.isin(poses, [0, 6])  # the flip mirrors pose 0 into pose 6
    assert abs(np.mean(profile) - share) < 4 * np.sqrt(share * (1 - share) / len(poses))


def test_balanced_sampling_resumes_with_the_records_an_uninterrupted_run_kept(tmp_path):
    info = write(tmp_path, skewed_records(80))
    keep = balanced_acceptance(info.histograms)

    def identities(skip_records):
        dataset = train_dataset(str(tmp_path), info, batch_size=4, image_size=8, seed=3, epoch=1,
                                skip_records=skip_records, shuffle_buffer=80, keep_probability=keep)
        return [b["identity"].numpy().tolist() for b in dataset.take(30 - skip_records // 4)]

    whole = identities(0)
    assert identities(20) == whole[5:]
    assert len(set(sum(whole, []))) < 80  # records repeat: a balanced pass is not a permutation


def test_groups_of_k_images_of_one_identity(tmp_path):
    records = [schema.FaceRecord(png(i), identity=i % 7, source=str(i)) for i in range(70)]
    info = write(tmp_path, records)
    dataset = train_dataset(str(tmp_path), info, batch_size=12, image_size=8, seed=0, epoch=0, shuffle_buffer=70,
                            group_size=3)
    for batch in dataset.take(5):
        runs = batch["identity"].numpy().reshape(4, 3)
        assert (runs == runs[:, :1]).all()
    try:
        train_dataset(str(tmp_path), info, batch_size=10, image_size=8, seed=0, epoch=0, group_size=3)
    except ValueError as error:
        assert "does not hold whole groups of 3" in str(error)
    else:
        raise AssertionError("a batch of 10 cannot hold groups of 3")
