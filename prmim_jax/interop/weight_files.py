"""Reading and writing flat ``{name: array}`` weight files in PyTorch's formats.

- ``.safetensors``: read and written with ``safetensors.numpy`` (no torch needed).
- ``.pth`` / ``.pt`` / ``.bin`` (``torch.save`` zip archives): read without
  torch by a restricted unpickler that only rebuilds tensors, so importing an
  official MAE checkpoint on a TPU VM needs no PyTorch and runs no code from
  the file. Writing uses ``torch.save`` (torch is imported only then).

A ``torch.save`` file may hold more than weights (MAE's training checkpoints
carry ``optimizer``, ``epoch`` and an ``argparse.Namespace``); ``read`` returns
the state dict found under ``key`` (default ``'model'``) or the top level.
"""

from __future__ import annotations

import collections
import os
import pickle
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


def _rebuild_parameter(tensor, *unused):
    del unused
    return tensor


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._storages = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
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
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            self._storages[key] = (np.frombuffer(raw, dtype=dtype), np.dtype(dtype).itemsize)
        return self._storages[key]


def _read_torch_zip(path: str):
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
            return _TorchUnpickler(file, archive, prefix).load()


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def read(path: str | os.PathLike, key: str | tuple[str, ...] = "model") -> dict[str, np.ndarray]:
    """``{name: ndarray}`` from a ``.safetensors`` file or a ``torch.save`` archive.

    For a ``torch.save`` archive holding a dict with ``key`` (MAE's
    ``{'model': state_dict, ...}``) returns that entry, else the top level;
    a tuple of keys takes the first the dict holds (DINO's and iBOT's
    ``'teacher'``, ``'state_dict'``). Raises ``WeightFileError`` naming the
    problem when neither is a state dict.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    obj = _read_torch_zip(path)
    keys = (key,) if isinstance(key, str) else tuple(key)
    held = [k for k in keys if isinstance(obj, dict) and k in obj]
    if held:
        obj = obj[held[0]]
    if not _is_state_dict(obj):
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise WeightFileError(f"{path} holds no state dict under {key!r} or at the top level (found {found}).")
    return dict(obj)


def write(state_dict: dict[str, np.ndarray], path: str | os.PathLike, key: str = "model") -> None:
    """Writes ``state_dict`` as ``.safetensors`` or, for other suffixes, as ``torch.save({key: ...})``.

    The file is written beside its destination and renamed into place, so an
    interrupted write never leaves a truncated file where a good one was.
    """
    path = os.fspath(path)
    arrays = {name: np.ascontiguousarray(value) for name, value in state_dict.items()}
    partial = f"{path}.partial"
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, partial)
    else:
        try:
            import torch
        except ImportError as error:
            raise WeightFileError(
                f"writing {path} needs PyTorch (pip install torch); or export to .safetensors, which needs none."
            ) from error
        tensors = collections.OrderedDict((name, torch.from_numpy(value.copy())) for name, value in arrays.items())
        torch.save({key: tensors}, partial)
    os.replace(partial, path)
