"""Any `root/<identity>/<image>` tree -> TFRecord schema v1, aligned by 5-point landmarks when given.

    python tools/convert_folder.py --root=my_faces --out_dir=data/my_faces/train \
        --landmarks=landmarks.csv --labels=labels.csv

--landmarks is a CSV `NAME_ID,P1X,P1Y,...,P5X,P5Y` with NAME_ID = `<identity>/<image without
extension>` (VGGFace2's layout); without it faces are resized to --image_size. `source` in
--labels is `<identity>/<image file name>`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from mvcom_tf.data import conversion, sources


def main(argv) -> int:
    del argv
    return conversion.run_tool(
        lambda: sources.FolderSource(flags.FLAGS.root, flags.FLAGS.landmarks, **sources.image_options_from_flags()),
        "tools/convert_folder.py")


if __name__ == "__main__":
    conversion.define_flags()
    sources.define_image_flags()
    flags.DEFINE_string("root", None, "Folder of <identity>/<image> subfolders.", required=True)
    flags.DEFINE_string("landmarks", "", "Optional 5-point landmark CSV (NAME_ID,P1X,...,P5Y).")
    app.run(main)
