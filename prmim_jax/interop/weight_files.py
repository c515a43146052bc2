"""Reading and writing flat ``{name: array}`` weight files in PyTorch's formats.

- ``.safetensors``: read and written with ``safetensors.numpy`` (no torch needed).
- ``.pth`` / ``.pt`` / ``.bin`` (``torch.save`` zip archives): read without
  torch by a restricted unpickler that only rebuilds tensors, so importing an
  official MAE checkpoint on a TPU VM needs no PyTorch and runs no code from
  the file; written without torch too, as ``torch.save`` lays out a dict of
  tensors (``_write_torch_zip``), so exporting for PyTorch tools needs no
  PyTorch either and the file loads with ``torch.load(..., weights_only=True)``.

A ``torch.save`` file may hold more than weights (MAE's training checkpoints
carry ``optimizer``, ``epoch`` and an ``argparse.Namespace``); ``read`` returns
the state dict found under ``key`` (default ``'model'``) or the top level.
``read(..., data=False)`` reads the names, shapes and dtypes alone (the pickle, or
the safetensors header), so that a file can be checked before it is loaded.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class WeightFileError(ValueError):
    """A weight file that cannot be read as a flat state dict."""


class _Opaque:
    """Stands in for any non-tensor object in a pickle (e.g. ``argparse.Namespace``); never executed."""

    def __init__(self, *args, **kwargs):
        del args, kwargs

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, shape, stride, *unused):
    del unused
    array, itemsize = storage
    if not shape:
        return np.array(array[offset])
    byte_strides = tuple(s * itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(array[offset:], shape=tuple(shape), strides=byte_strides)
    return np.ascontiguousarray(view)


def _tensor_stand_in(storage, offset, shape, stride, *unused):
    """``_rebuild_tensor`` without the data: zeros of the tensor's shape and dtype that take no memory."""
    del offset, stride, unused
    return np.broadcast_to(storage, tuple(shape))


def _rebuild_parameter(tensor, *unused):
    del unused
    return tensor


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds the tensors of a ``torch.save`` pickle as numpy arrays, or (``data=False``) as ``_tensor_stand_in``s
    without reading a storage."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, data: bool = True):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._data = data
        self._storages = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor if self._data else _tensor_stand_in
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name == "device":
            return str
        return _Opaque

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage":
            raise WeightFileError(f"unsupported persistent id {kind!r} in a torch.save archive")
        if not isinstance(dtype, type):  # torch >= 2 may pickle a dtype object; we only know storage classes
            raise WeightFileError(f"unsupported storage type {dtype!r}")
        if not self._data:
            return np.zeros((), dtype)
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            self._storages[key] = (np.frombuffer(raw, dtype=dtype), np.dtype(dtype).itemsize)
        return self._storages[key]


