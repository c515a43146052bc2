"""Importing timm and mmsegmentation where two of their imports cannot load, for the export tests.

- timm imports ``torchvision`` at import time (``FrozenBatchNorm2d``, data transforms), which the
  ViT, BEiT and Swin models never call. PyPI's torchvision wheels for Linux are CUDA builds:
  beside the CPU torch wheel ``import torchvision`` fails ("operator torchvision::nms does not
  exist": its ``_C.so`` needs ``libc10_cuda.so``), and the CPU build is not on PyPI.
- mmsegmentation imports ``mmcv.ops`` (compiled CUDA/C++ ops: ``point_sample``) at import time,
  which the MAE, BEiT, ViT and Swin backbones never call; ``mmcv-lite`` ships mmcv without them,
  and the full ``mmcv`` is a source build against torch.

``install(name)`` makes ``import name`` (and its submodules) give a stand-in whose every
attribute is a placeholder class: enough for module-level imports and registries, and a call
into one fails loudly instead of computing anything. Nothing here replaces a module that the
compared models use.
"""

import importlib.machinery
import sys
import types


class _Placeholder:
    def __init__(self, *args, **kwargs):
        del args, kwargs

    def __class_getitem__(cls, item):
        return cls


class _PlaceholderType(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _PlaceholderType(name, (_Placeholder,), {})
        setattr(cls, name, value)  # the same object on every access: some modules build dicts keyed by them
        return value


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _PlaceholderType(name, (_Placeholder,), {})
        setattr(self, name, value)
        return value


class _Finder:
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        del path, target
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        del module


def _transformers_sees_no_torchvision() -> None:
    """transformers asks lazily (``importlib.util.find_spec``, then the version) whether torchvision is installed,
    and would find the stand-in, without a version: it must see the machine as it is. Asked now, before the
    stand-in exists, its answer (no torchvision) is cached for the process, whichever test module comes first."""
    try:
        from transformers.utils import import_utils
    except ImportError:  # pragma: no cover - transformers is in requirements-test.txt
        return
    import_utils.is_torchvision_available()


def install(name: str) -> None:
    """``import name`` and its submodules give stand-ins from now on, in this process (a no-op when installed)."""
    if name == "torchvision":
        _transformers_sees_no_torchvision()
    if not any(isinstance(finder, _Finder) and finder.root == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder(name))
