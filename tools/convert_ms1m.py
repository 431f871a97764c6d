"""insightface RecordIO (MS-Celeb-1M's train.rec/.idx/property) -> TFRecord schema v1, image bytes copied unchanged.

    python tools/convert_ms1m.py --rec_dir=faces_emore --out_dir=data/ms1m/train \
        --labels=ms1m_labels.csv --exclude_identities=overlap.txt --num_shards=512 --workers=8

`source` in --labels is the record's key in train.rec; --exclude_identities lists labels as stored
in the .rec (before the remapping to 0..C-1; dataset.json's extras.identity_names maps back).
"""

from __future__ import annotations

from absl import app, flags

from mvcom_tf.data import conversion, sources


def main(argv) -> int:
    del argv
    return conversion.run_tool(lambda: sources.RecordIOSource(flags.FLAGS.rec_dir, flags.FLAGS.skip_corrupt),
                               "tools/convert_ms1m.py")


if __name__ == "__main__":
    conversion.define_flags()
    flags.DEFINE_string("rec_dir", None, "Folder holding train.rec, train.idx and property.", required=True)
    flags.DEFINE_bool("skip_corrupt", False, "Skip and count corrupt records (bad magic, truncated) instead of "
                      "stopping at the first one.")
    app.run(main)