def _read_torch_zip(path: str, data: bool = True):
    if not zipfile.is_zipfile(path):
        raise WeightFileError(
            f"{path} is not a torch.save zip archive (the format of PyTorch >= 1.6); "
            "re-save it with a current PyTorch or convert it to .safetensors."
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise WeightFileError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
            raise WeightFileError(f"{path} was saved big-endian; only little-endian archives are supported.")
        with archive.open(pickles[0]) as file:
            return _TorchUnpickler(file, archive, prefix, data).load()


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def read(path: str | os.PathLike, key: str | tuple[str, ...] = "model", data: bool = True) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` from a ``.safetensors`` file or a ``torch.save`` archive.

    For a ``torch.save`` archive holding a dict with ``key`` (MAE's
    ``{'model': state_dict, ...}``) returns that entry, else the top level;
    a tuple of keys takes the first the dict holds (DINO's and iBOT's
    ``'teacher'``, ``'state_dict'``). Raises ``WeightFileError`` naming the
    problem when neither is a state dict. ``data=False``: every array is a
    read-only stand-in of zeros with the tensor's shape and dtype that takes no
    memory (``np.broadcast_to``), and no tensor data is read.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path, data)
    obj = _read_torch_zip(path, data)
    keys = (key,) if isinstance(key, str) else tuple(key)
    held = [k for k in keys if isinstance(obj, dict) and k in obj]
    if held:
        obj = obj[held[0]]
    if not _is_state_dict(obj):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise WeightFileError(f"{path} holds no state dict under {key!r} or at the top level (found {found}).")
    return dict(obj)


# safetensors' dtype names (``safe_open(...).get_slice(name).get_dtype()``) -> numpy dtypes.
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors(path: str, data: bool) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if data:
        return dict(load_file(path))
    with safe_open(path, framework="numpy") as file:
        slices = {name: file.get_slice(name) for name in file.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return {
            name: np.broadcast_to(np.zeros((), _SAFETENSORS_DTYPES[tensor.get_dtype()]), tuple(tensor.get_shape()))
            for name, tensor in slices.items()
        }


def write(state_dict: dict[str, np.ndarray], path: str | os.PathLike, key: str | None = "model") -> None:
    """Writes ``state_dict`` as ``.safetensors`` or, for other suffixes, as ``torch.save({key: ...})`` would
    (``key=None``: the state dict itself at the top level, as the mm* converters save theirs).

    The file is written beside its destination and renamed into place, so an
    interrupted write never leaves a truncated file where a good one was.
    """
    path = os.fspath(path)
    arrays = {name: np.asarray(value, order="C") for name, value in state_dict.items()}  # 0-d stays 0-d
    partial = f"{path}.partial"
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        # transformers refuses a safetensors file without this entry ("does not contain the valid metadata").
        save_file(arrays, partial, metadata={"format": "pt"})
    else:
        _write_torch_zip(arrays, partial, key)
    # safetensors creates its file owner-only (0600); give it the mode any new file gets here, as torch.save's would.
    os.chmod(partial, 0o666 & ~_umask())
    os.replace(partial, path)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


# numpy dtype -> the legacy storage class that ``torch.save`` pickles for it (``_STORAGE_DTYPES`` inverted).
_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in _STORAGE_DTYPES.items()}
# torch.save aligns every tensor record to 64 bytes so that it can be memory-mapped.
_RECORD_ALIGNMENT = 64
_ARCHIVE = "archive"


def _write_torch_zip(arrays: dict[str, np.ndarray], path: str, key: str | None) -> None:
    """``torch.save(obj)`` without torch: ``obj`` is ``{key: OrderedDict(name -> tensor)}`` (or the OrderedDict).

    The archive holds what ``torch.save`` writes (``archive/data.pkl``, one
    ``archive/data/{i}`` record per tensor, ``byteorder``, ``version``), stored
    uncompressed with 64-byte aligned records; the pickle references only
    ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the
    storage classes, the globals ``torch.load(weights_only=True)`` allows.
    """
    unknown = sorted({str(a.dtype) for a in arrays.values() if a.dtype not in _STORAGE_NAMES})
    if unknown:
        raise WeightFileError(f"no PyTorch storage for dtype(s) {unknown}; cast the arrays to float32 first.")
    if any(a.dtype.byteorder == ">" for a in arrays.values()):
        raise WeightFileError(
            "big-endian arrays cannot be written; convert them with arr.astype(arr.dtype.newbyteorder('<'))."
        )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        _add_record(archive, f"{_ARCHIVE}/data.pkl", _tensor_dict_pickle(arrays, key))
        _add_record(archive, f"{_ARCHIVE}/byteorder", b"little")
        for i, array in enumerate(arrays.values()):
            _add_record(archive, f"{_ARCHIVE}/data/{i}", array.tobytes())
        _add_record(archive, f"{_ARCHIVE}/version", b"3\n")


def _add_record(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """One stored record whose data starts on a ``_RECORD_ALIGNMENT`` boundary (padding in the extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    header = 30 + len(name.encode()) + 4  # local file header, name, the extra field's own id and size
    padding = -(archive.fp.tell() + header) % _RECORD_ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, padding) + b"\0" * padding  # id 'FB', as torch's writer uses
    archive.writestr(info, data)


def _tensor_dict_pickle(arrays: dict[str, np.ndarray], key: str | None) -> bytes:
    """Pickle protocol 2 of ``{key: OrderedDict(name -> tensor)}``, written opcode by opcode so that no torch
    class has to exist here; storage ``i`` is persistent id ``('storage', <class>, 'i', 'cpu', numel)``."""
    out = io.BytesIO()
    out.write(pickle.PROTO + b"\x02")
    if key is not None:
        out.write(pickle.EMPTY_DICT)
        _pickle_str(out, key)
    _pickle_empty_ordered_dict(out)
    out.write(pickle.MARK)
    for i, (name, array) in enumerate(arrays.items()):
        _pickle_str(out, name)
        out.write(pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n")
        out.write(pickle.MARK)
        out.write(pickle.MARK)  # the storage's persistent id
        _pickle_str(out, "storage")
        out.write(pickle.GLOBAL + f"torch\n{_STORAGE_NAMES[array.dtype]}\n".encode())
        _pickle_str(out, str(i))
        _pickle_str(out, "cpu")
        _pickle_int(out, array.size)
        out.write(pickle.TUPLE + pickle.BINPERSID)
        _pickle_int(out, 0)  # storage offset
        _pickle_int_tuple(out, array.shape)
        _pickle_int_tuple(out, tuple(s // array.itemsize for s in array.strides) if array.ndim else ())
        out.write(pickle.NEWFALSE)  # requires_grad
        _pickle_empty_ordered_dict(out)  # backward hooks
        out.write(pickle.TUPLE + pickle.REDUCE)
    out.write(pickle.SETITEMS)
    if key is not None:
        out.write(pickle.SETITEM)
    out.write(pickle.STOP)
    return out.getvalue()


def _pickle_str(out: io.BytesIO, text: str) -> None:
    data = text.encode("utf-8")
    out.write(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)


def _pickle_int(out: io.BytesIO, value: int) -> None:
    if -(2**31) <= value < 2**31:
        out.write(pickle.BININT + struct.pack("<i", value))
    else:
        data = pickle.encode_long(value)
        out.write(pickle.LONG1 + bytes([len(data)]) + data)


def _pickle_int_tuple(out: io.BytesIO, values: tuple[int, ...]) -> None:
    if not values:
        out.write(pickle.EMPTY_TUPLE)
        return
    out.write(pickle.MARK)
    for value in values:
        _pickle_int(out, value)
    out.write(pickle.TUPLE)


def _pickle_empty_ordered_dict(out: io.BytesIO) -> None:
    out.write(pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE)
