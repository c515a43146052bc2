"""Methods as plug-ins: a framework (MAE, SimMIM, ...) or a task (fine-tuning) is one module, looked up by name.

``config.method.name`` names a module of this package (``prmim_jax.methods.<name>``),
as big_vision looks up models by name. The module's ``build(config) -> Method``
takes the whole experiment config and returns an object with the small protocol
below; the one trainer (``prmim_jax.train``) and the evaluators
(``prmim_jax.evaluate``) use only that protocol, never a method's name.

The protocol (``Method``), both halves of a method's work:

- ``host``: ``HostTransforms``, what the data pipeline adds to each batch on the
  host (token sets, targets computed with numpy): a per-example random map and a
  per-batch map emitting named arrays.
- ``batch_spec(batch_size)``: the named arrays of one training batch (shapes and
  dtypes), from which parameters are initialised and the step compiled.
- ``init(rng, batch) -> Variables``: parameters (trained), ``frozen`` ones (a
  teacher: carried and checkpointed, never updated) and ``batch_stats``.
- ``loss(variables, batch, rng) -> (loss, metrics, batch_stats)``: the
  objective on one batch, a float32 scalar, float32 scalar metrics and the
  updated running statistics.
- ``optimizer(global_batch, total_steps)``: the optax transformation.
- ``encoder(params=None) -> (module, encoder params)``: the encoder the method
  leaves for evaluation, fine-tuning and export (``module.apply({'params': p},
  images)`` gives ``[B, 1 + N, D]`` tokens, cls first, or a Swin's ``SwinOutput``); params None without them.
- ``load_pretrained(params, shardings) -> params``: a fresh run's starting
  parameters (a classifier loads its pretrained encoder); default: as initialised.
- ``load_frozen(frozen, shardings) -> frozen``: a fresh run's frozen
  parameters (a teacher's weights, read from disk); default: as initialised.
- optional capabilities, ``None`` when the method has none: ``picture``
  (reconstruction pictures), ``logits`` (classifiers).
- ``host_state(setup)``: per-image host state that a sampler keeps across steps
  (AMT's attention maps, ``prmim_jax.attention_maps``), or None (the default).
  The trainer calls its ``sample(host batch) -> training batch`` on every batch,
  ``refresh(step, state) -> log line | None`` after every step (before that
  step's checkpoint), and saves ``state_dict()`` / restores
  ``load_state_dict(arrays)`` (``{name: numpy array}``, this process's share)
  with every checkpoint.

Adding a framework: write ``prmim_jax/methods/<name>.py`` with
``default_config(**overrides)`` (its method section), ``experiment_config()``
(every key its runs read, with defaults: the reference ``config_validation``
holds configs to) and ``build(config)``; a
config sets ``config.method = <name>.default_config(...)``. Methods with a thrown
set share ``prmim_jax.methods.throwing`` (sampler, rho_d, the three
reconstructions and the aggregator).
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

import flax
import jax
import ml_collections
import numpy as np

from prmim_jax.data import transforms
from prmim_jax.data.pipeline import HostTransforms  # re-exported: part of the protocol

# Method names of earlier configs (and saved ``config.json`` files) -> (module, method-section overrides).
LEGACY_NAMES = {
    "partial": ("mae", {"reconstruction": "partial"}),
    "prmim": ("mae", {"reconstruction": "progressive"}),
}


@flax.struct.dataclass
class Variables:
    """Everything a method's step reads (a pytree): trained ``params``, ``frozen`` parameters, running
    ``batch_stats``."""

    params: Any
    frozen: Any = flax.struct.field(default_factory=dict)
    batch_stats: Any = flax.struct.field(default_factory=dict)


class Method(abc.ABC):
    """The protocol of the module docstring. Subclasses hold the experiment config and their model."""

    config: ml_collections.ConfigDict  # the whole experiment config

    @property
    def name(self) -> str:
        return self.config.method.name

    @property
    @abc.abstractmethod
    def host(self) -> HostTransforms:
        """The data pipeline's per-example and per-batch transforms for this method."""

    @abc.abstractmethod
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The named arrays of a training batch of ``batch_size`` images."""

    @abc.abstractmethod
    def init(self, rng: jax.Array, batch: dict) -> Variables:
        """Fresh variables (parameters boxed with their logical axes) for a batch like ``batch``."""

    @abc.abstractmethod
    def loss(self, variables: Variables, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict, Any]:
        """``(loss float32 scalar, metrics {name: float32 scalar}, new batch_stats)`` of one training batch."""

    @abc.abstractmethod
    def optimizer(self, global_batch: int, total_steps: int):
        """The optax ``GradientTransformation`` (learning-rate schedule included)."""

    @abc.abstractmethod
    def encoder(self, params=None) -> tuple[Any, Any]:
        """``(encoder module, its params or None)``: ``module.apply({'params': p}, images [B, H, W, C])`` ->
        ``[B, 1 + N, D]``."""

    def load_pretrained(self, params, shardings):
        """A fresh run's starting parameters (laid out as ``shardings``); default: ``params`` as initialised."""
        del shardings
        return params

    def load_frozen(self, frozen, shardings):
        """A fresh run's frozen parameters (laid out as ``shardings``); default: ``frozen`` as initialised."""
        del shardings
        return frozen

    def host_state(self, setup):
        """The per-image host state of the module docstring for the trainer's ``setup``; default: None."""
        del setup
        return None

    # Optional capabilities (None when the method has none):
    # picture(params, images [b, H, W, C] normalised, seed) -> (rows [3, b, H, W, 3] in [0, 1], marks [b, N], patch)
    picture = None
    # logits(variables, images [B, H, W, C]) -> [B, num_classes] float32
    logits = None

    def normalize(self, images):
        """``images [..., C]`` uint8 pixels (the pipeline's default) -> float32 normalised per ``config.data``,
        on device; already normalised float images pass through (``data.device_normalize=False``)."""
        data = self.config.data
        return transforms.normalize_images(images, tuple(data.mean), tuple(data.std))

    def example_batch(self, batch_size: int) -> dict:
        """Zeros shaped like ``batch_spec`` (initialisation needs values, not only shapes)."""
        return {k: np.zeros(s.shape, s.dtype) for k, s in self.batch_spec(batch_size).items()}


