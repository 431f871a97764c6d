"""PyTorch checkpoints (`torch.save` since PyTorch 1.6) read without torch: tensors come back as numpy arrays.

The file is a zip archive: `<name>/data.pkl` (a pickle whose tensors refer to storages by
persistent id), `<name>/data/<key>` (each storage's raw bytes), `<name>/byteorder`. The pickle
is read by an unpickler that resolves only what a state dict needs (tensor and parameter
rebuilds, the storage types, OrderedDict) and refuses anything else before it runs.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np
import tensorflow as tf

# Storage types by name (torch.<Name>Storage), as numpy dtypes; bfloat16 from ml_dtypes (TensorFlow's own).
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
    """A file that is not a readable PyTorch checkpoint, or a pickle that asks for something not allowed."""


class _Storage:
    """A storage type named in the pickle (`torch.FloatStorage`, ...): only its dtype matters here."""

    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a view of the storage (element offset and strides), copied."""
    if not size:
        return storage[offset].copy()
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad=None, backward_hooks=None, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_parameter: a Parameter is its data here."""
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _Storage(name) for name in STORAGE_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.byteorder, self.path = archive, prefix, byteorder, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise CheckpointError(f"{self.path}: refusing {module}.{name}: a state dict needs only tensors, "
                                  "storages, OrderedDict and plain containers")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r} (expected a storage reference)")
        storage_type, key = pid[1], str(pid[2])
        if key not in self.storages:
            member = f"{self.prefix}/data/{key}"
            try:
                raw = self.archive.read(member)
            except KeyError:
                raise CheckpointError(f"{self.path}: storage {member} is missing from the archive") from None
            dtype = np.dtype(storage_type.dtype).newbyteorder("<" if self.byteorder == "little" else ">")
            if len(raw) % dtype.itemsize:
                raise CheckpointError(f"{self.path}: storage {member} has {len(raw)} bytes, not a whole number of "
                                      f"{storage_type.name} elements")
            self.storages[key] = np.frombuffer(raw, dtype).astype(np.dtype(storage_type.dtype).newbyteorder("="))
        return self.storages[key]


def load(path: str):
    """The object `torch.save` wrote to `path` (zip format), tensors as numpy arrays (bfloat16 as float32)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    if data[:1] == b"\x80":  # a bare pickle: the pre-1.6 format starts with a pickled magic number
        raise CheckpointError(f"{path}: a pre-1.6 (legacy, non-zip) PyTorch file; load it with torch and "
                              "torch.save it again with PyTorch >= 1.6")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or a truncated one ({error})") from None
    pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: expected one <name>/data.pkl in the archive, found {len(pickles)}")
    prefix = pickles[0].split("/")[0]
    byteorder = "little"
    if f"{prefix}/byteorder" in names:
        byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
    try:
        unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix, byteorder, path)
        loaded = unpickler.load()
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path}: a truncated or damaged archive ({error})") from None
    except (pickle.UnpicklingError, EOFError) as error:
        raise CheckpointError(f"{path}: {pickles[0]} is not a readable pickle ({error})") from None
    return _to_float32(loaded)


def _to_float32(value):
    """bfloat16 arrays as float32 (Keras variables are float32); containers walked."""
    if isinstance(value, np.ndarray) and value.dtype == ml_dtypes.bfloat16:
        return value.astype(np.float32)
    if isinstance(value, collections.OrderedDict):
        return collections.OrderedDict((k, _to_float32(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: _to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v) for v in value)
    return value
