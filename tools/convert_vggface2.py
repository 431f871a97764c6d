"""VGGFace2 as distributed -> aligned 112x112 TFRecord schema v1 with yaw, pose and blur labels.

    python tools/convert_vggface2.py --root=vggface2 --out_dir=data/vggface2/meta --split=meta \
        --labels=vggface2_labels.csv --exclude_identities=shared_with_ms1m.txt

Reads `<root>/<subset>/<n000002>/<0001_01>.jpg` and `<root>/bb_landmark/loose_landmark_<subset>.csv`;
images without a landmark row are aligned by the face MTCNN detects (--align=detect, the default;
counted as `detected` in report.json) or skipped (--align=landmarks). `source` in --labels is `n000002/0001_01.jpg`.
"""

from __future__ import annotations

from absl import app, flags

from mvcom_tf.data import conversion, sources


def main(argv) -> int:
    del argv
    options = flags.FLAGS
    return conversion.run_tool(lambda: sources.vggface2(options.root, options.subset, options.align,
                                                        **sources.image_options_from_flags()),
                               "tools/convert_vggface2.py")


if __name__ == "__main__":
    conversion.define_flags()
    sources.define_image_flags()
    flags.DEFINE_string("root", None, "VGGFace2 folder (holding train/, test/ and bb_landmark/).", required=True)
    flags.DEFINE_enum("subset", "train", ["train", "test"], "Which of VGGFace2's subsets to convert.")
    flags.DEFINE_enum("align", "detect", ["detect", "landmarks"], "Images without a landmark row: detect the face "
                      "(MTCNN) or skip them (no_landmarks).")
    app.run(main)
