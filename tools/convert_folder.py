"""Any `root/<identity>/<image>` tree of photographs -> TFRecord schema v1, faces detected or landmark-aligned.

    python tools/convert_folder.py --root=my_photos --out_dir=data/my_faces/train          # detect, align
    python tools/convert_folder.py --root=my_faces --out_dir=... --landmarks=landmarks.csv  # align by rows
    python tools/convert_folder.py --root=aligned_112 --out_dir=... --align=none            # already aligned

--align: detect (the default without --landmarks: MTCNN's 5 landmarks, a landmark row where one
exists), landmarks (the default with --landmarks: images without a row are skipped) or none
(resize). --landmarks is a CSV `NAME_ID,P1X,P1Y,...,P5X,P5Y` with NAME_ID = `<identity>/<image
without extension>` (VGGFace2's layout). `source` in --labels is `<identity>/<image file name>`.
Images: JPEG, PNG, BMP, GIF, WebP, PGM/PPM/PBM, TIFF and what else Pillow opens.
"""

from __future__ import annotations

from absl import app, flags

from mvcom_tf.data import conversion, sources


def main(argv) -> int:
    del argv
    options = flags.FLAGS
    align = options.align or ("landmarks" if options.landmarks else "detect")
    return conversion.run_tool(
        lambda: sources.FolderSource(options.root, options.landmarks, align=align, **sources.image_options_from_flags()),
        "tools/convert_folder.py")


if __name__ == "__main__":
    conversion.define_flags()
    sources.define_image_flags()
    flags.DEFINE_string("root", None, "Folder of <identity>/<image> subfolders.", required=True)
    flags.DEFINE_string("landmarks", "", "Optional 5-point landmark CSV (NAME_ID,P1X,...,P5Y).")
    flags.DEFINE_enum("align", None, list(sources.ALIGN_MODES), "detect: MTCNN landmarks (a landmark row wins); "
                      "landmarks: the landmark file's rows only; none: resize (already aligned faces). Default: "
                      "landmarks with --landmarks, else detect.")
    app.run(main)
