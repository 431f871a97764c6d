"""The pure-Python RecordIO reader on files built byte by byte from the documented layout."""

import os
import struct

import pytest

from mvcom_tf.data import recordio
from tests import recordio_files


def test_header_layout_with_a_record_split_in_three_parts(tmp_path):
    images = recordio_files.write_package(str(tmp_path), [3, 1, 2], header=True, magic_in=(1, 0))
    split_key = 4  # identity 1's only image: keys 1-3 are identity 0
    rec, idx, prop = recordio.rec_paths(str(tmp_path))
    raw = open(rec, "rb").read()
    # The file really holds a 3-part record (flags 1, 2, 3) for that key.
    offset = recordio.read_index(idx)[split_key]
    assert struct.unpack_from("<I", raw, offset + 4)[0] >> 29 == 1
    with recordio.RecordIOReader(rec, idx) as reader:
        layout = recordio.read_layout(reader)
        assert layout.has_header
        assert list(layout.image_keys) == [1, 2, 3, 4, 5, 6]
        assert layout.identity_ranges == {0: (1, 4), 1: (4, 5), 2: (5, 7)}
        record = reader.read(split_key)
        assert record.image == images[split_key]
        assert recordio_files.MAGIC in record.image
        assert record.flag == 2 and record.labels == (1.0, 0.0)
        for key, image in images.items():
            assert reader.read(key).image == image
        # Sequential reading without the index sees the same logical records.
        payloads = [payload for _, payload in reader.scan()]
    assert len(payloads) == 1 + 6 + 3
    assert recordio.unpack(payloads[split_key]).image == images[split_key]
    assert recordio.read_property(prop) == (3, 24, 24)


def test_headerless_layout_scalar_labels(tmp_path):
    images = recordio_files.write_package(str(tmp_path), [2, 2], header=False)
    rec, idx, _ = recordio.rec_paths(str(tmp_path))
    with recordio.RecordIOReader(rec, idx) as reader:
        layout = recordio.read_layout(reader)
        assert not layout.has_header and layout.identity_ranges == {}
        assert list(layout.image_keys) == [0, 1, 2, 3]
        labels = [reader.read(key).label for key in layout.image_keys]
        assert [reader.read(key).image for key in layout.image_keys] == [images[k] for k in range(4)]
    assert labels == [0.0, 0.0, 1.0, 1.0]


def test_bad_magic_and_truncation_name_the_file_and_offset(tmp_path):
    recordio_files.write_package(str(tmp_path), [2, 2], header=False)
    rec, idx, _ = recordio.rec_paths(str(tmp_path))
    offsets = recordio.read_index(idx)
    raw = bytearray(open(rec, "rb").read())
    raw[offsets[2]:offsets[2] + 4] = b"\0\0\0\0"
    open(rec, "wb").write(bytes(raw))
    with recordio.RecordIOReader(rec, idx) as reader:
        assert reader.read(1).label == 0.0
        with pytest.raises(recordio.RecordIOError, match=rf"train\.rec: bad magic 0x00000000 at byte {offsets[2]}"):
            reader.read(2)
    open(rec, "wb").write(bytes(raw[:offsets[3] + 20]))
    with recordio.RecordIOReader(rec, idx) as reader:
        with pytest.raises(recordio.RecordIOError, match=rf"truncated record at byte {offsets[3]}"):
            reader.read(3)
    with open(idx, "a") as f:
        f.write("seven\t12\n")
    with pytest.raises(recordio.RecordIOError, match=r"train\.idx line 5: expected 'key<TAB>offset'"):
        recordio.read_index(idx)
    assert os.path.exists(rec)