def canonical_section(method: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``method`` with a legacy name (``partial``, ``prmim``) rewritten as its module and overrides."""
    if method.name not in LEGACY_NAMES:
        return method
    module, overrides = LEGACY_NAMES[method.name]
    section = ml_collections.ConfigDict(method.to_dict())
    section.name = module
    section.update(overrides)
    return section


def module(name: str):
    """The method module ``prmim_jax.methods.<name>``; ``ValueError`` (listing the choices) when there is none."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"method.name={name!r} is not a module name; set --config.method.name to one of {available()}."
        )
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        import difflib

        match = difflib.get_close_matches(name, available(), n=1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise ValueError(
            f"unknown method {name!r}; choose one of {available()} for --config.method.name{hint}."
        ) from None


def available() -> list[str]:
    """Module names under ``prmim_jax/methods`` that provide ``build`` (the registry is the package)."""
    import pkgutil

    names = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and hasattr(importlib.import_module(f"{__name__}.{info.name}"), "build"):
            names.append(info.name)
    return sorted(names) + sorted(LEGACY_NAMES)


def method_config(name: str = "prmim", **overrides) -> ml_collections.ConfigDict:
    """The method section for ``name`` (a module or a legacy name) with ``overrides``, from the module's defaults."""
    module_name, legacy = LEGACY_NAMES.get(name, (name, {}))
    return module(module_name).default_config(**(legacy | overrides))


def build(config: ml_collections.ConfigDict) -> Method:
    """The ``Method`` of an experiment config; raises ``ValueError`` with the fix, before anything compiles."""
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the caller's config stays as it is
    config.method = canonical_section(config.method)
    return module(config.method.name).build(config)
