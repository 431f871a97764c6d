import collections

import numpy as np

from mvcom_tf.data import schema, synthetic
from mvcom_tf.data.tfrecord import iterate_records, read_info
from mvcom_tf.evaluation.verification import read_pairs


def test_same_seed_gives_identical_bytes(tmp_path):
    config = synthetic.SplitConfig(num_identities=8, image_size=32, seed=5, max_images=6, min_images=2)
    synthetic.write_split(str(tmp_path / "a"), "train", config, num_shards=2)
    synthetic.write_split(str(tmp_path / "b"), "train", config, num_shards=2)
    for name in ("train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = synthetic.SplitConfig(num_identities=8, image_size=32, seed=6, max_images=6, min_images=2)
    synthetic.write_split(str(tmp_path / "c"), "train", other, num_shards=2)
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_train_split_is_long_tailed_as_configured(tiny_data):
    info = read_info(str(tiny_data / "train"))
    counts = np.sort(info.images_per_identity)[::-1]
    ranks = np.arange(1, 61)
    np.testing.assert_array_equal(counts, np.round(4 + 16 * ranks ** -0.5))
    config = synthetic.SplitConfig(num_identities=60)
    for factor, probs in (("pose", config.pose_probs), ("occlusion", config.occlusion_probs),
                          ("blur", config.blur_probs)):
        histogram = np.array(info.histograms[factor])
        assert int(np.argmax(histogram)) == synthetic.HEAD_CLASS[factor]
        # The head class holds about its configured share of the images (binomial 4-sigma band).
        p, n = max(probs), info.num_images
        assert abs(histogram.max() - p * n) < 4 * np.sqrt(n * p * (1 - p)) + 1
    group_of = {r.identity: r.ethnicity for r in iterate_records(str(tiny_data / "train"))}
    identities_per_group = collections.Counter(group_of.values())
    assert identities_per_group.most_common(1)[0] == (synthetic.HEAD_CLASS["ethnicity"], identities_per_group[2])
    assert identities_per_group[2] > 0.5 * len(group_of)


def test_meta_split_is_balanced(tiny_data):
    info = read_info(str(tiny_data / "meta"))
    assert info.histograms["ethnicity"] == [24, 24, 24, 24]
    for factor in ("pose", "occlusion", "blur"):
        assert min(info.histograms[factor]) > 0


def global_ids(folder):
    return {r.source.split(":")[3] for r in iterate_records(str(folder))}


def test_splits_share_no_identity_and_test_pairs_are_balanced(tiny_data):
    train, meta, test = (global_ids(tiny_data / s) for s in ("train", "meta", "test"))
    assert len(train) == 60 and len(meta) == 16 and len(test) == 16
    assert not (train & meta or train & test or meta & test)
    pairs = read_pairs(str(tiny_data / "test" / "pairs.csv"))
    records = list(iterate_records(str(tiny_data / "test")))
    for factor in schema.FACTORS:
        counts = collections.Counter(pairs[factor][pairs[factor] >= 0])
        assert sorted(counts) == list(range(schema.NUM_CLASSES[factor]))
        assert len(set(counts.values())) == 1, (factor, counts)
        for c in counts:
            same = pairs["same"][pairs[factor] == c]
            assert same.sum() * 2 == len(same)
    for a, b, same, pose, occlusion, blur, ethnicity in zip(*pairs.values()):
        ra, rb = records[a], records[b]
        assert (ra.identity == rb.identity) == bool(same)
        assert (ra.pose, ra.occlusion, ra.blur) == (3, 0, 0)
        assert ra.ethnicity == rb.ethnicity == ethnicity
        for factor, label in (("pose", pose), ("occlusion", occlusion), ("blur", blur)):
            if label >= 0:
                assert getattr(rb, factor) == label
