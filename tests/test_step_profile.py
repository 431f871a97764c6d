"""benchmarks.step_profile: op events grouped, and a step's wall time attributed among concurrent ops."""

import pytest
import tensorflow as tf

from benchmarks.step_profile import GROUPS, op_group, profile, trace_shares, wall_attribution


@pytest.mark.parametrize("name,group", [
    ("gradient_tape/stage1_block1_conv1_1/convolution/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter",
     "convolutions"),
    ("stage1_block1_conv1_1/convolution:_MklNativeConv2D", "convolutions"),
    ("stage2_block1_bn2_1/moments/mean:Mean", "batchnorm"),
    ("gradient_tape/stage3_block4_downsample_bn_1/Tile:Tile", "batchnorm"),
    ("stem_bn_1/FusedBatchNormV3:_MklFusedBatchNormV3", "batchnorm"),
    ("output_features_1/batchnorm/mul:Mul", "batchnorm"),
    ("stage1_block1_bn1_1/Cast:Cast", "casts"),  # a cast is a cast wherever it sits
    ("stage4_block2_prelu_1/Relu_1:Relu", "prelu"),
    ("identity_head_1/MatMul:_MklMatMul", "identity_head"),
    ("SparseSoftmaxCrossEntropyWithLogits/x:SparseSoftmaxCrossEntropyWithLogits", "identity_head"),
    ("sgd/AssignAddVariableOp_90:AssignAddVariableOp", "optimizer"),
    ("ResourceApplyKerasMomentum_12:ResourceApplyKerasMomentum", "optimizer"),
    ("stage1_block1_pad_1/Pad:Pad", "rest"),
    ("gradient_tape/AddN_3:AddN", "rest"),
    ("transpose_7:Transpose", "layout"),
])
def test_op_group(name, group):
    assert op_group(name) == group


def test_wall_attribution_splits_concurrent_time_and_counts_the_gaps():
    # Window 0-100. conv 0-40 alone; conv 40-60 with bn (half each); bn 60-70 alone; nothing 70-80; an optimizer op
    # 80-120 clipped at 100; a cast before the window is ignored.
    intervals = [(0, 60, "convolutions"), (40, 70, "batchnorm"), (80, 120, "optimizer"), (-20, -5, "casts")]
    shares = wall_attribution((0, 100), intervals)
    assert set(shares) == set(GROUPS)
    assert shares["convolutions"] == pytest.approx(0.50)  # 40 + 20 / 2
    assert shares["batchnorm"] == pytest.approx(0.20)  # 20 / 2 + 10
    assert shares["no_op"] == pytest.approx(0.10)
    assert shares["optimizer"] == pytest.approx(0.20)
    assert shares["casts"] == 0.0 and sum(shares.values()) == pytest.approx(1.0)


def test_two_ops_of_one_group_at_once_share_the_instant():
    shares = wall_attribution((0, 10), [(0, 10, "convolutions"), (0, 10, "convolutions"), (0, 5, "prelu")])
    assert shares["convolutions"] == pytest.approx((5 * 2 / 3 + 5) / 10) and shares["prelu"] == pytest.approx(5 / 30)


def test_a_traced_step_is_read_back_into_its_groups(tmp_path):
    kernel = tf.Variable(tf.random.normal([3, 3, 8, 8]))

    @tf.function
    def step(images):
        outputs = tf.nn.conv2d(tf.cast(images, tf.bfloat16), tf.cast(kernel, tf.bfloat16), 1, "SAME")
        return tf.reduce_sum(tf.cast(outputs, tf.float32))

    images = tf.random.normal([4, 64, 64, 8])
    step(images)
    tf.profiler.experimental.start(str(tmp_path), tf.profiler.experimental.ProfilerOptions(host_tracer_level=2))
    for _ in range(2):
        step(images)
    tf.profiler.experimental.stop()
    shares, seconds = trace_shares(str(tmp_path))
    assert len(shares) == len(seconds) == 2 and all(s > 0 for s in seconds)
    for share in shares:
        assert sum(share.values()) == pytest.approx(1.0)
        assert share["convolutions"] > 0 and share["casts"] > 0


def test_profile_reports_a_step_whose_groups_add_up():
    row = profile("iresnet18", 32, 4, "float32", steps=1, repeats=1, changes=())  # Keras SGD, then put back
    from mvcom_tf.stages import build
    from mvcom_tf.training.momentum_sgd import MomentumSGD
    assert build.MomentumSGD is MomentumSGD
    assert sum(row["shares"].values()) == pytest.approx(1.0)
    assert row["shares"]["convolutions"] > 0.2 and row["shares"]["batchnorm"] > 0 and row["shares"]["optimizer"] > 0
